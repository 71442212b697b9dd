"""The run config's sections, one dataclass per stage's settings (torch-free: reading a YAML
config imports no method code). Each method module re-exports its own (`from .bld import
BLDConfig` keeps working); `config.RunConfig` puts them together.

Every field's comment documents the YAML key of the same name; `validate()` raises ValueError
naming the key and the allowed values (RunConfig adds where the section is).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import ClassVar

# Names that become folder names of a run directory (run name, target names, so child-<name>/,
# gkd-<name>/): a safe character set, no leading dot (no "..", no hidden folders), no "/".
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,99}")


def check_name(key: str, name: object) -> None:
    """Refuse a name that could become a path outside its folder."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{key} = {name!r} becomes a folder name: use 1-100 of A-Z a-z 0-9 . _ + - "
                         f"(not starting with '.', no '..', no '/')")


# ---- library ------------------------------------------------------------------------------------
LINEAR_INITS = ("lstsq", "product")


@dataclass
class LibraryConfig:
    """The search space (per layer) and the calibration used to initialize it."""

    kv_heads: list[int] | None = None  # None: every divisor of the query heads <= the parent's KV heads
    attention_linear: bool = True
    attention_no_op: bool = True
    ffn_ratios: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.5, 0.25, 0.2, 0.1])
    ffn_sizes: list[int] = field(default_factory=list)  # explicit widths, added to the ratios
    ffn_multiple: int = 256  # widths round to this; 256 keeps the Nemotron-NAS export exact
    ffn_linear: bool = True
    ffn_no_op: bool = True
    linear_ffn_init: str = "lstsq"  # lstsq on calibration activations | product (W_down W_up)
    # lstsq (default): least squares on calibration activations; product: the paper's W_o W_v.
    # Measured on SmolLM2 (benchmarks/RESULTS.md): product starts at NMSE 1.65, worse than
    # dropping the attention (0.38) and than a random init after BLD; lstsq starts at 0.12.
    linear_attention_init: str = "lstsq"
    calibration_tokens: int = 65536
    calibration_batch_size: int = 8

    def validate(self) -> None:
        for name in ("linear_ffn_init", "linear_attention_init"):
            if getattr(self, name) not in LINEAR_INITS:
                raise ValueError(f"library.{name} = {getattr(self, name)!r}; allowed: {', '.join(LINEAR_INITS)}")
        if any(not 0 < r <= 1 for r in self.ffn_ratios):
            raise ValueError(f"library.ffn_ratios = {self.ffn_ratios}: each must be in (0, 1]")
        if self.ffn_multiple < 1 or any(s < 1 for s in self.ffn_sizes):
            raise ValueError("library.ffn_multiple and library.ffn_sizes must be positive")
        if self.calibration_tokens < 1 or self.calibration_batch_size < 1:
            raise ValueError("library.calibration_tokens and calibration_batch_size must be positive")

# ---- teacher ------------------------------------------------------------------------------------
TEACHER_ENGINES = ("auto", "fast", "static")


