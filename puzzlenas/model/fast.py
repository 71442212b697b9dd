"""The fast path: prefill and decode as a serving engine runs them, for parent and child alike.

- KV cache: per GQA layer a (B, kv_heads, max_len, D) K and V buffer (each layer's own KV-head
  count) and one device tensor `lengths` (B,): tokens cached per row. A decode step reads
  each row's filled part only (kernels.decode_attention) and is CUDA-graph capturable.
- Fused weights: q/k/v in one matrix, gate/up in one matrix (one GEMM each, as vLLM does).
- Fused elementwise work: on CUDA the parts between attentions (RMSNorm, projections, RoPE,
  residuals, SiLU x up) are `torch.compile`d per distinct subblock shape; attention is the
  Triton split-KV kernel. On CPU everything runs eagerly with the same arithmetic.
- `fused=True` (default) cuts a decode step's kernels further where Triton runs: RoPE of q and k
  and the K/V cache write happen inside the attention kernel, which reads q, k, v straight from
  the q/k/v GEMM's output (`kernels.decode_attention_qkv`); on CUDA the residual adds after the
  down / linear projections are the GEMM's own epilogue (`torch.addmm`). The CPU path (no
  Triton) is the same arithmetic either way. `compile_mode` picks torch.compile's mode (e.g.
  "max-autotune-no-cudagraphs": Triton GEMMs tuned per shape; long compiles).
- Prefill: right-padded prompts (B, T) with per-row lengths; causal SDPA (flash on CUDA).

`FastRunner` holds a model's fused weights, a cache, and (CUDA) the captured decode graph;
`generate` samples token ids for lists of prompts on it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .kernels import attention_kernel, decode_attention, decode_attention_qkv, rope, split_qkv
from .modeling import DeciLMDecoderLayer, DeciLMForCausalLM


# =============================================================================================
# Pure tensor functions (compiled on CUDA; shapes: decode x (B, C), prefill x (B, T, C))
# =============================================================================================
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As modeling.RMSNorm: normalize in fp32, back to the input dtype, then scale.
    dtype = x.dtype
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def qkv_proj(x, norm_w, eps: float, w_qkv, b_qkv):
    """norm, one q/k/v GEMM: x (..., C) -> qkv (..., (Hq + 2 Hkv) D), before RoPE."""
    return F.linear(rms_norm(x, norm_w, eps), w_qkv, b_qkv)


def qkv_rope(x, norm_w, eps: float, w_qkv, b_qkv, cos, sin, heads: int, kv_heads: int, head_dim: int):
    """norm, one q/k/v GEMM, RoPE: x (..., C) -> q (..., Hq, D), k, v (..., Hkv, D)."""
    q, k, v = split_qkv(qkv_proj(x, norm_w, eps, w_qkv, b_qkv), heads, kv_heads, head_dim)
    return rope(q, cos, sin), rope(k, cos, sin), v


def add_linear(x, h, w, b, epilogue: bool):
    """x + F.linear(h, w, b). epilogue (CUDA, no bias): one torch.addmm, the add done by the GEMM's
    epilogue instead of a kernel of its own (rounded once instead of twice)."""
    if epilogue and b is None:
        return torch.addmm(x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1]), w.t()).view(x.shape)
    return x + F.linear(h, w, b)


def linear_attention(x, norm_w, eps: float, w, epilogue: bool = False):
    return add_linear(x, rms_norm(x, norm_w, eps), w, None, epilogue)


def after_attention(x, y, w_o, b_o, norm_w, eps: float, w_in, b_in, w_down, b_down, ffn_kind: str,
                    epilogue: bool = False):
    """x + o_proj(y) (y None: no attention output), then x + FFN(norm(x)) for a gated or linear FFN.
    epilogue: the residual adds in the GEMMs (`add_linear`)."""
    if y is not None:
        x = add_linear(x, y.flatten(-2), w_o, b_o, epilogue)
    if ffn_kind == "gated":
        gate, up = F.linear(rms_norm(x, norm_w, eps), w_in, b_in).chunk(2, dim=-1)
        x = add_linear(x, F.silu(gate) * up, w_down, b_down, epilogue)
    elif ffn_kind == "linear":
        x = add_linear(x, rms_norm(x, norm_w, eps), w_in, None, epilogue)
    return x


def lm_head(x, norm_w, eps: float, w):
    return F.linear(rms_norm(x, norm_w, eps), w)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions (...,) -> cos, sin (..., 1, D) in `dtype` (as modeling.RotaryEmbedding)."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[..., None, :], emb.sin().to(dtype)[..., None, :]


def step_inputs(tokens: torch.Tensor, embed_w: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor):
    """A decode step's inputs in one compiled region: x (B, C) = embedding rows, cos/sin (B, 1, D)."""
    x = F.embedding(tokens, embed_w)
    cos, sin = rope_tables(positions, inv_freq, x.dtype)
    return x, cos, sin


