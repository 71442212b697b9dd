"""The MIP solver (mip.py) against brute force, diversity, the frontier sweep, greedy / random."""

import itertools
import json
import math
from dataclasses import dataclass

import numpy as np
import pytest

from puzzlenas.mip import (Choice, Constraint, DiversityError, InfeasibleBudgetError, SearchProblem, Solution,
                              brute_force, enumerate_architectures, evaluate_architectures, solve_diverse,
                              solve_greedy, solve_mip, solve_random, sweep)

# Cost keys on very different scales, as real ones are (bytes vs seconds).
COST_SCALES = {"params_bytes": 1e9, "kv_bytes_per_token": 1e5, "decode_s": 1e-3}


def lhs(problem: SearchProblem, idx, con: Constraint) -> float:
    """A constraint's LHS computed independently of the module (plain Python, exact sum)."""
    return math.fsum([con.fixed] + [m * problem.layers[i][j].costs[k]
                                    for i, j in enumerate(idx) for k, m in con.terms.items()])


def scale(problem: SearchProblem, con: Constraint) -> float:
    """|upper| + |fixed| + the largest per-layer contribution of each layer: what tolerances scale with."""
    return abs(con.upper) + abs(con.fixed) + sum(
        max(abs(sum(m * c.costs[k] for k, m in con.terms.items())) for c in layer) for layer in problem.layers)


def meets_budgets(problem: SearchProblem, idx) -> bool:
    return all(lhs(problem, idx, c) <= c.upper + 1e-8 * scale(problem, c) for c in problem.constraints)


def random_problem(rng: np.random.Generator, budget_mode: str) -> SearchProblem:
    """2-5 layers of 2-5 choices, 1-3 constraints. Scores on a coarse grid so ties happen.

    budget_mode: "quantile" (a random level between the cheapest and the dearest architecture),
    "exact" (exactly some architecture's LHS: the boundary), "tight" (the first budget exactly at the
    cheapest architecture's LHS: only boundary solutions), "below" (under the cheapest: infeasible).
    """
    L = int(rng.integers(2, 6))
    keys = list(COST_SCALES)
    layers = []
    for i in range(L):
        J = int(rng.integers(2, 6))
        layers.append([Choice(f"l{i}c{j}", float(rng.integers(0, 6)) / 4,
                              {k: float(rng.random() * s) for k, s in COST_SCALES.items()}) for j in range(J)])
    constraints = []
    for k in range(int(rng.integers(1, 4))):
        used = rng.choice(keys, size=int(rng.integers(1, 3)), replace=False)
        terms = {str(key): float(rng.uniform(0.5, 2.0)) / COST_SCALES[key] * 10 ** int(rng.integers(-3, 4))
                 for key in used}
        constraints.append(Constraint(f"budget{k}", terms, upper=math.inf, fixed=float(rng.random()), unit="u"))
    problem = SearchProblem(layers, constraints)
    _, values = enumerate_architectures(problem)
    for k, c in enumerate(constraints):
        lo, hi = values[k].min(), values[k].max()
        if budget_mode == "below" and k == 0:
            upper = lo - 0.1 * (hi - lo) - 1e-3
        elif budget_mode == "tight" and k == 0:
            upper = lo
        elif budget_mode == "exact":
            upper = float(values[k][rng.integers(values.shape[1])])
        else:
            upper = float(lo + rng.uniform(0.2, 1.0) * (hi - lo))
        constraints[k] = Constraint(c.name, c.terms, float(upper), c.fixed, c.unit)
    return problem


@dataclass
class Reference:
    """The truth by plain-Python enumeration, independent of puzzlenas.mip."""

    best: float | None  # the smallest objective among architectures within every budget
    argmins: list[tuple]  # the architectures reaching it (several when scores tie)
    alone: dict[str, float]  # per budget: its smallest LHS over all architectures
    given_others: dict[str, float | None]  # ... over those within every other budget (None: none)