@dataclass
class TeacherSection:
    """How the parent writes its corpus (the ``teacher:TOKENS`` source of data.sources): sampling,
    batching and the mix of seed kinds (data/teacher.py). Read only when data.sources names a teacher."""

    max_new_tokens: int = 256  # tokens the parent writes per sample (its prompt comes on top)
    temperature: float = 1.0
    top_p: float = 0.95  # nucleus sampling
    batch_size: int = 256  # prompts generated at once (the fast path fills a GPU from ~256)
    shard_samples: int = 1024  # prompts per cached shard: the unit of resume
    # Share of each seed kind: openings of training documents, topic x text-kind headers, the BOS
    # token alone, chat requests (instruct parents only; else its share goes to the others).
    document_share: float = 0.35
    topic_share: float = 0.35
    unconditional_share: float = 0.1
    chat_share: float = 0.2
    seed: int = 0
    # Held-out share of the teacher's samples joined to the validation split (replace-1-block
    # scores, candidate selection, BLD and GKD validation measure on teacher text too); never test.
    validation_fraction: float = 0.05
    # Share of every BLD and GKD training batch's rows drawn from the teacher's rows (the rest from
    # the other sources); 0: the teacher rows are drawn like the others, i.e. by their token share.
    train_share: float = 0.0
    # auto: the fast path (model/fast.py) on CUDA and on the CPU (measured faster there too, RESULTS.md)
    # fast / static: that engine wherever (static = the static-KV-cache path of data/teacher.py).
    engine: str = "auto"

    def validate(self) -> None:
        for name in ("max_new_tokens", "batch_size", "shard_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"teacher.{name} = {v!r}: must be an int >= 1")
        if not 0.0 <= self.temperature <= 10.0:
            raise ValueError(f"teacher.temperature = {self.temperature!r}: must be in [0, 10] (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"teacher.top_p = {self.top_p!r}: must be in (0, 1]")
        shares = (self.document_share, self.topic_share, self.unconditional_share, self.chat_share)
        if min(shares) < 0 or sum(shares) <= 0:
            raise ValueError(f"teacher shares {shares} (document, topic, unconditional, chat): each must be >= 0 "
                             f"and one > 0")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"teacher.validation_fraction = {self.validation_fraction!r}: must be in [0, 1)")
        if not 0.0 <= self.train_share <= 1.0:
            raise ValueError(f"teacher.train_share = {self.train_share!r}: must be in [0, 1]")
        if self.engine not in TEACHER_ENGINES:
            raise ValueError(f"teacher.engine = {self.engine!r}; allowed: {', '.join(TEACHER_ENGINES)}")


# ---- bld and gkd: the optimizer fields they share ------------------------------------------
MODES = ("decoupled", "coupled", "hybrid")
GKD_PARALLEL = ("auto", "ddp", "fsdp")
ON_POLICY_DIVERGENCES = ("reverse", "forward", "jsd")
AUTOCAST = ("auto", "bf16", "off")


class InertFieldsRepr:
    """A section whose repr (what stage fingerprints hash) leaves out `inert_fields()`: settings
    that change nothing computed, or were added later and still hold the value that reproduces
    the old behaviour, so runs made before them keep their fingerprints. Subclasses are
    dataclasses declared with repr=False."""

    REPR_ORDER: ClassVar[tuple[str, ...]] = ()  # the historical field order, when it differs

    def inert_fields(self) -> tuple[str, ...]:
        return ()

    def __repr__(self) -> str:
        inert = self.inert_fields()
        names = [n for n in self.REPR_ORDER or tuple(f.name for f in fields(self)) if n not in inert]
        return f"{type(self).__qualname__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"


@dataclass(repr=False)
class OptimizerConfig(InertFieldsRepr):
    """AdamW with warmup and cosine decay, checkpoints and autocast: the fields BLD and GKD share."""

    tokens: int = 1_000_000  # training tokens (BLD: seen by each job; GKD: all ranks together)
    batch_size: int = 8  # sequences per step (per rank)
    lr: float = 1e-4
    min_lr_fraction: float = 0.1  # cosine decay ends at lr * this
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    checkpoint_every: int = 100  # steps between checkpoints
    autocast: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | off

    # Stage fingerprints hash a section as its repr, and runs made before this base class existed
    # must keep resuming: each subclass lists every field in its historical order in REPR_ORDER
    # (a test checks).
    # Fields that choose how training runs on the hardware, not what it computes: left out of the
    # repr (so of stage fingerprints) and of checkpoint fingerprints, so changing them redoes
    # nothing and a killed run resumes under the other choice.
    RUN_ONLY: ClassVar[tuple[str, ...]] = ()

    def inert_fields(self) -> tuple[str, ...]:
        """Fields left out of the repr (so of stage fingerprints) and of checkpoint fingerprints:
        RUN_ONLY, plus (subclasses) settings added later while they change nothing, so that runs
        made before them keep their fingerprints."""
        return self.RUN_ONLY

    def validate_optimizer(self, section: str) -> None:
        if self.autocast not in AUTOCAST:
            raise ValueError(f"{section}.autocast = {self.autocast!r}; allowed: {', '.join(AUTOCAST)}")
        if self.tokens < 0 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError(f"{section}.tokens must be >= 0, {section}.batch_size and checkpoint_every >= 1")
        if not (self.lr > 0 and 0 <= self.min_lr_fraction <= 1 and 0 <= self.warmup_fraction < 1):
            raise ValueError(f"{section}.lr must be > 0, min_lr_fraction in [0, 1], warmup_fraction in [0, 1)")
        if len(self.betas) != 2:
            raise ValueError(f"{section}.betas needs two values, e.g. [0.9, 0.95]")


@dataclass(repr=False)
class BLDConfig(OptimizerConfig):
    """How the library's variants are trained (blockwise local distillation)."""

    mode: str = "decoupled"  # decoupled | coupled | hybrid
    # Reduced space for coupled / hybrid: [[attention_variant, ffn_variant], ...] for every layer.
    # Empty with mode=coupled: every pair of the space.
    coupled_pairs: list[list[str]] = field(default_factory=list)
    validation_tokens: int = 32768
    jobs_per_round: int = 0  # 0: all jobs of a rank share each parent forward
    init: str = "parent"  # parent | random (ablation: same shapes, random weights)
    save_dtype: str = "float32"  # float32 | bfloat16
    layers: list[int] | None = None  # train only these layers (None: all)
    # Equal-shape decoupled jobs of different layers trained as one batched job (bld_stacked.py):
    # 0 = auto (on a GPU for models narrower than 2048, groups sized to a quarter of its memory;
    # on the CPU all of one shape), 1 = every job alone, N = at most N jobs per group.
    stack_jobs: int = 0
    REPR_ORDER = ("mode", "coupled_pairs", "tokens", "batch_size", "lr", "min_lr_fraction", "warmup_fraction",
                  "weight_decay", "betas", "grad_clip", "validation_tokens", "checkpoint_every", "jobs_per_round",
                  "init", "autocast", "save_dtype", "layers", "stack_jobs")

    def validate(self) -> None:
        self.validate_optimizer("bld")
        checks = {"mode": (self.mode, MODES), "init": (self.init, ("parent", "random")),
                  "save_dtype": (self.save_dtype, ("float32", "bfloat16"))}
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"bld.{key} = {value!r}; allowed: {', '.join(allowed)}")
        if self.validation_tokens < 1 or self.jobs_per_round < 0 or self.stack_jobs < 0:
            raise ValueError("bld.validation_tokens must be >= 1, jobs_per_round >= 0, stack_jobs >= 0")
        if self.mode == "hybrid" and not self.coupled_pairs:
            raise ValueError("bld.mode = hybrid needs bld.coupled_pairs (the reduced space), e.g. "
                             "[[attn_kv1, ffn_768], [attn_noop, ffn_1536]]")
        for pair in self.coupled_pairs:
            if len(pair) != 2:
                raise ValueError(f"bld.coupled_pairs entry {pair}: give [attention_variant, ffn_variant]")