_COMPILED: dict[tuple[str, bool, str | None], Callable] = {}


def compiled(fn: Callable, enabled: bool, dynamic: bool = False, mode: str | None = None) -> Callable:
    """`fn` under torch.compile (one cache per function and mode; recompiled per distinct shapes), or `fn`."""
    if not enabled:
        return fn
    key = (fn.__name__, dynamic, mode)
    if key not in _COMPILED:
        import torch._dynamo

        # A child holds many distinct subblock shapes; each is a recompilation of the same function.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
        _COMPILED[key] = torch.compile(fn, dynamic=dynamic, fullgraph=True, mode=mode)
    return _COMPILED[key]


# =============================================================================================
# Weights of one layer, fused
# =============================================================================================
@dataclasses.dataclass
class FastLayer:
    """One layer's weights in the form the fast path reads (q/k/v and gate/up concatenated)."""

    attention: str  # "gqa" | "linear" | "no_op"
    ffn: str  # "gated" | "linear" | "no_op"
    kv_heads: int = 0
    cache_slot: int = -1
    att_norm: torch.Tensor | None = None
    w_qkv: torch.Tensor | None = None
    b_qkv: torch.Tensor | None = None
    w_o: torch.Tensor | None = None
    b_o: torch.Tensor | None = None
    ffn_norm: torch.Tensor | None = None
    w_in: torch.Tensor | None = None  # gate|up (2F, C) or the linear FFN (C, C)
    b_in: torch.Tensor | None = None
    w_down: torch.Tensor | None = None
    b_down: torch.Tensor | None = None

    @classmethod
    def of(cls, layer: DeciLMDecoderLayer, cache_slot: int) -> "FastLayer":
        block = layer.block
        out = cls(block.attention.kind, block.ffn.kind, cache_slot=cache_slot)
        att, mlp = layer.self_attn, layer.mlp
        with torch.no_grad():
            if out.attention == "gqa":
                out.kv_heads = att.num_kv_heads
                out.att_norm = layer.input_layernorm.weight
                out.w_qkv = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
                if att.q_proj.bias is not None:
                    out.b_qkv = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias])
                out.w_o, out.b_o = att.o_proj.weight, att.o_proj.bias
            elif out.attention == "linear":
                out.att_norm, out.w_o = layer.input_layernorm.weight, att.linear_attn.weight
            if out.ffn == "gated":
                out.ffn_norm = layer.post_attention_layernorm.weight
                out.w_in = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
                if mlp.gate_proj.bias is not None:
                    out.b_in = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
                out.w_down, out.b_down = mlp.down_proj.weight, mlp.down_proj.bias
            elif out.ffn == "linear":
                out.ffn_norm, out.w_in = layer.post_attention_layernorm.weight, mlp.linear_mlp.weight
        return out

    def fused_bytes(self) -> int:
        """Bytes of the concatenated copies (the model's own q/k/v, gate/up weights stay where they are)."""
        return sum(t.numel() * t.element_size() for t in (self.w_qkv, self.b_qkv) if t is not None) + \
            (sum(t.numel() * t.element_size() for t in (self.w_in, self.b_in) if t is not None)
             if self.ffn == "gated" else 0)


