"""The search: one block variant per layer under hardware budgets (METHOD.md section 6).

Independent of models: a `SearchProblem` is a list of layers, each a list of `Choice`s
(name, quality score, named per-layer costs), and a list of linear budget `Constraint`s
over those costs. The caller builds it from replace-1-block scores and measured costs.

The solver is a mixed-integer program (`solve_mip`, scipy's HiGHS): binary x_ij = layer i
takes choice j, sum_j x_ij = 1 per layer, minimize sum score_ij x_ij subject to every budget
row sum_ij (sum_k terms_k costs_ijk) x_ij + fixed <= upper, and, for diversity, at most
floor(alpha L) layers shared with each earlier solution. Every returned architecture is
re-checked in exact float arithmetic (`math.fsum`), never taken on the solver's word.

Budgets no architecture meets raise `InfeasibleBudgetError`, which says for each budget the
best value any architecture reaches (alone, and with the other budgets met) and what to loosen.

Ablations of the paper: `solve_greedy` (greedy swaps until the budgets hold), `solve_random`
(random blocks from the library, best of many feasible draws), and `brute_force` (exact
enumeration, for tests and tiny problems).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import scipy.sparse
from scipy.optimize import Bounds, LinearConstraint, milp

# A budget holds when LHS <= upper + FEASIBILITY_RTOL * scale, scale = max(|upper|, |fixed| +
# sum_i max_j |c_ij|): the solver works to ~1e-7 on scaled rows, so its answers are re-checked
# at this much tighter tolerance (and the MIP re-solved with a tightened row when one fails).
FEASIBILITY_RTOL = 1e-9
# HiGHS's own default relative gap (1e-4) may stop short of the optimum; our objective is
# shifted so the optimum sits near 0 (see `_scaled_objective`), which makes this gap strict.
DEFAULT_MIP_REL_GAP = 1e-6
BRUTE_FORCE_LIMIT = 1_000_000
METHODS = ("mip", "greedy", "random", "brute-force")


class SearchError(RuntimeError):
    """The MIP solver failed for a reason other than infeasible budgets (time limit, numerics)."""


class InfeasibleBudgetError(ValueError):
    """No architecture meets the budgets. The numbers behind the message are attributes:

    upper[name]              the budget (the constraint's upper bound)
    best_alone[name]         the smallest LHS over all architectures (this budget on its own)
    best_given_others[name]  the smallest LHS among architectures meeting every other budget,
                             None when the other budgets cannot all be met together
    violated                 the budgets that cannot be met (alone, or given the others)
    units[name]              the constraint's unit, for messages
    """

    def __init__(self, message: str, *, upper: dict[str, float], best_alone: dict[str, float],
                 best_given_others: dict[str, float | None], violated: list[str], units: dict[str, str]):
        super().__init__(message)
        self.upper = upper
        self.best_alone = best_alone
        self.best_given_others = best_given_others
        self.violated = violated
        self.units = units


class DiversityError(ValueError):
    """The budgets admit architectures, but none differs enough from the earlier solutions."""


# ----------------------------------------------------------------------------------------------
# Data model


@dataclass(frozen=True)
class Choice:
    """One option for one layer."""

    name: str  # e.g. "attn_kv1+ffn_768"
    score: float  # quality loss to minimize (e.g. replace-1-block KL); lower is better
    costs: dict[str, float] = field(default_factory=dict)  # e.g. {"params_bytes": ..., "decode_s/b64": ...}


@dataclass(frozen=True)
class Constraint:
    """A budget: sum_i sum_j (sum_k terms[k] * costs_ij[k]) x_ij + fixed <= upper.

    `terms` is a linear combination of cost keys, e.g. memory at batch 64 and 4096 tokens in GiB:
    {"params_bytes": 1 / 2**30, "kv_bytes_per_token": 64 * 4096 / 2**30}. A throughput target
    T tokens/s at batch b and sequence s is the time budget sum runtime <= b * s / T.
    """

    name: str  # human readable, e.g. "memory at batch 64 (GiB)"
    terms: dict[str, float]
    upper: float  # +inf: no budget (the row is only reported)
    fixed: float = 0.0  # the part no choice changes (embeddings, LM head, ...)
    unit: str = ""  # for messages and tables


@dataclass
class SearchProblem:
    """The choices of every layer and the budgets over them."""

    layers: list[list[Choice]]
    constraints: list[Constraint] = field(default_factory=list)

    def validate(self) -> None:
        """Raise ValueError naming the first malformed layer, choice or constraint."""
        if not self.layers:
            raise ValueError("SearchProblem has no layers; give each layer a list of at least one Choice")
        names = [c.name for c in self.constraints]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"constraint names must be unique; repeated: {dupes}")
        for c in self.constraints:
            if not c.terms:
                raise ValueError(f"constraint {c.name!r} has no terms; give it at least one cost key")
            if math.isnan(c.upper) or c.upper == -math.inf:
                raise ValueError(f"constraint {c.name!r}: upper = {c.upper}; use a number (or +inf for none)")
            bad = {k: v for k, v in c.terms.items() if not math.isfinite(v)}
            if bad or not math.isfinite(c.fixed):
                raise ValueError(f"constraint {c.name!r}: terms and fixed must be finite (got {bad or c.fixed})")
        keys = {k for c in self.constraints for k in c.terms}
        for i, layer in enumerate(self.layers):
            if not layer:
                raise ValueError(f"layer {i} has no choices; every layer needs at least one (e.g. the parent block)")
            for choice in layer:
                if not math.isfinite(choice.score):
                    raise ValueError(f"layer {i} choice {choice.name!r}: score = {choice.score} is not finite; "
                                     "drop the choice or give it a finite (large) score")
                missing = sorted(keys - set(choice.costs))
                if missing:
                    user = next(c.name for c in self.constraints if missing[0] in c.terms)
                    raise ValueError(f"layer {i} choice {choice.name!r} lacks cost {missing[0]!r} used by "
                                     f"constraint {user!r}; give every choice every cost key the constraints "
                                     f"use (0.0 where it has none)")
                bad = {k: choice.costs[k] for k in keys if not math.isfinite(choice.costs[k])}
                if bad:
                    raise ValueError(f"layer {i} choice {choice.name!r}: non-finite costs {bad}")

    @property
    def num_architectures(self) -> int:
        return math.prod(len(layer) for layer in self.layers)

    def constraint(self, name: str) -> Constraint:
        for c in self.constraints:
            if c.name == name:
                return c
        raise KeyError(f"no constraint named {name!r}; the problem has {[c.name for c in self.constraints]}")

    def to_json(self) -> dict:
        return {"layers": [[dataclasses.asdict(c) for c in layer] for layer in self.layers],
                "constraints": [dataclasses.asdict(c) for c in self.constraints]}

    @classmethod
    def from_json(cls, d: dict) -> "SearchProblem":
        return cls(layers=[[Choice(**c) for c in layer] for layer in d["layers"]],
                   constraints=[Constraint(**c) for c in d["constraints"]])


@dataclass
class Solution:
    """One architecture: the chosen index per layer, with its exact objective and budget values."""

    choice_index: list[int]
    names: list[str]
    objective: float  # sum of the chosen scores (math.fsum)
    constraint_values: dict[str, float]  # each constraint's LHS, fixed included (math.fsum)
    method: str  # "mip" | "greedy" | "random" | "brute-force"
    solve_seconds: float
    note: str = ""  # e.g. "time limit: not proven optimal (gap 0.3%)"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict | str) -> "Solution":
        if isinstance(d, str):
            d = json.loads(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        required = fields - {"note"}
        if not required <= set(d) or not set(d) <= fields:
            raise ValueError(f"not a saved Solution: keys {sorted(d)}; expected {sorted(fields)}")
        if d["method"] not in METHODS:
            raise ValueError(f"saved Solution has method {d['method']!r}; known: {', '.join(METHODS)}")
        return cls(choice_index=[int(j) for j in d["choice_index"]], names=list(d["names"]),
                   objective=float(d["objective"]),
                   constraint_values={k: float(v) for k, v in d["constraint_values"].items()},
                   method=d["method"], solve_seconds=float(d["solve_seconds"]), note=d.get("note", ""))


# ----------------------------------------------------------------------------------------------
# The problem as flat arrays: variable v = offsets[i] + j for layer i, choice j


@dataclass
class _Compiled:
    problem: SearchProblem
    offsets: np.ndarray  # (L + 1,) first variable of each layer
    layer_of: np.ndarray  # (n,) layer of each variable
    scores: np.ndarray  # (n,)
    cost: np.ndarray  # (K, n) each constraint's per-layer contribution of each choice
    upper: np.ndarray  # (K,)
    fixed: np.ndarray  # (K,)
    tol: np.ndarray  # (K,) absolute feasibility tolerance of each constraint

    @property
    def L(self) -> int:
        return len(self.offsets) - 1

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.problem.constraints]

    def layer_min(self, values: np.ndarray) -> np.ndarray:
        return np.minimum.reduceat(values, self.offsets[:-1])

    def layer_max(self, values: np.ndarray) -> np.ndarray:
        return np.maximum.reduceat(values, self.offsets[:-1])


def _compile(problem: SearchProblem) -> _Compiled:
    problem.validate()
    sizes = np.array([len(layer) for layer in problem.layers])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    choices = [c for layer in problem.layers for c in layer]
    cost = np.array([[math.fsum(m * ch.costs[k] for k, m in con.terms.items()) for ch in choices]
                     for con in problem.constraints], dtype=float).reshape(len(problem.constraints), len(choices))
    upper = np.array([c.upper for c in problem.constraints], dtype=float)
    fixed = np.array([c.fixed for c in problem.constraints], dtype=float)
    comp = _Compiled(problem, offsets, np.repeat(np.arange(len(sizes)), sizes),
                     np.array([c.score for c in choices], dtype=float), cost, upper, fixed, np.zeros(len(upper)))
    for k in range(len(upper)):
        largest = abs(fixed[k]) + float(comp.layer_max(np.abs(cost[k])).sum())
        comp.tol[k] = FEASIBILITY_RTOL * max(abs(upper[k]) if math.isfinite(upper[k]) else 0.0, largest)
    return comp


def _evaluate(comp: _Compiled, idx: Sequence[int], method: str, seconds: float, note: str = "") -> Solution:
    """The Solution for choice indices `idx`, objective and LHS summed exactly."""
    var = comp.offsets[:-1] + np.asarray(idx, dtype=int)
    values = {name: math.fsum([*comp.cost[k, var].tolist(), float(comp.fixed[k])])
              for k, name in enumerate(comp.names)}
    return Solution(choice_index=[int(j) for j in idx],
                    names=[comp.problem.layers[i][int(j)].name for i, j in enumerate(idx)],
                    objective=math.fsum(comp.scores[var].tolist()), constraint_values=values,
                    method=method, solve_seconds=seconds, note=note)


def _excess(comp: _Compiled, idx: Sequence[int], constraint_ids: Sequence[int] | None = None) -> dict[int, float]:
    """Constraints (by index) that `idx` exceeds beyond tolerance, with the excess (exact sums)."""
    var = comp.offsets[:-1] + np.asarray(idx, dtype=int)
    out = {}
    for k in range(len(comp.upper)) if constraint_ids is None else constraint_ids:
        over = math.fsum([*comp.cost[k, var].tolist(), float(comp.fixed[k]), -float(comp.upper[k])])
        if over > comp.tol[k]:
            out[k] = over
    return out


def evaluate_architectures(problem: SearchProblem, architectures: Sequence[Sequence[int]],
                           method: str) -> list[tuple[Solution, bool]]:
    """Given architectures (choice index per layer): each one's Solution, with exact objective and
    budget values, and whether it meets every budget. For architectures built by a rule, not searched."""
    comp = _compile(problem)
    out = []
    for idx in architectures:
        _check_index(comp, idx, "architecture")
        out.append((_evaluate(comp, idx, method, 0.0), not _excess(comp, idx)))
    return out


def _check_index(comp: _Compiled, idx: Sequence[int], what: str) -> None:
    sizes = np.diff(comp.offsets)
    if len(idx) != comp.L:
        raise ValueError(f"{what} has {len(idx)} choice indices; this problem has {comp.L} layers")
    for i, (j, size) in enumerate(zip(idx, sizes)):
        if not 0 <= int(j) < size:
            raise ValueError(f"{what}: layer {i} takes choice {j}, but it has choices 0..{size - 1}; "
                             f"was it made for another problem?")


# ----------------------------------------------------------------------------------------------
# The MIP


@dataclass
class _MilpResult:
    status: str  # "optimal" | "time-limit" | "infeasible"
    idx: list[int] | None
    note: str = ""


def _scaled_row(comp: _Compiled, k: int) -> tuple[np.ndarray, float, float, bool]:
    """Constraint k as a row with coefficients in [0, 1], its right-hand side and its scale.

    Since each layer takes exactly one choice, subtracting each layer's smallest cost moves a
    constant to the right-hand side; dividing by the largest shifted cost then brings budgets in
    bytes (1e10) and in seconds (1e-3) to the same scale for HiGHS's absolute tolerances.
    Returns (row, rhs, scale, needed); needed is False when no architecture can exceed the budget.
    """
    lo = comp.layer_min(comp.cost[k])
    row = comp.cost[k] - lo[comp.layer_of]
    rhs = float(comp.upper[k]) - float(comp.fixed[k]) - math.fsum(lo.tolist())
    scale = float(row.max())
    if scale <= 0 or not math.isfinite(rhs):
        return row, rhs, 1.0, False
    row, rhs = row / scale, rhs / scale
    return row, rhs, scale, float(comp.layer_max(row).sum()) > rhs


def _scaled_objective(comp: _Compiled, values: np.ndarray) -> np.ndarray:
    # Shift so each layer's best choice costs 0 (the optimum sits near 0, so a relative gap is
    # strict) and scale so the largest per-layer spread is 1 (HiGHS's absolute gap 1e-6 is small).
    shifted = values - comp.layer_min(values)[comp.layer_of]
    spread = float(shifted.max())
    return shifted / spread if spread > 0 else shifted


def _run_milp(comp: _Compiled, objective: np.ndarray, constraint_ids: Sequence[int],
              previous: Sequence[Sequence[int]] = (), alpha: float = 1.0, time_limit: float | None = None,
              mip_rel_gap: float = DEFAULT_MIP_REL_GAP) -> _MilpResult:
    """Minimize `objective` @ x over architectures meeting `constraint_ids` and the diversity rows."""
    L, n = comp.L, len(comp.scores)
    if any(_best_alone(comp, k) > comp.upper[k] + comp.tol[k] for k in constraint_ids):
        return _MilpResult("infeasible", None)  # e.g. a budget no choice changes, already exceeded: no row for it
    # Rows 0..L-1: one choice per layer (== 1); then one row per budget, one per earlier solution.
    rows, cols, data, ub = [comp.layer_of], [np.arange(n)], [np.ones(n)], [1.0] * L

    def add_row(columns: np.ndarray, values: np.ndarray, upper: float) -> int:
        rows.append(np.full(len(columns), len(ub))), cols.append(columns), data.append(values)
        ub.append(upper)
        return len(ub) - 1

    budget_rows: dict[int, tuple[int, float]] = {}  # constraint -> (row, scale)
    for k in constraint_ids:
        row, rhs, scale, needed = _scaled_row(comp, k)
        if needed:  # a constant or never-binding budget needs no row: the exact re-check covers it
            nz = np.flatnonzero(row)
            budget_rows[k] = (add_row(nz, row[nz], rhs), scale)
    shared = math.floor(alpha * L + 1e-9)  # most layers a new solution may share with an old one
    if shared < L:
        for y in previous:
            add_row(comp.offsets[:-1] + np.asarray(y), np.ones(L), shared)
    A = scipy.sparse.csr_array((np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))),
                               shape=(len(ub), n))
    ub_all = np.array(ub, dtype=float)
    lb_all = np.concatenate([np.ones(L), np.full(len(ub) - L, -np.inf)])
    c = _scaled_objective(comp, objective)
    options: dict[str, Any] = {"mip_rel_gap": mip_rel_gap}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    for _attempt in range(4):
        res = milp(c, constraints=LinearConstraint(A, lb_all, ub_all), integrality=np.ones(n),
                   bounds=Bounds(0, 1), options=options)
        if res.status == 2:
            return _MilpResult("infeasible", None)
        if res.x is None:
            raise SearchError(f"HiGHS stopped without an architecture (status {res.status}: {res.message}); "
                              f"give it a longer time_limit (now {time_limit}) or fewer choices")
        idx = _round(comp, res.x)
        excess = _excess(comp, idx, constraint_ids)
        if not excess:
            if res.status == 0:
                return _MilpResult("optimal", idx)
            gap = getattr(res, "mip_gap", None)
            return _MilpResult("time-limit", idx, f"HiGHS stopped early ({res.message.strip()}); not proven "
                               f"optimal" + (f" (gap {gap:.3g})" if gap is not None else ""))
        # HiGHS accepted a row within its own tolerance that the exact sum exceeds: tighten that
        # row by twice the excess and solve again.
        for k, over in excess.items():
            if k in budget_rows:
                rr, scale = budget_rows[k]
                ub_all[rr] -= 2 * over / scale + 1e-12
    raise SearchError(f"HiGHS keeps returning architectures over the budgets {[comp.names[k] for k in excess]} "
                      f"by {list(excess.values())} after tightening them; the budgets sit at the edge of float "
                      f"precision: loosen them slightly")


def _round(comp: _Compiled, x: np.ndarray) -> list[int]:
    """Choice indices from HiGHS's x, after checking it is 0/1 with one choice per layer."""
    xr = np.rint(x)
    worst = float(np.abs(x - xr).max())
    if worst > 1e-5 or xr.min() < 0 or xr.max() > 1:
        raise SearchError(f"HiGHS returned a non-binary x (off by {worst:.3g}); report this problem instance")
    per_layer = np.add.reduceat(xr, comp.offsets[:-1])
    if not np.all(per_layer == 1):
        bad = np.flatnonzero(per_layer != 1)
        raise SearchError(f"HiGHS returned {per_layer[bad].tolist()} choices for layers {bad.tolist()}, not 1")
    chosen = np.flatnonzero(xr > 0.5)
    return (chosen - comp.offsets[comp.layer_of[chosen]]).tolist()


def _previous_indices(comp: _Compiled, previous: Sequence[Solution | Sequence[int]]) -> list[list[int]]:
    out = []
    for p in previous:
        idx = list(p.choice_index) if isinstance(p, Solution) else [int(j) for j in p]
        _check_index(comp, idx, "a previous solution")
        out.append(idx)
    return out


def solve_mip(problem: SearchProblem, previous: Sequence[Solution | Sequence[int]] = (), alpha: float = 0.8,
              time_limit: float | None = None, mip_rel_gap: float = DEFAULT_MIP_REL_GAP) -> Solution:
    """The architecture with the lowest total score that meets every budget (HiGHS MIP).

    previous: earlier solutions (Solution or choice indices); the new one shares at most
    floor(alpha * L) layers with each, i.e. differs in at least ceil((1 - alpha) * L) layers.
    Raises InfeasibleBudgetError when no architecture meets the budgets, DiversityError when
    some do but none differs enough from `previous`, SearchError when HiGHS fails.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha = {alpha}: it is the largest fraction of layers a new solution may share "
                         f"with an earlier one, in [0, 1] (the paper: 0.8)")
    comp = _compile(problem)
    return _solve(comp, _previous_indices(comp, previous), alpha, time_limit, mip_rel_gap)


def _solve(comp: _Compiled, previous: list[list[int]], alpha: float, time_limit: float | None,
           mip_rel_gap: float) -> Solution:
    start = time.perf_counter()
    everything = range(len(comp.upper))
    if _alone_infeasible(comp):  # no MIP needed to know
        raise _infeasible_error(comp, time_limit, mip_rel_gap)
    result = _run_milp(comp, comp.scores, everything, previous, alpha, time_limit, mip_rel_gap)
    if result.status == "infeasible":
        if previous and _run_milp(comp, comp.scores, everything, (), 1.0, time_limit, mip_rel_gap).idx is not None:
            L = comp.L
            need = L - math.floor(alpha * L + 1e-9)
            raise DiversityError(f"the budgets admit architectures, but none differs from each of the "
                                 f"{len(previous)} earlier solutions in >= {need} of {L} layers (alpha = {alpha}); "
                                 f"ask for fewer solutions or raise alpha (let solutions share more layers)")
        raise _infeasible_error(comp, time_limit, mip_rel_gap)
    return _evaluate(comp, result.idx, "mip", time.perf_counter() - start, result.note)


# ----------------------------------------------------------------------------------------------
# Infeasible budgets: what each budget can reach, and what to loosen


def _best_alone(comp: _Compiled, k: int) -> float:
    return math.fsum([*comp.layer_min(comp.cost[k]).tolist(), float(comp.fixed[k])])


def _alone_infeasible(comp: _Compiled) -> bool:
    return any(_best_alone(comp, k) > comp.upper[k] + comp.tol[k] for k in range(len(comp.upper)))


def _fmt(value: float, unit: str) -> str:
    return f"{value:.6g}" + (f" {unit}" if unit else "")


def _infeasible_error(comp: _Compiled, time_limit: float | None, mip_rel_gap: float,
                      prefix: str = "no architecture meets the budgets") -> InfeasibleBudgetError:
    """Measure every budget's best achievable value and explain which ones to loosen."""
    cons = comp.problem.constraints
    alone, given = {}, {}
    for k, con in enumerate(cons):
        alone[con.name] = _best_alone(comp, k)
        others = [o for o in range(len(cons)) if o != k and math.isfinite(comp.upper[o])]
        if not others:
            given[con.name] = alone[con.name]
            continue
        res = _run_milp(comp, comp.cost[k], others, time_limit=time_limit, mip_rel_gap=mip_rel_gap)
        given[con.name] = None if res.idx is None else _evaluate(comp, res.idx, "mip", 0.0).constraint_values[con.name]
    return _explain(comp, alone, given, prefix)


def _explain(comp: _Compiled, alone: dict[str, float], given: dict[str, float | None],
             prefix: str) -> InfeasibleBudgetError:
    """The error for budgets with these best achievable values: which to loosen, and to what."""
    cons = comp.problem.constraints
    lines, violated = [], []
    for k, con in enumerate(cons):
        a, g, limit = alone[con.name], given[con.name], con.upper + comp.tol[k]
        budget = f"{con.name}: budget <= {_fmt(con.upper, con.unit)}"
        if a > limit:
            violated.append(con.name)
            extra = "" if g is None or g == a else f"; with the other budgets met: {_fmt(g, con.unit)}"
            lines.append(f"  - {budget}, but the smallest any architecture reaches is {_fmt(a, con.unit)} (the "
                         f"cheapest choice in every layer){extra}; loosen it to >= {_fmt(max(a, g or a), con.unit)}")
        elif g is not None and g > limit:
            violated.append(con.name)
            lines.append(f"  - {budget}: reachable alone ({_fmt(a, con.unit)}), but with the other budgets met "
                         f"the smallest is {_fmt(g, con.unit)}; loosen it to >= {_fmt(g, con.unit)}, or loosen "
                         f"the others")
    if not violated:  # every budget is reachable given the others, yet not all together (or numerics)
        violated = [c.name for c in cons]
        lines = [f"  - {c.name}: budget <= {_fmt(c.upper, c.unit)}, smallest alone {_fmt(alone[c.name], c.unit)}"
                 + ("" if given[c.name] is None else f", with the others met {_fmt(given[c.name], c.unit)}")
                 for c in cons]
        lines.append("  the budgets conflict jointly: loosen several of them")
    message = (f"{prefix}:\n" + "\n".join(lines) + "\n(loosening a budget means a larger upper bound: more "
               "memory, a lower throughput target, a longer latency)")
    return InfeasibleBudgetError(message, upper={c.name: c.upper for c in cons}, best_alone=alone,
                                 best_given_others=given, violated=violated, units={c.name: c.unit for c in cons})


# ----------------------------------------------------------------------------------------------
# Several solutions, frontiers


def solve_diverse(problem: SearchProblem, n: int, alpha: float = 0.8, time_limit: float | None = None,
                  mip_rel_gap: float = DEFAULT_MIP_REL_GAP) -> list[Solution]:
    """Up to n MIP solutions, each sharing at most floor(alpha L) layers with every earlier one.

    Returns fewer when no further architecture is diverse enough (a warning says so, and the last
    solution's note). Raises InfeasibleBudgetError when not even the first exists.
    """
    if n < 1:
        raise ValueError(f"n = {n}: ask for at least one solution")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha = {alpha} must be in [0, 1] (the paper: 0.8)")
    comp = _compile(problem)
    out: list[Solution] = []
    for _ in range(n):
        try:
            out.append(_solve(comp, [s.choice_index for s in out], alpha, time_limit, mip_rel_gap))
        except DiversityError as err:
            note = f"stopped at {len(out)} of {n} solutions: {err}"
            out[-1].note = "; ".join(filter(None, [out[-1].note, note]))
            warnings.warn(note, stacklevel=2)
            break
    return out


def sweep(problem: SearchProblem, constraint_name: str, uppers: Sequence[float],
          time_limit: float | None = None, mip_rel_gap: float = DEFAULT_MIP_REL_GAP) -> list[Solution | None]:
    """The quality/cost frontier: the MIP solution for each upper bound of one budget (None: infeasible)."""
    problem.constraint(constraint_name)  # a clear KeyError for a wrong name
    out: list[Solution | None] = []
    for upper in uppers:
        constraints = [dataclasses.replace(c, upper=float(upper)) if c.name == constraint_name else c
                       for c in problem.constraints]
        try:
            out.append(solve_mip(SearchProblem(problem.layers, constraints), time_limit=time_limit,
                                 mip_rel_gap=mip_rel_gap))
        except InfeasibleBudgetError:
            out.append(None)
    return out


# ----------------------------------------------------------------------------------------------
# Ablations and exact enumeration


def _violation(comp: _Compiled, lhs: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """Sum over constraints of how far each LHS exceeds its budget, normalized. lhs: (K, ...)."""
    over = np.maximum(lhs - comp.upper.reshape((-1,) + (1,) * (lhs.ndim - 1)), 0.0)
    return (over / norm.reshape((-1,) + (1,) * (lhs.ndim - 1))).sum(axis=0)


def solve_greedy(problem: SearchProblem) -> Solution:
    """Greedy ablation: start from the best-scoring choice per layer, then repeatedly make the one
    swap with the smallest score increase per unit of budget violation removed, until every budget holds.

    Violation = sum over budgets of max(0, LHS - upper) / (the budget's range over architectures).
    Raises InfeasibleBudgetError when no single swap lowers the violation (the message says whether
    the MIP would find a feasible architecture).
    """
    start = time.perf_counter()
    comp = _compile(problem)
    K = len(comp.upper)
    cur = np.array([int(np.argmin(comp.scores[a:b])) for a, b in zip(comp.offsets[:-1], comp.offsets[1:])])
    norm = np.array([float((comp.layer_max(comp.cost[k]) - comp.layer_min(comp.cost[k])).sum()) or 1.0
                     for k in range(K)])
    steps = 0
    while _excess(comp, cur):
        var = comp.offsets[:-1] + cur
        lhs = comp.cost[:, var].sum(axis=1) + comp.fixed  # (K,)
        now = float(_violation(comp, lhs[:, None], norm)[0])
        # LHS after swapping layer i to choice j, for every variable at once: (K, n)
        after = lhs[:, None] - comp.cost[:, var][:, comp.layer_of] + comp.cost
        gain = now - _violation(comp, after, norm)
        loss = comp.scores - comp.scores[var][comp.layer_of]
        ok = gain > 1e-12 * max(now, 1e-300)
        if not ok.any():
            raise _greedy_stuck(comp, cur, steps)
        ratio = np.where(ok, loss / np.where(ok, gain, 1.0), np.inf)
        best = np.flatnonzero(ratio == ratio[ok].min())
        v = int(best[np.argmax(gain[best])])  # ties: remove the most violation
        cur[comp.layer_of[v]] = v - comp.offsets[comp.layer_of[v]]
        steps += 1
    return _evaluate(comp, cur.tolist(), "greedy", time.perf_counter() - start, f"{steps} swaps")


def _greedy_stuck(comp: _Compiled, cur: np.ndarray, steps: int) -> InfeasibleBudgetError:
    over = {comp.names[k]: v for k, v in _excess(comp, cur).items()}
    err = _infeasible_error(comp, None, DEFAULT_MIP_REL_GAP, prefix=(
        f"greedy search stuck after {steps} swaps: no single swap lowers the excess over {over}"))
    if not _alone_infeasible(comp) and _run_milp(comp, comp.scores, range(len(comp.upper))).idx is not None:
        # The budgets are feasible; only the greedy path is not. Keep the numbers, fix the message.
        err.args = (f"greedy search stuck after {steps} swaps (excess over budgets: {over}); the budgets "
                    f"are feasible (solve_mip finds architectures): use solve_mip",)
        err.violated = []
    return err


def solve_random(problem: SearchProblem, seed: int = 0, tries: int = 1000) -> Solution | None:
    """"Random blocks from the library" ablation: `tries` uniformly random architectures, the best
    feasible one (None when none of them meets the budgets)."""
    if tries < 1:
        raise ValueError(f"tries = {tries}: draw at least one architecture")
    start = time.perf_counter()
    comp = _compile(problem)
    rng = np.random.default_rng(seed)
    sizes = np.diff(comp.offsets)
    idx = rng.integers(0, sizes, size=(tries, comp.L))  # uniform over each layer's choices
    var = comp.offsets[:-1] + idx
    lhs = comp.cost[:, var].sum(axis=2) + comp.fixed[:, None]  # (K, tries)
    # A margin of 2 tolerances so the exact re-check below agrees with this vectorized sum.
    feasible = np.all(lhs <= (comp.upper + 2 * comp.tol)[:, None], axis=0)
    objective = comp.scores[var].sum(axis=1)
    for t in np.flatnonzero(feasible)[np.argsort(objective[feasible], kind="stable")]:
        if not _excess(comp, idx[t]):
            return _evaluate(comp, idx[t].tolist(), "random", time.perf_counter() - start,
                             f"best of {int(feasible.sum())} feasible among {tries} random architectures (seed {seed})")
    return None


def brute_force(problem: SearchProblem) -> Solution:
    """The exact optimum by enumerating every architecture (at most 1e6). Raises InfeasibleBudgetError
    (with brute-force best-achievable values) when none meets the budgets."""
    count = problem.num_architectures
    if count > BRUTE_FORCE_LIMIT:
        raise ValueError(f"brute_force: {count:.3g} architectures, over the limit of {BRUTE_FORCE_LIMIT:.0e}; "
                         f"use solve_mip")
    start = time.perf_counter()
    comp = _compile(problem)
    objective, lhs = enumerate_architectures(comp)
    feasible = np.all(lhs <= (comp.upper + comp.tol)[:, None], axis=0)
    if not feasible.any():
        raise _brute_force_infeasible(comp, lhs)
    flat = int(np.flatnonzero(feasible)[np.argmin(objective[feasible])])
    idx = np.unravel_index(flat, tuple(np.diff(comp.offsets)))
    return _evaluate(comp, [int(j) for j in idx], "brute-force", time.perf_counter() - start)


def enumerate_architectures(comp_or_problem: _Compiled | SearchProblem) -> tuple[np.ndarray, np.ndarray]:
    """Objective (N,) and every constraint's LHS (K, N) of all N architectures, in C order of the
    choice indices (layer 0 slowest). For tests and tiny problems only."""
    comp = comp_or_problem if isinstance(comp_or_problem, _Compiled) else _compile(comp_or_problem)
    K = len(comp.upper)
    objective, lhs = np.zeros(()), comp.fixed.copy()  # grow to (J0, J1, ...) and (K, J0, J1, ...)
    for a, b in zip(comp.offsets[:-1], comp.offsets[1:]):
        objective = np.add.outer(objective, comp.scores[a:b])
        lhs = lhs[..., None] + comp.cost[:, a:b].reshape(K, *([1] * (lhs.ndim - 1)), -1)
    return objective.ravel(), lhs.reshape(len(comp.upper), -1)


def _brute_force_infeasible(comp: _Compiled, lhs: np.ndarray) -> InfeasibleBudgetError:
    ok = lhs <= (comp.upper + comp.tol)[:, None]
    alone, given = {}, {}
    for k, name in enumerate(comp.names):
        others = np.all(np.delete(ok, k, axis=0), axis=0)
        alone[name] = float(lhs[k].min())
        given[name] = float(lhs[k][others].min()) if others.any() else None
    return _explain(comp, alone, given, "brute force: no architecture meets the budgets")