@dataclass(repr=False)
class GKDConfig(OptimizerConfig):
    """How each assembled child is distilled from the parent (global distillation)."""

    lr: float = 5e-5  # the child starts close to the parent: Adam's first steps move every weight by ~lr
    cosine_weight: float = 1.0  # per-layer hidden-state cosine term
    kl_weight: float = 1.0  # KL(parent || child) on the logits
    lm_loss_weight: float = 0.0  # next-token cross-entropy; off by default (METHOD.md section 7)
    logits_chunk: int = 1024  # token rows of logits materialized at once (per model, fp32 reductions)
    # torch.compile the decoder layers (one graph per block kind) and the KL's per-chunk reduction:
    # auto = on a single CUDA device for runs of >= 4M tokens (falls back to eager, saying so, if
    # compiling fails), on = wherever (a failure is an error), off = eager.
    compile: str = "auto"
    activation_checkpointing: bool = False
    validation_tokens: int = 16384  # held-out tokens on which the GKD loss is reported before / after
    # Share of every batch's rows taken from the parent's own chat transcripts (`data/chat.py`):
    # user requests built from the corpus' training documents, answered by the parent (sampled).
    chat_fraction: float = 0.0
    chat_requests: int = 1024  # transcripts written (once per run, cached in gkd-chat/)
    chat_max_new_tokens: int = 192
    chat_temperature: float = 0.7
    chat_batch_size: int = 128  # requests answered at once
    # Under torchrun: ddp = the child replicated on every rank, its gradients averaged (the parent
    # replicated too); fsdp = the decoder layers of the child and of the parent sharded over the
    # ranks (FSDP2); auto = ddp when the child's training state (16 bytes a parameter: fp32
    # weights, gradients, two Adam moments) plus the parent fit in 60% of one GPU, else fsdp
    # (on the CPU: ddp). The parent is prepared once for every child.
    parallel: str = "auto"
    # On-policy phase (generalized KD): the last on_policy_fraction of GKD's steps, the child
    # samples continuations of prompts from the run's data (openings of its training rows,
    # topic x text-kind seeds of the teacher corpus, chat requests for instruct parents) and is
    # trained on the divergence between parent and child on the generated tokens only. 0 = off.
    on_policy_fraction: float = 0.0
    # reverse = KL(child || parent) (default: mode-seeking, the on-policy distillation literature's
    # choice; on its own samples it pushes the child off continuations the parent would not
    # write, such as a loop), forward = KL(parent || child) (as the off-policy phase), jsd =
    # Jensen-Shannon with beta 0.5 (bounded).
    on_policy_divergence: str = "reverse"
    on_policy_temperature: float = 1.0  # the child's sampling
    on_policy_top_p: float = 0.95
    on_policy_max_new_tokens: int = 96  # per prompt (and never past data.seq_len with the prompt)
    on_policy_prompt_tokens: int = 32  # tokens of a training row's opening used as a prompt
    # Share of the prompts that are chat requests in the parent's chat template, when the parent
    # has one and the GKD mix holds chat rows (gkd.chat_fraction > 0 or a teacher source).
    on_policy_chat_share: float = 0.5
    # Share of every GKD training batch's rows that are teacher text (with a teacher source in
    # data.sources; 0: drawn by their token share, as teacher.train_share 0), for GKD alone:
    # None = teacher.train_share, the share BLD reads too. GKD is where the child learns what it
    # keeps on text of other genres (issue 11), and changing teacher.train_share instead redoes
    # every teacher-dependent stage (library, BLD, scores, search).
    teacher_share: float | None = None
    # False: the token embedding (and the LM head, tied or not) stays the parent's during GKD. The
    # corpus and the teacher text use a fraction of the vocabulary; the rows of the other tokens
    # only decay and drift, and text of other genres reads them (issue 11). Also skips the head's
    # weight gradient (one of the child head's three (N, V) matmuls).
    train_embeddings: bool = True
    REPR_ORDER = ("tokens", "batch_size", "lr", "min_lr_fraction", "warmup_fraction", "weight_decay", "betas",
                  "grad_clip", "cosine_weight", "kl_weight", "lm_loss_weight", "logits_chunk", "compile",
                  "activation_checkpointing", "checkpoint_every", "autocast", "validation_tokens", "chat_fraction",
                  "chat_requests", "chat_max_new_tokens", "chat_temperature", "chat_batch_size", "parallel",
                  "on_policy_fraction", "on_policy_divergence", "on_policy_temperature", "on_policy_top_p",
                  "on_policy_max_new_tokens", "on_policy_prompt_tokens", "on_policy_chat_share", "teacher_share",
                  "train_embeddings")
    RUN_ONLY = ("parallel",)
    ON_POLICY = ("on_policy_fraction", "on_policy_divergence", "on_policy_temperature", "on_policy_top_p",
                 "on_policy_max_new_tokens", "on_policy_prompt_tokens", "on_policy_chat_share")

    def inert_fields(self) -> tuple[str, ...]:
        # With the on-policy phase off its settings change nothing: runs made before it existed
        # keep their stage and checkpoint fingerprints.
        # teacher_share None (teacher.train_share) reproduces the runs made before the field.
        # train_embeddings True (the embedding trained) reproduces the runs made before the field.
        return self.RUN_ONLY + (self.ON_POLICY if not self.on_policy_fraction else ()) + \
            (("teacher_share",) if self.teacher_share is None else ()) + \
            (("train_embeddings",) if self.train_embeddings else ())

    def validate(self) -> None:
        self.validate_optimizer("gkd")
        if self.logits_chunk < 1:
            raise ValueError("gkd.logits_chunk must be >= 1")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"gkd.compile = {self.compile!r}; allowed: auto, on, off")
        if self.parallel not in GKD_PARALLEL:
            raise ValueError(f"gkd.parallel = {self.parallel!r}; allowed: {', '.join(GKD_PARALLEL)}")
        if min(self.cosine_weight, self.kl_weight, self.lm_loss_weight) < 0 or \
                self.cosine_weight + self.kl_weight + self.lm_loss_weight == 0:
            raise ValueError("gkd loss weights must be >= 0 and not all 0")
        if not 0 <= self.chat_fraction <= 1 or min(self.chat_requests, self.chat_max_new_tokens,
                                                   self.chat_batch_size) < 1 or self.chat_temperature <= 0:
            raise ValueError("gkd.chat_fraction in [0, 1]; chat_requests, chat_max_new_tokens, chat_batch_size "
                             ">= 1; chat_temperature > 0")
        if self.teacher_share is not None and not 0.0 <= self.teacher_share <= 1.0:
            raise ValueError(f"gkd.teacher_share = {self.teacher_share!r}: must be in [0, 1] (or null: "
                             f"teacher.train_share)")
        if not 0 <= self.on_policy_fraction <= 1:
            raise ValueError(f"gkd.on_policy_fraction = {self.on_policy_fraction!r}: must be in [0, 1] (0 = off)")
        if self.on_policy_divergence not in ON_POLICY_DIVERGENCES:
            raise ValueError(f"gkd.on_policy_divergence = {self.on_policy_divergence!r}; allowed: "
                             f"{', '.join(ON_POLICY_DIVERGENCES)}")
        if not (0 < self.on_policy_temperature <= 10 and 0 < self.on_policy_top_p <= 1):
            raise ValueError("gkd.on_policy_temperature must be in (0, 10] and gkd.on_policy_top_p in (0, 1]")
        if min(self.on_policy_max_new_tokens, self.on_policy_prompt_tokens) < 1 or \
                not 0 <= self.on_policy_chat_share <= 1:
            raise ValueError("gkd.on_policy_max_new_tokens and on_policy_prompt_tokens must be >= 1, "
                             "on_policy_chat_share in [0, 1]")