class KVCache:
    """Per-GQA-layer K/V buffers (B, kv_heads, max_len, D) and the fill per row, on the device."""

    def __init__(self, kv_heads: Sequence[int], head_dim: int, batch_size: int, max_len: int,
                 dtype: torch.dtype, device: torch.device):
        self.batch_size, self.max_len = batch_size, max_len
        self.k = [torch.zeros(batch_size, h, max_len, head_dim, dtype=dtype, device=device) for h in kv_heads]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens cached per row

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def run_layers(layers: Sequence[FastLayer], x: torch.Tensor, cos, sin, cache: KVCache, eps: float,
               heads: int, head_dim: int, use_compile: bool, attention_backend: str = "auto",
               fused: bool = True, compile_mode: str | None = None) -> torch.Tensor:
    """One decode step (x (B, C), cos/sin (B, 1, D)) through `layers`; writes each GQA layer's
    new k, v at cache.lengths. Does not advance the lengths. fused: RoPE and the cache write in
    the attention kernel where Triton runs, residual adds in the GEMMs on CUDA (module docstring)."""
    in_kernel = fused and attention_kernel(x, attention_backend) == "triton"
    epilogue = fused and x.is_cuda
    pre = compiled(qkv_proj if in_kernel else qkv_rope, use_compile, mode=compile_mode)
    lin = compiled(linear_attention, use_compile, mode=compile_mode)
    post = compiled(after_attention, use_compile, mode=compile_mode)
    pos = cache.lengths
    for layer in layers:
        y = None
        if layer.attention == "gqa":
            k_cache, v_cache = cache.k[layer.cache_slot], cache.v[layer.cache_slot]
            if in_kernel:
                qkv = pre(x, layer.att_norm, eps, layer.w_qkv, layer.b_qkv)  # (B, (Hq + 2 Hkv) D), before RoPE
                y = decode_attention_qkv(qkv, cos, sin, k_cache, v_cache, pos, heads, backend="triton")
            else:
                q, k, v = pre(x, layer.att_norm, eps, layer.w_qkv, layer.b_qkv, cos, sin, heads, layer.kv_heads,
                              head_dim)
                y = decode_attention(q, k, v, k_cache, v_cache, pos, backend=attention_backend)  # (B, Hq, D)
        elif layer.attention == "linear":
            x = lin(x, layer.att_norm, eps, layer.w_o, epilogue)
        x = post(x, y, layer.w_o if y is not None else None, layer.b_o, layer.ffn_norm, eps, layer.w_in, layer.b_in,
                 layer.w_down, layer.b_down, layer.ffn, epilogue)
    return x


def prefill_layers(layers: Sequence[FastLayer], x: torch.Tensor, cos, sin, cache: KVCache, eps: float,
                   heads: int, head_dim: int, use_compile: bool, fused: bool = True,
                   compile_mode: str | None = None) -> torch.Tensor:
    """Prefill x (B, T, C) from an empty cache (causal attention over the T tokens, right padding
    allowed: real tokens never see the padding after them); writes K/V at positions 0..T-1.
    fused: residual adds in the GEMMs on CUDA."""
    epilogue = fused and x.is_cuda
    pre = compiled(qkv_rope, use_compile, dynamic=True, mode=compile_mode)
    lin = compiled(linear_attention, use_compile, dynamic=True, mode=compile_mode)
    post = compiled(after_attention, use_compile, dynamic=True, mode=compile_mode)
    B, T, _ = x.shape
    for layer in layers:
        y = None
        if layer.attention == "gqa":
            q, k, v = pre(x, layer.att_norm, eps, layer.w_qkv, layer.b_qkv, cos, sin, heads, layer.kv_heads, head_dim)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D)
            cache.k[layer.cache_slot][:, :, :T].copy_(k)
            cache.v[layer.cache_slot][:, :, :T].copy_(v)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True,
                                               enable_gqa=layer.kv_heads != heads).transpose(1, 2)  # (B, T, Hq, D)
        elif layer.attention == "linear":
            x = lin(x, layer.att_norm, eps, layer.w_o, epilogue)
        x = post(x, y, layer.w_o if y is not None else None, layer.b_o, layer.ffn_norm, eps, layer.w_in, layer.b_in,
                 layer.w_down, layer.b_down, layer.ffn, epilogue)
    return x