def reference(problem: SearchProblem) -> Reference:
    archs = list(itertools.product(*[range(len(layer)) for layer in problem.layers]))
    cons = problem.constraints
    values = [[lhs(problem, a, c) for c in cons] for a in archs]
    within = [[v <= c.upper + 1e-9 * scale(problem, c) for v, c in zip(vs, cons)] for vs in values]
    objective = [math.fsum(problem.layers[i][j].score for i, j in enumerate(a)) for a in archs]
    feasible = [o for o, ok in zip(objective, within) if all(ok)]
    best = min(feasible) if feasible else None
    argmins = [a for a, o, ok in zip(archs, objective, within) if all(ok) and o == best]
    alone = {c.name: min(vs[k] for vs in values) for k, c in enumerate(cons)}
    given = {c.name: min((vs[k] for vs, ok in zip(values, within) if all(ok[:k] + ok[k + 1:])), default=None)
             for k, c in enumerate(cons)}
    return Reference(best, argmins, alone, given)


INSTANCES = [(seed, mode) for seed in range(8) for mode in ("quantile", "exact", "tight", "below")]


@pytest.mark.parametrize("seed,mode", INSTANCES)
def test_mip_matches_brute_force(seed, mode):
    problem = random_problem(np.random.default_rng(seed), mode)
    ref = reference(problem)
    if ref.best is None:
        for solver in (solve_mip, brute_force):
            with pytest.raises(InfeasibleBudgetError) as info:
                solver(problem)
            err = info.value
            for c in problem.constraints:
                assert err.best_alone[c.name] == pytest.approx(ref.alone[c.name], rel=1e-9, abs=1e-12)
                if ref.given_others[c.name] is None:
                    assert err.best_given_others[c.name] is None
                else:
                    assert err.best_given_others[c.name] == pytest.approx(ref.given_others[c.name], rel=1e-7,
                                                                          abs=1e-12)
            assert err.violated and all(name in str(err) for name in err.violated)
        assert "loosen it to >=" in str(err)
        return
    exact = brute_force(problem)
    assert exact.objective == pytest.approx(ref.best, abs=1e-12) and tuple(exact.choice_index) in ref.argmins
    found = solve_mip(problem)
    assert found.method == "mip" and len(found.choice_index) == len(problem.layers)
    assert found.objective == pytest.approx(ref.best, abs=1e-9)
    assert tuple(found.choice_index) in ref.argmins  # ties: any argmin will do
    assert meets_budgets(problem, found.choice_index) and evaluate_architectures(problem, [found.choice_index], "check")[0][1]
    for c in problem.constraints:
        assert found.constraint_values[c.name] == pytest.approx(lhs(problem, found.choice_index, c), rel=1e-12)
    assert found.names == [problem.layers[i][j].name for i, j in enumerate(found.choice_index)]
    # The ablations never beat the optimum and, when they answer, meet the budgets.
    rand = solve_random(problem, seed=seed, tries=200)
    if rand is not None:
        assert meets_budgets(problem, rand.choice_index) and rand.objective >= exact.objective - 1e-9
    try:
        greedy = solve_greedy(problem)
    except InfeasibleBudgetError as err:  # allowed: greedy can get stuck; it must say the MIP would not
        assert "use solve_mip" in str(err)
    else:
        assert meets_budgets(problem, greedy.choice_index) and greedy.objective >= exact.objective - 1e-9


def test_the_instances_cover_ties_boundaries_and_infeasibility():
    outcomes = {"feasible": 0, "infeasible": 0, "tied": 0, "at the boundary": 0}
    for seed, mode in INSTANCES:
        problem = random_problem(np.random.default_rng(seed), mode)
        ref = reference(problem)
        if ref.best is None:
            outcomes["infeasible"] += 1
            continue
        outcomes["feasible"] += 1
        outcomes["tied"] += len(ref.argmins) > 1
        outcomes["at the boundary"] += any(abs(lhs(problem, a, c) - c.upper) <= 1e-12 * scale(problem, c)
                                           for a in ref.argmins for c in problem.constraints)
    assert outcomes["feasible"] >= 15 and outcomes["infeasible"] >= 6, outcomes
    assert outcomes["tied"] >= 3 and outcomes["at the boundary"] >= 3, outcomes