# ---- scores -------------------------------------------------------------------------------------
OBJECTIVES = ("kl", "lm_loss")


@dataclass
class ScoringConfig:
    """How library items are scored."""

    tokens: int = 65536  # held-out tokens each item is scored on (validation split)
    batch_size: int = 8
    items_per_pass: int = 8  # items of one layer stacked along the batch
    objective: str = "kl"  # what the search minimizes: kl | lm_loss
    logits_chunk: int = 2048  # rows of (tokens, vocab) logits materialized at a time

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"scoring.objective = {self.objective!r}; allowed: {', '.join(OBJECTIVES)}")
        if min(self.tokens, self.batch_size, self.items_per_pass, self.logits_chunk) < 1:
            raise ValueError("scoring.tokens, batch_size, items_per_pass and logits_chunk must be >= 1")



# ---- costs --------------------------------------------------------------------------------------
@dataclass
class Scenario:
    """A serving scenario: b sequences, N prompt tokens, M generated tokens each."""

    name: str = "b64-p128-g128"
    batch_size: int = 64
    prompt_tokens: int = 128
    generate_tokens: int = 128

    def validate(self) -> None:
        if min(self.batch_size, self.prompt_tokens, self.generate_tokens) < 1:
            raise ValueError(f"scenario {self.name}: batch_size, prompt_tokens, generate_tokens must be >= 1")


