"""Per-layer block configurations: our exact schema and the Nemotron-NAS (`block_configs`) one.

Inside puzzlenas every layer is described by a `BlockConfig` holding explicit sizes (number of
KV heads, FFN intermediate size). On export it becomes the Nemotron-NAS dict of METHOD.md
section 8 (`n_heads_in_group`, `ffn_mult`, `no_op`, `replace_with_linear`), which is what
vLLM / TensorRT-LLM / mlx-lm read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

ATTENTION_KINDS = ("gqa", "linear", "no_op")
FFN_KINDS = ("gated", "linear", "no_op")

# Keys that real Nemotron-NAS checkpoints carry besides the ones we use. They are accepted
# when they hold their neutral value (None/False) and rejected otherwise, since we do not
# implement sliding windows, sink tokens or sparsity.
_NEUTRAL_ATTENTION_KEYS = ("window_length", "num_sink_tokens", "sparsify", "unshifted_sink",
                           "use_prefill_window_in_sink_attention")
_NEUTRAL_FFN_KEYS = ("sparsify",)


class BlockConfigError(ValueError):
    """A block configuration that cannot be built or exported."""


def nas_ffn_width(ffn_mult: float, hidden_size: int, multiple: int = 256) -> int:
    """Nemotron-NAS FFN width: round_up(int(2 * ffn_mult * hidden / 3), 256)."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return int(math.ceil(width / multiple) * multiple)


def ffn_mult_for_width(intermediate_size: int, hidden_size: int) -> float | None:
    """The `ffn_mult` that reproduces `intermediate_size` under the 256 rounding, or None."""
    candidate = round(intermediate_size * 3 / (2 * hidden_size), 6)
    for mult in (candidate, intermediate_size * 3 / (2 * hidden_size)):
        if nas_ffn_width(mult, hidden_size) == intermediate_size:
            return mult
    return None


@dataclass(frozen=True)
class AttentionConfig:
    """One layer's attention subblock: GQA with `num_kv_heads`, a linear layer, or nothing."""

    kind: str = "gqa"
    num_kv_heads: int | None = None  # only for kind == "gqa"

    def validate(self, num_heads: int, where: str = "attention") -> None:
        if self.kind not in ATTENTION_KINDS:
            raise BlockConfigError(f"{where}.kind = {self.kind!r}; allowed: {', '.join(ATTENTION_KINDS)}")
        if self.kind == "gqa":
            kv = self.num_kv_heads
            if not isinstance(kv, int) or kv < 1 or num_heads % kv != 0:
                divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
                raise BlockConfigError(
                    f"{where}.num_kv_heads = {kv!r} must divide the {num_heads} query heads; "
                    f"allowed: {divisors}")
        elif self.num_kv_heads is not None:
            raise BlockConfigError(f"{where}.num_kv_heads must be None for a {self.kind} attention")

    @property
    def short(self) -> str:
        return f"gqa kv={self.num_kv_heads}" if self.kind == "gqa" else self.kind.replace("_", "-")


@dataclass(frozen=True)
class FFNConfig:
    """One layer's FFN subblock: gated SiLU MLP of `intermediate_size`, a linear layer, or nothing."""

    kind: str = "gated"
    intermediate_size: int | None = None  # only for kind == "gated"

    def validate(self, where: str = "ffn") -> None:
        if self.kind not in FFN_KINDS:
            raise BlockConfigError(f"{where}.kind = {self.kind!r}; allowed: {', '.join(FFN_KINDS)}")
        if self.kind == "gated":
            size = self.intermediate_size
            if not isinstance(size, int) or size < 1:
                raise BlockConfigError(f"{where}.intermediate_size = {size!r} must be a positive int")
        elif self.intermediate_size is not None:
            raise BlockConfigError(f"{where}.intermediate_size must be None for a {self.kind} FFN")

    @property
    def short(self) -> str:
        return f"ffn {self.intermediate_size}" if self.kind == "gated" else self.kind.replace("_", "-")