def budget_problem(L=8, J=6, seed=0, tightness=0.5) -> SearchProblem:
    """Bigger choices cost more and score better; two budgets at `tightness` of their range."""
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(L):
        size = np.sort(rng.random(J))[::-1]
        layers.append([Choice(f"l{i}c{j}", float((1 - size[j]) * rng.uniform(0.5, 2)),
                              {"params_bytes": float(size[j] * 1e9), "decode_s": float(size[j] * 1e-3 + 1e-5)})
                       for j in range(J)])
    cons = [Constraint("memory (GiB)", {"params_bytes": 2.0**-30}, upper=0, fixed=0.5, unit="GiB"),
            Constraint("decode time", {"decode_s": 1.0}, upper=0, unit="s")]
    for k, c in enumerate(cons):
        per_layer = [[sum(m * ch.costs[key] for key, m in c.terms.items()) for ch in layer] for layer in layers]
        lo = c.fixed + sum(min(p) for p in per_layer)
        hi = c.fixed + sum(max(p) for p in per_layer)
        cons[k] = Constraint(c.name, c.terms, lo + tightness * (hi - lo), c.fixed, c.unit)
    return SearchProblem(layers, cons)


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_diverse_solutions_differ_and_are_the_best_diverse_ones(alpha):
    problem = budget_problem(L=6, J=4, seed=1, tightness=0.6)
    L = len(problem.layers)
    solutions = solve_diverse(problem, 4, alpha=alpha)
    assert len(solutions) == 4
    must_differ = math.ceil((1 - alpha) * L - 1e-9)
    objective, values = enumerate_architectures(problem)
    grid = np.array(np.unravel_index(np.arange(objective.size), [len(layer) for layer in problem.layers])).T
    ok = np.all(values <= np.array([c.upper for c in problem.constraints])[:, None] + 1e-12, axis=0)
    for n, s in enumerate(solutions):
        assert meets_budgets(problem, s.choice_index)
        for earlier in solutions[:n]:
            assert sum(a != b for a, b in zip(s.choice_index, earlier.choice_index)) >= must_differ
        # brute force: the best architecture within budget that differs enough from every earlier one
        allowed = ok.copy()
        for earlier in solutions[:n]:
            allowed &= (grid != np.array(earlier.choice_index)).sum(axis=1) >= must_differ
        assert s.objective == pytest.approx(objective[allowed].min(), abs=1e-9)
    assert all(a.objective <= b.objective + 1e-12 for a, b in zip(solutions, solutions[1:]))


def test_diverse_stops_early_with_a_note():
    # Two layers of two choices, alpha 0: each solution must differ from every earlier one in every
    # layer, so only 2 exist.
    layers = [[Choice("a", 0.0, {}), Choice("b", 1.0, {})], [Choice("c", 0.0, {}), Choice("d", 1.0, {})]]
    with pytest.warns(UserWarning, match="stopped at 2 of 5"):
        solutions = solve_diverse(SearchProblem(layers, []), 5, alpha=0.0)
    assert [s.names for s in solutions] == [["a", "c"], ["b", "d"]]
    assert "stopped at 2 of 5" in solutions[-1].note
    with pytest.raises(DiversityError, match="raise alpha"):
        solve_mip(SearchProblem(layers, []), previous=[[0, 0], [1, 1]], alpha=0.0)


def test_infeasible_lone_budget_names_it_with_the_best_achievable_value():
    problem = budget_problem(L=5, J=3, seed=2)
    mem = problem.constraints[0]
    best = mem.fixed + sum(min(c.costs["params_bytes"] for c in layer) for layer in problem.layers) * 2.0**-30
    problem.constraints[0] = Constraint(mem.name, mem.terms, upper=best * 0.9, fixed=mem.fixed, unit="GiB")
    with pytest.raises(InfeasibleBudgetError) as info:
        solve_mip(problem)
    err = info.value
    assert err.violated == ["memory (GiB)"]
    assert err.best_alone["memory (GiB)"] == pytest.approx(best, rel=1e-12)
    assert err.upper["memory (GiB)"] == best * 0.9 and err.units["memory (GiB)"] == "GiB"
    assert f"loosen it to >= {err.best_given_others['memory (GiB)']:.6g} GiB" in str(err)
    assert "decode time" not in str(err).split("\n(")[0]  # the met budget is not blamed