@dataclass
class CostConfig:
    """Where and how costs are measured."""

    scenarios: list[Scenario] = field(default_factory=lambda: [Scenario()])
    dtype: str = "bfloat16"  # deployment dtype of weights, activations and KV cache
    iters: int = 20  # timed repetitions (medians reported)
    check_children: int = 2  # random children measured end to end against the sum of their blocks
    stack_layers: int | str = "auto"  # copies of a block timed in a row (see the module docstring)
    calibrate: bool = True  # fold the whole-model check into the table (needs check_children >= 1)
    decode_fills: int = 3  # cache fills at which decode steps are timed, then integrated over the generation
    # A costs.json recorded earlier (an earlier run's costs/costs.json, e.g. measured on the deployment
    # device): used instead of measuring here; the whole-model check still runs, as a report.
    recorded: str | None = None

    def validate(self) -> None:
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"costs.dtype = {self.dtype!r}; allowed: bfloat16, float16, float32")
        if self.stack_layers != "auto" and not (isinstance(self.stack_layers, int) and self.stack_layers >= 1):
            raise ValueError(f"costs.stack_layers = {self.stack_layers!r}; allowed: auto or an int >= 1")
        if not (isinstance(self.decode_fills, int) and self.decode_fills >= 1):
            raise ValueError(f"costs.decode_fills = {self.decode_fills!r}; allowed: an int >= 1 (3 is exact for "
                             f"step costs linear in the fill)")
        names = [s.name for s in self.scenarios]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"costs.scenarios needs at least one scenario and unique names, got {names}")
        for s in self.scenarios:
            s.validate()