@dataclass(frozen=True)
class BlockConfig:
    """One decoder layer: an attention subblock and an FFN subblock."""

    attention: AttentionConfig
    ffn: FFNConfig

    @classmethod
    def parent(cls, num_kv_heads: int, intermediate_size: int) -> "BlockConfig":
        return cls(AttentionConfig("gqa", num_kv_heads), FFNConfig("gated", intermediate_size))

    def validate(self, num_heads: int, where: str = "block") -> None:
        self.attention.validate(num_heads, f"{where}.attention")
        self.ffn.validate(f"{where}.ffn")

    # ---- Nemotron-NAS dict form ------------------------------------------------------------
    def to_nas_dict(self, num_heads: int, hidden_size: int) -> dict[str, Any]:
        """The Nemotron-NAS `block_configs` entry; adds `intermediate_size` only when
        `ffn_mult` cannot express the width (such checkpoints load only in puzzlenas)."""
        att = self.attention
        attention = {
            "n_heads_in_group": num_heads // att.num_kv_heads if att.kind == "gqa" else None,
            "no_op": att.kind == "no_op",
            "replace_with_linear": att.kind == "linear",
        }
        ffn: dict[str, Any] = {
            "ffn_mult": None,
            "no_op": self.ffn.kind == "no_op",
            "replace_with_linear": self.ffn.kind == "linear",
        }
        if self.ffn.kind == "gated":
            mult = ffn_mult_for_width(self.ffn.intermediate_size, hidden_size)
            if mult is None:
                ffn["ffn_mult"] = round(self.ffn.intermediate_size * 3 / (2 * hidden_size), 6)
                ffn["intermediate_size"] = self.ffn.intermediate_size
            else:
                ffn["ffn_mult"] = mult
        return {"attention": attention, "ffn": ffn}

    @classmethod
    def from_nas_dict(cls, block: dict, num_heads: int, hidden_size: int,
                      where: str = "block_configs[?]") -> "BlockConfig":
        """Parse and validate one Nemotron-NAS `block_configs` entry."""
        if not isinstance(block, dict):
            raise BlockConfigError(f"{where} must be a dict with keys 'attention' and 'ffn', got {block!r}")
        _check_keys(block, {"attention", "ffn"}, where, required={"attention", "ffn"})
        attention = _parse_nas_attention(block["attention"], num_heads, f"{where}.attention")
        ffn = _parse_nas_ffn(block["ffn"], hidden_size, f"{where}.ffn")
        config = cls(attention, ffn)
        config.validate(num_heads, where)
        return config

    @property
    def short(self) -> str:
        return f"{self.attention.short} | {self.ffn.short}"


def is_nas_expressible(blocks: list[BlockConfig], hidden_size: int) -> list[int]:
    """Indices of layers whose FFN width `ffn_mult` cannot express (empty = exportable as is)."""
    return [i for i, b in enumerate(blocks)
            if b.ffn.kind == "gated" and ffn_mult_for_width(b.ffn.intermediate_size, hidden_size) is None]


def _check_keys(d: dict, allowed: set[str], where: str, required: set[str] = frozenset()) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise BlockConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(d))
    if missing:
        raise BlockConfigError(f"{where}: missing key(s) {missing}")


def _reject_non_neutral(d: dict, keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        if d.get(key) not in (None, False):
            raise BlockConfigError(f"{where}.{key} = {d[key]!r} is not supported by puzzlenas "
                                   f"(only null/false); supported: GQA, linear and no-op subblocks")


def _parse_nas_attention(d: Any, num_heads: int, where: str) -> AttentionConfig:
    if not isinstance(d, dict):
        raise BlockConfigError(f"{where} must be a dict, got {d!r}")
    _check_keys(d, {"n_heads_in_group", "no_op", "replace_with_linear", *_NEUTRAL_ATTENTION_KEYS}, where)
    _reject_non_neutral(d, _NEUTRAL_ATTENTION_KEYS, where)
    no_op, linear = bool(d.get("no_op", False)), bool(d.get("replace_with_linear", False))
    if no_op and linear:
        raise BlockConfigError(f"{where}: no_op and replace_with_linear are both true; choose one")
    if no_op:
        return AttentionConfig("no_op")
    if linear:
        return AttentionConfig("linear")
    group = d.get("n_heads_in_group")
    if not isinstance(group, int) or group < 1 or num_heads % group != 0:
        allowed = [g for g in range(1, num_heads + 1) if num_heads % g == 0]
        raise BlockConfigError(f"{where}.n_heads_in_group = {group!r} must divide the {num_heads} "
                               f"query heads; allowed: {allowed}")
    return AttentionConfig("gqa", num_heads // group)


def _parse_nas_ffn(d: Any, hidden_size: int, where: str) -> FFNConfig:
    if not isinstance(d, dict):
        raise BlockConfigError(f"{where} must be a dict, got {d!r}")
    _check_keys(d, {"ffn_mult", "no_op", "replace_with_linear", "intermediate_size", *_NEUTRAL_FFN_KEYS}, where)
    _reject_non_neutral(d, _NEUTRAL_FFN_KEYS, where)
    no_op, linear = bool(d.get("no_op", False)), bool(d.get("replace_with_linear", False))
    if no_op and linear:
        raise BlockConfigError(f"{where}: no_op and replace_with_linear are both true; choose one")
    if no_op:
        return FFNConfig("no_op")
    if linear:
        return FFNConfig("linear")
    if d.get("intermediate_size") is not None:  # our exact width for non-expressible sizes
        return FFNConfig("gated", int(d["intermediate_size"]))
    mult = d.get("ffn_mult")
    if not isinstance(mult, (int, float)) or mult <= 0:
        raise BlockConfigError(f"{where}.ffn_mult = {mult!r} must be a positive number")
    return FFNConfig("gated", nas_ffn_width(float(mult), hidden_size))