# =============================================================================================
# A model on the fast path
# =============================================================================================
class FastRunner:
    """A model's fused weights, a KV cache for `batch_size` rows of up to `max_len` tokens, and
    its prefill / decode steps. compile: None = on CUDA only. The model must not change while
    a runner holds it (the fused weights are copies). fused / compile_mode: see the module docstring
    (fused=False: the step as before the in-kernel RoPE, for comparisons)."""

    def __init__(self, model: DeciLMForCausalLM, batch_size: int, max_len: int, compile: bool | None = None,
                 attention_backend: str = "auto", fused: bool = True, compile_mode: str | None = None):
        config = model.config
        weight = model.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.model = model
        self.compile = self.device.type == "cuda" if compile is None else compile
        self.attention_backend = attention_backend
        self.fused, self.compile_mode = fused, compile_mode
        self.heads, self.head_dim, self.eps = config.num_attention_heads, config.head_dim, config.rms_norm_eps
        slots, kv_heads = [], []
        for block in model.blocks:
            slots.append(len(kv_heads) if block.attention.kind == "gqa" else -1)
            if block.attention.kind == "gqa":
                kv_heads.append(block.attention.num_kv_heads)
        self.layers = [FastLayer.of(layer, slot) for layer, slot in zip(model.model.layers, slots)]
        self.cache = KVCache(kv_heads, self.head_dim, batch_size, max_len, self.dtype, self.device)
        self.batch_size, self.max_len = batch_size, max_len
        self._graph: torch.cuda.CUDAGraph | None = None

    def fused_bytes(self) -> int:
        return sum(layer.fused_bytes() for layer in self.layers)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) right-padded, lengths (B,) real tokens per row (default T): fills the
        cache from empty and returns the logits (B, V) at each row's last real token."""
        B, T = input_ids.shape
        if B != self.batch_size or T > self.max_len:
            raise ValueError(f"prefill of {B} x {T} tokens into a runner of {self.batch_size} rows x "
                             f"{self.max_len} positions; build the runner with matching sizes")
        lengths = torch.full((B,), T, device=self.device) if lengths is None else lengths.to(self.device)
        m = self.model.model
        x = m.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = rope_tables(torch.arange(T, device=self.device)[None].expand(B, T), m.rotary_emb.inv_freq, x.dtype)
        x = prefill_layers(self.layers, x, cos, sin, self.cache, self.eps, self.heads, self.head_dim, self.compile,
                           self.fused, self.compile_mode)
        self.cache.lengths.copy_(lengths)
        last = x[torch.arange(B, device=self.device), lengths - 1]  # (B, C)
        return compiled(lm_head, self.compile, mode=self.compile_mode)(last, m.norm.weight, self.eps,
                                                                      self.model.lm_head.weight)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) at position cache.lengths -> logits (B, V); advances the lengths. Graph-capturable."""
        m = self.model.model
        if self.fused:  # one compiled region instead of ~8 small kernels (eager: the same ops)
            x, cos, sin = compiled(step_inputs, self.compile, mode=self.compile_mode)(
                tokens, m.embed_tokens.weight, self.cache.lengths, m.rotary_emb.inv_freq)
        else:
            x = m.embed_tokens(tokens)  # (B, C)
            cos, sin = rope_tables(self.cache.lengths, m.rotary_emb.inv_freq, x.dtype)  # (B, 1, D)
        x = run_layers(self.layers, x, cos, sin, self.cache, self.eps, self.heads, self.head_dim, self.compile,
                       self.attention_backend, self.fused, self.compile_mode)
        self.cache.lengths.add_(1)
        return compiled(lm_head, self.compile, mode=self.compile_mode)(x, m.norm.weight, self.eps,
                                                                      self.model.lm_head.weight)


# =============================================================================================
# Sampling and generation
# =============================================================================================
# How `sample` finds a top-p nucleus on CUDA: "threshold" (model/nucleus.py: a Triton kernel, no
# sort; teacher generation 172k tokens/s on an H200) or "sort" (the whole vocabulary in PyTorch:
# 95k tokens/s; benchmarks/teacher_speed.py, RESULTS.md). Without Triton, and on CPU, the sort.
NUCLEUS = "threshold"


def sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): greedy at temperature 0, else softmax(logits / T)
    restricted to the top-p nucleus, by the Gumbel-max trick (no host synchronization)."""
    if temperature <= 0:
        return logits.argmax(-1)
    if NUCLEUS not in ("sort", "threshold"):
        raise ValueError(f"fast.NUCLEUS = {NUCLEUS!r}; allowed: sort, threshold")
    if top_p < 1.0 and NUCLEUS == "threshold" and logits.is_cuda:
        from .kernels import triton_available
        from .nucleus import nucleus_sample

        if triton_available():
            return nucleus_sample(logits, temperature, top_p)
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = _descending(logits, top_p)  # (B, K): K = V, or fewer on CPU
        probs = (sorted_logits - logits.logsumexp(-1, keepdim=True)).exp()  # of the whole vocabulary
        outside = probs.cumsum(-1) - probs > top_p  # tokens after the nucleus is full (the first always kept)
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        gumbel = -torch.log(-torch.log(torch.rand_like(sorted_logits).clamp_(1e-20, 1.0)))
        return order.gather(-1, (sorted_logits + gumbel).argmax(-1, keepdim=True))[:, 0]
    gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_(1e-20, 1.0)))
    return (logits + gumbel).argmax(-1)