# ---- search -------------------------------------------------------------------------------------
METRICS = ("decode", "prefill", "generate")
METHODS = ("mip", "greedy", "random")


@dataclass
class Target:
    """One child to find: budgets that must all hold (unset = no budget)."""

    name: str = "decode-2x"
    # costs scenario name (default: the first), or a list of names: the budgets then hold in each
    # (e.g. 2x decode at batch 1 and at batch 64)
    scenario: str | list[str] | None = None
    # With a scenario list: "all" = the budgets hold in each scenario; "best" = solved in each
    # scenario alone and the lowest summed score kept (the paper's search per batch size: e.g. a
    # throughput and memory budget, with scenarios at batch 64 / 128 / 256).
    scenario_mode: str = "all"
    metric: str = "decode"  # decode (one step) | prefill | generate (prefill + M decode steps)
    speedup: float | None = None  # the parent's time / the child's time, on that metric
    throughput: float | None = None  # tokens/s on that metric (decode: b per step time)
    latency_s: float | None = None  # the metric's time in seconds
    memory_gib: float | None = None  # parameters + KV cache of b x (N + M) tokens
    params: float | None = None  # parameter count
    solutions: int = 1  # diverse solutions (each differs from the earlier ones in >= (1-alpha) L layers)
    # Diverse MIP solutions assembled and scored by their realized KL(parent || child) on held-out
    # tokens; the best becomes the target's one child. Summed replace-1-block scores are a proxy:
    # near-equal sums can hide very different realized damage (benchmarks/RESULTS.md).
    candidates: int = 1

    def validate(self) -> None:
        check_name("search.targets[].name", self.name)
        if self.metric not in METRICS:
            raise ValueError(f"search target {self.name}: metric = {self.metric!r}; allowed: {', '.join(METRICS)}")
        for key in ("speedup", "throughput", "latency_s", "memory_gib", "params"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"search target {self.name}: {key} = {value} must be > 0")
        if isinstance(self.scenario, list) and (not self.scenario or len(set(self.scenario)) != len(self.scenario)):
            raise ValueError(f"search target {self.name}: scenario list {self.scenario} must be non-empty and "
                             f"name each scenario once")
        if self.scenario_mode not in ("all", "best"):
            raise ValueError(f"search target {self.name}: scenario_mode = {self.scenario_mode!r}; allowed: all, best")
        if self.solutions < 1 or self.candidates < 1:
            raise ValueError(f"search target {self.name}: solutions and candidates must be >= 1")
        if self.solutions > 1 and self.candidates > 1:
            raise ValueError(f"search target {self.name}: give solutions (several children) or candidates (one "
                             f"child, the best of several by realized KL), not both")