def test_jointly_infeasible_budgets_report_the_minimum_given_the_others():
    # Each layer: a big or a small block. Memory wants small blocks, an "accuracy debt" budget wants
    # big ones; each budget alone is reachable, both together are not.
    layers = [[Choice("big", 0.0, {"mem": 2.0, "debt": 0.0}), Choice("small", 1.0, {"mem": 1.0, "debt": 1.0})]
              for _ in range(4)]
    cons = [Constraint("memory", {"mem": 1.0}, upper=5.0, unit="GB"),
            Constraint("debt", {"debt": 1.0}, upper=1.0, unit="pts")]
    with pytest.raises(InfeasibleBudgetError) as info:
        solve_mip(SearchProblem(layers, cons))
    err = info.value
    assert err.best_alone == {"memory": 4.0, "debt": 0.0}
    assert err.best_given_others == {"memory": 7.0, "debt": 3.0}
    assert sorted(err.violated) == ["debt", "memory"]
    assert "loosen it to >= 7 GB" in str(err) and "loosen it to >= 3 pts" in str(err)


def test_sweep_traces_a_monotone_frontier():
    problem = budget_problem(L=10, J=6, seed=3)
    mem = problem.constraints[0]
    lo = mem.fixed + sum(min(c.costs["params_bytes"] for c in layer) for layer in problem.layers) * 2.0**-30
    hi = mem.fixed + sum(max(c.costs["params_bytes"] for c in layer) for layer in problem.layers) * 2.0**-30
    uppers = list(np.linspace(lo - 0.5, hi + 0.5, 12))
    # loosen the other budget so only memory binds
    problem.constraints[1] = Constraint("decode time", {"decode_s": 1.0}, upper=1.0, unit="s")
    frontier = sweep(problem, "memory (GiB)", uppers)
    assert frontier[0] is None and all(s is not None for s in frontier[1:])
    objectives = [s.objective for s in frontier[1:]]
    assert all(b <= a + 1e-12 for a, b in zip(objectives, objectives[1:]))
    assert objectives[-1] == pytest.approx(sum(min(c.score for c in layer) for layer in problem.layers))
    for u, s in zip(uppers[1:], frontier[1:]):
        assert s.constraint_values["memory (GiB)"] <= u + 1e-9
    with pytest.raises(KeyError, match="no constraint named"):
        sweep(problem, "memory", [1.0])


def test_budgets_at_byte_scale_sit_exactly_at_the_boundary():
    # Costs ~1e10 bytes with a budget equal to one architecture's exact sum: HiGHS's tolerance is
    # on scaled rows; the exact re-check must accept the boundary and reject anything above it.
    rng = np.random.default_rng(7)
    layers = [[Choice(f"l{i}c{j}", float(rng.random()), {"b": float(rng.integers(10**9, 10**10))}) for j in range(5)]
              for i in range(12)]
    target = [int(j) for j in rng.integers(0, 5, size=12)]
    upper = math.fsum(layers[i][j].costs["b"] for i, j in enumerate(target))
    problem = SearchProblem(layers, [Constraint("bytes", {"b": 1.0}, upper=upper, unit="B")])
    found = solve_mip(problem)
    assert found.constraint_values["bytes"] <= upper
    assert found.objective <= math.fsum(layers[i][j].score for i, j in enumerate(target)) + 1e-12
    assert solve_mip(problem, mip_rel_gap=0.0).objective == pytest.approx(found.objective, abs=1e-9)


def test_greedy_and_random_are_feasible_and_no_better_than_the_mip():
    problem = budget_problem(L=20, J=8, seed=4, tightness=0.4)
    best = solve_mip(problem)
    greedy = solve_greedy(problem)
    rand = solve_random(problem, seed=0, tries=5000)
    assert greedy.method == "greedy" and meets_budgets(problem, greedy.choice_index)
    assert greedy.objective >= best.objective - 1e-12
    assert rand is not None and rand.method == "random" and meets_budgets(problem, rand.choice_index)
    assert rand.objective >= best.objective - 1e-12
    tight = budget_problem(L=20, J=8, seed=4, tightness=0.02)
    assert solve_random(tight, seed=0, tries=100) is None


def test_greedy_reports_infeasible_budgets():
    problem = budget_problem(L=4, J=3, seed=5)
    c = problem.constraints[1]
    problem.constraints[1] = Constraint(c.name, c.terms, upper=0.0, unit="s")
    with pytest.raises(InfeasibleBudgetError, match="decode time") as info:
        solve_greedy(problem)
    assert info.value.violated == ["decode time"]