# On CPU a full sort of the vocabulary costs a third of a decode step (SmolLM2, 32 x 49,152 logits:
# 0.35 s of a ~1 s step on one core); top-8192 is a partial sort (0.09 s). On the bundled parent
# writing from real openings at temperature 1, the top 8,192 held the top-0.95 nucleus of every row
# at every step measured (the top 4,096: 88% of the steps); a step where they do not sorts it all.
CPU_NUCLEUS_CANDIDATES = 8192


def _descending(logits: torch.Tensor, top_p: float, candidates: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted logits, their ids), descending, holding at least every row's top-p nucleus. On CUDA
    the whole vocabulary (no host synchronization, graph-capturable); on CPU the top `candidates`
    when they hold at least top_p of every row's probability (so the nucleus lies within them
    and the draw is the same distribution), else the whole vocabulary."""
    candidates = CPU_NUCLEUS_CANDIDATES if candidates is None else candidates
    if logits.device.type == "cpu" and candidates < logits.shape[-1]:
        top, ids = logits.topk(candidates, -1)  # (B, K), sorted
        mass = (top - logits.logsumexp(-1, keepdim=True)).exp().sum(-1)  # (B,)
        if bool((mass >= top_p).all()):
            return top, ids
    return logits.sort(-1, descending=True)


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (after the prompt; up to and including EOS)
    seconds: float  # wall time of prefills and decode steps
    generated_tokens: int  # sum of len(tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


@torch.no_grad()
def generate(model: DeciLMForCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             batch_size: int = 256, seed: int | None = None, use_graph: bool | None = None,
             check_every: int = 16) -> GenerationResult:
    """Sample up to `max_new_tokens` after each prompt (lists of token ids, any lengths) on the
    fast path, `batch_size` prompts at a time. A row stops at its first EOS (kept in its output);
    a batch ends when every row has stopped (checked every `check_every` steps) or at the limit.
    eos_token_id: default the model's config. seed: seeds torch's generators (global) first."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"generate: max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be >= 1")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. the BOS id)")
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if seed is not None:
        torch.manual_seed(seed)
    device = model.model.embed_tokens.weight.device
    use_graph = device.type == "cuda" if use_graph is None else use_graph
    outputs: list[list[int]] = []
    started = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[first:first + batch_size]]
        outputs.extend(_generate_batch(model, chunk, max_new_tokens, temperature, top_p, eos_ids, device,
                                       use_graph, check_every))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return GenerationResult(outputs, seconds, sum(len(o) for o in outputs))


def _generate_batch(model, prompts: list[list[int]], max_new: int, temperature: float, top_p: float,
                    eos_ids: list[int], device, use_graph: bool, check_every: int) -> list[list[int]]:
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    T = max(len(p) for p in prompts)
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, device=device)
    runner = FastRunner(model, B, T + max_new)
    out = torch.zeros(B, max_new, dtype=torch.long, device=device)
    eos = torch.tensor(eos_ids or [-1], device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    token = sample(runner.prefill(ids, lengths), temperature, top_p)  # (B,)
    step = torch.zeros((), dtype=torch.long, device=device)

    def advance() -> None:  # record token, mark EOS, sample the next one: all on the device
        out.index_copy_(1, step.view(1), token.view(B, 1))
        finished.logical_or_(torch.isin(token, eos))
        token.copy_(sample(runner.decode_step(token), temperature, top_p))
        step.add_(1)

    step_fn = _captured(advance, device) if use_graph else advance
    done = max_new
    for i in range(max_new):
        step_fn()
        if (i + 1) % check_every == 0 and bool(finished.all()):
            done = i + 1
            break
    out, finished_at = out[:, :done].tolist(), []
    for row in out:
        stop = next((j for j, t in enumerate(row) if t in eos_ids), None)
        finished_at.append(row if stop is None else row[:stop + 1])
    return finished_at


def _captured(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """fn captured in a CUDA graph after warm-up calls on a side stream; returns graph.replay.
    The warm-up calls run fn for real, so fn must be safe to repeat (it is: the step counter and
    the cache position are rewound by the caller's state below)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        fn()  # compiles; runs one real step (kept: it is step 0)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        fn()
    # Capturing does not run the kernels: the state is exactly after the first (warm-up) step.
    first = [True]

    def replay() -> None:
        if first[0]:  # the warm-up already ran step 0
            first[0] = False
            return
        graph.replay()

    return replay