@dataclass(repr=False)
class SearchConfig(InertFieldsRepr):
    """What the search looks for."""

    # The measure* settings are hashed by the search stage only where it measures (stages/search.py):
    # runs that do not (CPU, or measure off) keep the fingerprints they had before them.
    MEASURE_FIELDS: ClassVar[tuple[str, ...]] = ("measure", "measured_margin", "measure_rounds", "measure_iters")

    targets: list[Target] = field(default_factory=lambda: [Target("decode-1.5x", speedup=1.5),
                                                           Target("decode-2x", speedup=2.0)])
    alpha: float = 0.8  # diversity between a target's solutions
    method: str = "mip"  # mip | greedy | random (the paper's ablations)
    frontier: list[float] = field(default_factory=lambda: [1.25, 1.5, 1.75, 2.0, 2.5, 3.0])  # speedups swept
    time_limit_s: float = 60.0
    # Time budgets (speedup, throughput, latency) are tightened by this fraction, because they
    # are met on *predicted* costs and a child must meet them when *measured*: the block sum
    # predicted speedups to within -2.2%..+1% on the H100 (benchmarks/RESULTS.md).
    # Memory and parameter budgets are exact and get none.
    time_margin: float = 0.03
    # Measured, not only predicted: each target's children (or candidates) built with random weights
    # and timed on the run's device in alternation with the parent (eval's speedup benchmark) before
    # one is chosen. Eligible: those whose measured speed meets every time budget with
    # measured_margin to spare (eval measures again; ~1% apart between two measurements of one
    # architecture on an H200; this one reads ~1% below eval's). When none does, the target is solved again with its time margin
    # raised by the measured shortfall, up to measure_rounds times; then the closest is kept, with a
    # warning. auto: on CUDA (on a CPU one measurement takes minutes; the CPU preset predicts).
    measure: bool | str = "auto"
    measured_margin: float = 0.005
    measure_rounds: int = 2
    measure_iters: int = 6  # timed rounds (eval's throughput benchmark: 6 at least)
    select_tokens: int = 32768  # held-out (validation) tokens on which targets' candidates are compared
    select_batch_size: int = 8
    # A target's candidates compared after a short GKD each (the run's gkd settings, this many tokens,
    # the same batches for every candidate; the child's own GKD still starts from the assembled
    # weights): how well a candidate repairs, not only how much it breaks. 0: compared as assembled.
    select_gkd_tokens: int = 0

    def inert_fields(self) -> tuple[str, ...]:
        return self.MEASURE_FIELDS + (("select_gkd_tokens",) if not self.select_gkd_tokens else ())

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"search.method = {self.method!r}; allowed: {', '.join(METHODS)}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"search.alpha = {self.alpha}: must be in (0, 1]")
        if not (isinstance(self.select_gkd_tokens, int) and self.select_gkd_tokens >= 0):
            raise ValueError(f"search.select_gkd_tokens = {self.select_gkd_tokens!r}: must be an int >= 0")
        if self.select_tokens < 1 or self.select_batch_size < 1:
            raise ValueError("search.select_tokens and search.select_batch_size must be >= 1")
        if not 0 <= self.time_margin < 0.5:
            raise ValueError(f"search.time_margin = {self.time_margin}: must be in [0, 0.5)")
        if self.measure not in (True, False, "auto"):
            raise ValueError(f"search.measure = {self.measure!r}; allowed: auto, true, false")
        if not 0 <= self.measured_margin < 0.2:
            raise ValueError(f"search.measured_margin = {self.measured_margin}: must be in [0, 0.2)")
        if not (isinstance(self.measure_iters, int) and self.measure_iters >= 1):
            raise ValueError(f"search.measure_iters = {self.measure_iters!r}: must be an int >= 1")
        if not (isinstance(self.measure_rounds, int) and self.measure_rounds >= 0):
            raise ValueError(f"search.measure_rounds = {self.measure_rounds!r}: must be an int >= 0")
        if not self.targets:
            raise ValueError("search.targets is empty: give at least one, e.g. [{name: decode-2x, speedup: 2.0}]")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"search.targets names must be unique, got {names}")
        for t in self.targets:
            t.validate()