def test_solution_json_round_trip():
    problem = budget_problem(L=4, J=3, seed=6)
    s = solve_mip(problem)
    again = Solution.from_json(json.loads(json.dumps(s.to_json())))
    assert again == s
    assert Solution.from_json(json.dumps(s.to_json())) == s
    with pytest.raises(ValueError, match="not a saved Solution"):
        Solution.from_json({"names": []})
    assert SearchProblem.from_json(json.loads(json.dumps(problem.to_json()))) == problem


def test_bad_problems_fail_with_the_fix():
    good = [Choice("a", 0.0, {"m": 1.0})]
    with pytest.raises(ValueError, match="lacks cost 'm' used by constraint 'mem'"):
        solve_mip(SearchProblem([good, [Choice("b", 0.0, {})]], [Constraint("mem", {"m": 1.0}, 5.0)]))
    with pytest.raises(ValueError, match="layer 1 has no choices"):
        solve_mip(SearchProblem([good, []], []))
    with pytest.raises(ValueError, match="alpha"):
        solve_mip(SearchProblem([good], []), alpha=1.5)
    with pytest.raises(ValueError, match="layer 0 takes choice 3, but it has choices 0..0"):
        solve_mip(SearchProblem([good], []), previous=[[3]])
    big = SearchProblem([[Choice(str(j), 0.0, {}) for j in range(10)] for _ in range(7)], [])
    with pytest.raises(ValueError, match="use solve_mip"):
        brute_force(big)
    assert solve_mip(big).objective == 0.0


def test_dominated_choices_still_serve_diversity():
    # B is worse than A in score and cost, so no optimum takes it, until A is an earlier solution's
    # choice: then B is the cheapest way to differ from it (a dominance pruning must keep it).
    layer = [Choice("A", 0.0, {"m": 1.0}), Choice("B", 1.0, {"m": 2.0}), Choice("C", 2.0, {"m": 3.0})]
    problem = SearchProblem([layer, layer], [Constraint("mem", {"m": 1.0}, upper=10.0)])
    assert solve_mip(problem).names == ["A", "A"]
    again = solve_mip(problem, previous=[[0, 0]], alpha=0.0)
    assert again.names == ["B", "B"] and again.objective == 2.0
    assert [s.names for s in solve_diverse(problem, 3, alpha=0.0)] == [["A", "A"], ["B", "B"], ["C", "C"]]


def test_greedy_stuck_on_feasible_budgets_points_to_the_mip():
    # Greedy starts at (l0c0, l1c1): memory 3 > 2. Its only memory-saving swap (l1 -> c0) moves the
    # excess onto the other budget; the fix needs two swaps at once, (l0c1, l1c0), which the MIP finds.
    layers = [[Choice("l0c0", 0.0, {"a": 1.0, "b": 2.0}), Choice("l0c1", 0.0, {"a": 2.0, "b": 0.0})],
              [Choice("l1c0", 1.0, {"a": 0.0, "b": 1.0}), Choice("l1c1", 0.0, {"a": 2.0, "b": 0.0})]]
    problem = SearchProblem(layers, [Constraint("A", {"a": 1.0}, 2.0), Constraint("B", {"b": 1.0}, 2.0)])
    assert solve_mip(problem).names == ["l0c1", "l1c0"]
    with pytest.raises(InfeasibleBudgetError, match="budgets are feasible .*use solve_mip") as info:
        solve_greedy(problem)
    assert info.value.violated == []


def test_a_budget_no_choice_changes_can_still_be_exceeded():
    # Every choice costs the same "a", so the MIP has no row for it; the diagnosis must still see it.
    layers = [[Choice("x", 0.0, {"a": 1.0, "b": 1.0}), Choice("y", 1.0, {"a": 1.0, "b": 0.0})] for _ in range(3)]
    problem = SearchProblem(layers, [Constraint("A", {"a": 1.0}, 2.0, unit="GB"),
                                     Constraint("B", {"b": 1.0}, 1.0)])
    with pytest.raises(InfeasibleBudgetError) as info:
        solve_mip(problem)
    err = info.value
    assert err.violated == ["A"] and err.best_alone == {"A": 3.0, "B": 0.0}
    assert err.best_given_others == {"A": 3.0, "B": None}
    assert "loosen it to >= 3 GB" in str(err)
