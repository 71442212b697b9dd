"""Run configuration: typed dataclasses are the schema, YAML is a dump of them.

Unknown keys, wrong types and impossible values fail at load with the key's path and
what is allowed. `--set a.b=value` overrides parse `value` as YAML (and `1e-3` as a float,
which YAML 1.1 reads as a string). The sections live in torch-free modules, so reading a
config loads no method code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.config import DataConfig
from .eval.config import EvalConfig
from .sections import (BLDConfig, CostConfig, GKDConfig, LibraryConfig, PeersConfig, ScoringConfig, SearchConfig,
                       ServingConfig, TeacherSection, check_name)


class ConfigError(ValueError):
    """A run config that cannot be used as written."""


@dataclass
class RunConfig:
    """One puzzlenas job: which parent, which data, which search space, how to train it."""

    name: str = "default"  # run directory name under runs/
    parent: str = "smollm2-135m"  # local checkpoint dir, hub id, or a bundled parent name
    parent_dtype: str = "float32"  # dtype the converted parent is stored in: float32 | bfloat16
    seed: int = 0
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherSection = field(default_factory=TeacherSection)  # read when data.sources has teacher:N
    library: LibraryConfig = field(default_factory=LibraryConfig)
    bld: BLDConfig = field(default_factory=BLDConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    costs: CostConfig = field(default_factory=CostConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    peers: PeersConfig = field(default_factory=PeersConfig)
    gkd: GKDConfig = field(default_factory=GKDConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)

    def validate(self) -> None:
        if self.parent_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"parent_dtype = {self.parent_dtype!r}; allowed: float32, bfloat16")
        check_name("name", self.name)  # runs/<name>/: never "..", never outside runs/
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device = {self.device!r}; allowed: auto, cpu, cuda, cuda:N")
        names = [t.name for t in self.search.targets]
        unknown = [t for t in self.peers.targets if t not in names]
        if unknown:
            raise ConfigError(f"peers.targets names {unknown}, not a search target; the targets are {names} "
                              "(or leave peers.targets empty for peers at every target)")


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a dict, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config key(s) {[where + k for k in unknown]}; allowed at "
                          f"{path or 'top level'}: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{path}.{name}" if path else name)
              for name, value in data.items()}
    try:
        obj = cls(**kwargs)
        if hasattr(obj, "validate"):
            obj.validate()
    except ConfigError:
        raise
    except ValueError as err:  # a section's own validation: say where it is
        raise ConfigError(f"{path or 'config'}: {err}") from err
    return obj


FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path} = {value!r} has the wrong type; expected {hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} = {value!r} must be a list")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)  # 1e-3: YAML 1.1 reads it as a string, everyone means the number
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and
                                                 not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{path} = {value!r} has type {type(value).__name__}; expected {hint.__name__}")
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (value parsed as YAML) to a config dict."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. parent=smollm2-135m)")
        key, raw = item.split("=", 1)
        target = data
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is not a section")
        try:
            target[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err.problem})") from err
    return data


PRESETS_DIR = Path(__file__).parent / "presets"


def default_preset_path() -> Path:
    """The default job for this machine: the GPU preset where CUDA is available, else the CPU one."""
    import torch

    return PRESETS_DIR / ("gpu.yaml" if torch.cuda.is_available() else "cpu.yaml")


def load_run_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The default job (path None: the preset for this machine) or a YAML file, with overrides."""
    data: dict[str, Any] = {}
    path = default_preset_path() if path is None else path
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
    return from_dict(RunConfig, apply_overrides(data, list(overrides)))


def config_hash(obj: Any) -> str:
    """Stable short hash of a dataclass (or dict) for stage DONE markers."""
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg), default=str)), sort_keys=False)