# =============================================================================================
# Building the problem


# ---- peers --------------------------------------------------------------------------------------
PEER_METHODS = ("shortgpt", "minitron_width", "uniform_kv")


@dataclass(repr=False)
class PeersConfig(InertFieldsRepr):
    """Which peers to build, at every search target or the named ones (none by default: each costs
    one GKD per target)."""

    methods: list[str] = field(default_factory=list)  # any of shortgpt, minitron_width, uniform_kv
    # The search targets (by name) that get peers; empty = every target. Each peer costs one GKD:
    # the GPU preset compares at its hardest target only, to spend the minutes on Puzzle's children.
    targets: list[str] = field(default_factory=list)
    tokens: int = 32768  # held-out (validation) tokens for ShortGPT's Block Influence
    batch_size: int = 8
    # Equal training tokens: Puzzle's blocks and the uniform peers' saw bld.tokens in BLD before
    # GKD; ShortGPT has no block to distill locally, so its GKD gets gkd.tokens + bld.tokens.
    # False: every child gets gkd.tokens (equal GKD tokens only).
    equal_tokens: bool = True

    def inert_fields(self) -> tuple[str, ...]:
        # empty targets = every target, as before the setting existed: runs made then keep their
        # peers and the peers' GKD
        return () if self.targets else ("targets",)

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in PEER_METHODS]
        if bad:
            raise ValueError(f"peers.methods has unknown {bad}; allowed: {', '.join(PEER_METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"peers.methods lists a method twice: {self.methods}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"peers.targets lists a target twice: {self.targets}")
        if self.tokens < 1 or self.batch_size < 1:
            raise ValueError("peers.tokens and peers.batch_size must be >= 1")



# ---- serving ------------------------------------------------------------------------------------
# The runtimes a child is served with; model/info.py's RUNTIMES holds what each one is, and its
# subblock_problems / model_problems what each one can run (the one place for those rules).
SERVING_RUNTIMES = ("vllm", "trtllm", "mlx", "hf")


@dataclass
class ServingConfig:
    """The engine the children are served with: the library holds only blocks it executes, and the
    run's last stage exports every child for it (export-<target>/)."""

    # vllm (default: the engine most users serve with; GQA of any KV-head count, no-op attention,
    # FFN widths ffn_mult expresses, no-op FFN: no linear subblocks) | trtllm | mlx | hf (puzzlenas'
    # own modeling code through transformers / lm-eval: every block puzzlenas builds).
    runtime: str = "vllm"

    def validate(self) -> None:
        if self.runtime not in SERVING_RUNTIMES:
            raise ValueError(f"serving.runtime = {self.runtime!r}; allowed: {', '.join(SERVING_RUNTIMES)}")


def runtime_narrows_library(runtime: str, library: LibraryConfig) -> bool:
    """Whether `runtime` may drop variants that `library` asks for (then the library's fingerprint
    names the runtime; otherwise it stays what it was before `serving` existed, so such runs
    resume). Conservative, config-only: linear subblocks (vLLM never runs them, mlx-lm not in
    biased models), FFN widths that are not multiples of 256 (every runtime but hf reads ffn_mult,
    which expresses exactly the multiples of 256)."""
    if runtime == "hf":
        return False
    linear = (library.attention_linear or library.ffn_linear) and runtime in ("vllm", "mlx")
    odd_widths = bool(library.ffn_sizes) or library.ffn_multiple % 256 != 0
    return linear or odd_widths
