"""The report: what the run produced, at a glance (Markdown + PNG plots).

- frontier.png: measured decode speedup (x) vs quality (y) of every child (and peer), assembled ->
  after GKD: retention (tasks) when tasks were evaluated, KL to the parent always; the speedup
  targets as vertical lines; beside them the search's view: predicted speedup vs summed
  replace-1-block score, the best the library reaches (the MIP's frontier sweep);
- speedups.png: predicted (search, from the cost table) vs measured (eval) speedup per child;
- losses.png: the BLD train loss of every job and the GKD loss of every child, per step;
- layers.png: which attention and FFN variant each layer of each child got;
- README.md: one section per function below (`SECTIONS`, in order): targets met or missed when
  measured, parent vs children, what the search chose, peers, out-of-genre text, chat quality,
  passes over each source, whether the task sizes carry signal, the plots, how to serve each
  child, greedy completions, the config.

Each section is a function `section(ctx) -> list[str]` of Markdown lines (empty: no section), so
sections are added or changed without touching the others.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import atomic_write_text
from ..search import speedup_text

# Target metric -> the measured speedup key of eval/results.json.
MEASURED_KEYS = {"decode": "decode_step_s", "prefill": "prefill_s", "generate": "generate_s"}
SERVING_RUNTIMES = ("vllm", "trtllm", "mlx", "hf")
Z95 = 1.96  # two-sided 95% normal quantile


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display here or on servers
    import matplotlib.pyplot as plt

    return plt


PEER_MARKERS = {"shortgpt": ("v", "ShortGPT layer removal, after GKD"),
                "minitron_width": ("D", "Minitron-style uniform FFN width, after GKD"),
                "uniform_kv": ("P", "uniform KV heads, after GKD")}


@dataclass
class ReportContext:
    """Everything a section reads: the run's artifacts, loaded once."""

    run_dir: Path
    results: dict  # model name -> eval result (eval/results.json without its non-model keys)
    records: list[dict]  # the children's solutions: Puzzle's, then any peers'
    targets: list[dict] = field(default_factory=list)  # search.targets as dicts
    unreachable: list[dict] = field(default_factory=list)
    front: list[dict] = field(default_factory=list)
    front_key: str | None = None
    config_text: str = ""
    gkd_histories: dict[str, dict] = field(default_factory=dict)  # child name -> gkd history.json
    bld_metrics: list[dict] = field(default_factory=list)  # bld/metrics.jsonl rows

    @property
    def ours(self) -> list[dict]:
        return [r for r in self.records if not r.get("peer")]

    def measured(self, name: str) -> tuple[str, dict]:
        """(model name, eval result) of a child: after GKD when it exists, else as assembled."""
        for kind in ("gkd", "child"):
            if f"{kind}-{name}" in self.results:
                return f"{kind}-{name}", self.results[f"{kind}-{name}"]
        return f"gkd-{name}", {}


# =============================================================================================
# Targets met or missed when measured
# =============================================================================================
def target_checks(results: dict, records: list[dict], targets: list[dict]) -> list[dict]:
    """Each Puzzle child's measured speedup against its target's, per scenario the target holds in.

    Returns rows {child, model, target, metric, scenario, wanted, predicted, measured, missed};
    a scenario the eval did not measure is left out. Only `speedup` targets are compared: the
    eval measures speedups against the parent in the same process. Missed = the search promised
    the speedup there (predicted >= target) and the measurement fell short: the eval stage's rule
    (`stages/eval.flag_missed_targets`), applied here to the final child (after GKD)."""
    by_name = {t["name"]: t for t in targets}
    rows = []
    for r in (r for r in records if not r.get("peer")):
        target = by_name.get(r["target"])
        if not target or not target.get("speedup"):
            continue
        model = next((f"{k}-{r['name']}" for k in ("gkd", "child") if f"{k}-{r['name']}" in results), None)
        speedups = (results.get(model) or {}).get("speedup") or {}
        if not speedups:
            continue
        if target.get("scenario_mode") == "best" and r.get("scenario"):
            scenarios = [r["scenario"]]
        elif isinstance(target.get("scenario"), list):
            scenarios = target["scenario"]
        else:
            scenarios = [target.get("scenario") or next(iter(speedups))]
        metric = target.get("metric", "decode")
        for scenario in scenarios:
            value = speedups.get(scenario, {}).get(MEASURED_KEYS[metric])
            if value is None:
                continue
            predicted = r.get("predicted_speedup", {}).get(f"{metric}_s/{scenario}")
            rows.append({"child": r["name"], "model": model, "target": r["target"], "metric": metric,
                         "scenario": scenario, "wanted": float(target["speedup"]), "predicted": predicted,
                         "measured": float(value),
                         "missed": float(value) < float(target["speedup"]) and predicted is not None
                         and predicted >= float(target["speedup"])})
    return rows


def missed_lines(ctx: ReportContext) -> list[str]:
    """One line per target missed when measured (for the run's output and the report)."""
    return [_missed_text(c) for c in target_checks(ctx.results, ctx.records, ctx.targets) if c["missed"]]


def _missed_text(c: dict) -> str:
    return (f"target {c['target']} missed when measured: {c['model']} runs {c['metric']} {c['measured']:.2f}x "
            f"the parent in scenario {c['scenario']}, the target asks {c['wanted']:.2f}x, predicted "
            f"{c['predicted']:.2f}x")


def targets_section(ctx: ReportContext) -> list[str]:
    checks = target_checks(ctx.results, ctx.records, ctx.targets)
    missed = missed_lines(ctx)
    if not checks and not missed:
        return []
    lines = ["## Targets when measured", ""]
    if missed:
        lines += ["**Missed:**", ""] + [f"- **{m}**" for m in missed] + [""]
    else:
        lines += ["Every speedup target is met when measured.", ""]
    lines += ["| child | target | scenario | metric | target speedup | predicted | measured | met |",
              "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        predicted = f"{c['predicted']:.2f}x" if c["predicted"] is not None else "-"
        lines.append(f"| {c['model']} | {c['target']} | {c['scenario']} | {c['metric']} | {c['wanted']:.2f}x | "
                     f"{predicted} | {c['measured']:.2f}x | {'**no**' if c['missed'] else 'yes'} |")
    lines += ["", "Predicted: the search's sum of measured per-block costs; measured: parent time / child time "
              "in the eval stage, same process and inference code. A child slower than predicted points at "
              "costs that do not add up per block on this device (launch overhead, a small model).", ""]
    return lines


# =============================================================================================
# Parent vs children
# =============================================================================================
def _fmt(value, spec: str, suffix: str = "") -> str:
    return f"{format(value, spec)}{suffix}" if isinstance(value, (int, float)) else "-"


def eval_section(ctx: ReportContext) -> list[str]:
    results = ctx.results
    tasks = sorted({t for r in results.values() for t in r.get("tasks", {})})
    head = ["model", "parameters", "KV bytes / token", "perplexity", "KL to parent", "top-1 agreement"] + \
        [f"{t} accuracy" for t in tasks] + ["decode tokens/s", "peak GiB", "decode speedup", "task retention"]
    lines = ["## Parent vs children", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, r in results.items():
        speed = 1.0 if n == "parent" else next(iter(r.get("speedup", {}).values()), {}).get("decode_step_s")
        ret = r.get("retention", {}).get("tasks_mean", 1.0 if n == "parent" and tasks else None)
        run = next(iter(r.get("throughput", {}).values()), {})  # the first scenario's generation benchmark
        peak = run.get("peak_memory_bytes")
        cells = [n, _fmt(r.get("params", 0) / 1e6, ".2f", "M"), _fmt(r.get("kv_bytes_per_token"), ","),
                 _fmt(r.get("perplexity"), ".2f"), _fmt(r.get("kl_to_parent"), ".4f"),
                 _fmt(r.get("top1_agreement"), ".3f")]
        cells += [_fmt(r.get("tasks", {}).get(t, {}).get("acc"), ".3f") for t in tasks]
        cells += [_fmt(run.get("decode_tokens_per_s"), ",.0f"), _fmt(peak / 2**30 if peak else None, ".2f"),
                  _fmt(speed, ".2f", "x"), _fmt(ret, ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    scenario = next((next(iter(r["throughput"])) for r in results.values() if r.get("throughput")), None)
    lines += ["", "Perplexity, KL and agreement on the test split; decode tokens/s, peak GiB (CUDA only: "
              "weights + KV cache + work space) and decode speedup from the generation benchmark"
              + (f" of scenario {scenario}" if scenario else "") + "; task retention: mean task-accuracy "
              "ratio child / parent.", ""]
    return lines


def search_section(ctx: ReportContext) -> list[str]:
    lines = ["## What the search chose and predicted", ""]
    for r in ctx.ours:
        pred = speedup_text(r["predicted_speedup"])
        measured = ctx.measured(r["name"])[1].get("speedup", {})
        meas = ", ".join(f"{s}: decode {v['decode_step_s']:.2f}x, generate {v['generate_s']:.2f}x"
                         for s, v in measured.items())
        lines += [f"- **{r['name']}** (target {r['target']}, {r['method']}, sum of scores {r['objective']:.4f}): "
                  f"predicted {pred}; measured {meas or '-'}"]
        if r.get("scenarios_tried"):
            tried = ", ".join(f"{t['scenario']} {t['objective']:.4f}" if t["objective"] is not None
                              else f"{t['scenario']} infeasible" for t in r["scenarios_tried"])
            lines[-1] += f"; solved in each scenario, kept {r['scenario']} (sums of scores: {tried})"
        if r.get("selected_from"):
            first = r["selected_from"][0]
            lines[-1] += (f"; chosen among {len(r['selected_from'])} diverse candidates by realized KL "
                          f"{r['realized_kl']:.4f} (the lowest-sum candidate's: {first['realized_kl']:.4f})")
    return lines + [""]


def peers_section(ctx: ReportContext) -> list[str]:
    tokens = {n: h.get("tokens") for n, h in ctx.gkd_histories.items()}
    return peers_markdown(ctx.results, ctx.records, ctx.unreachable, tokens)


def peers_markdown(results: dict, records: list[dict], unreachable: list[dict],
                   gkd_tokens: dict[str, int] | None = None) -> list[str]:
    """Per target: Puzzle's child next to each peer built for the same budgets and GKD tokens."""
    peers = [r for r in records if r.get("peer")]
    if not peers and not unreachable:
        return []
    gkd_tokens = gkd_tokens or {}
    lines = ["## Puzzle vs peers at the same budgets", "",
             "Each peer meets the same target on the same measured costs and is trained on as many tokens "
             "(`puzzlenas/peers.py`; GKD tokens per child in the last column). Measured decode speedup, test "
             "perplexity, KL to the parent and mean task retention, before GKD -> after GKD.", "",
             "| target | model | architecture | decode x | ppl | KL | retention | GKD tokens |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(name: str, key: str, fmt: str) -> str:
        before, after = results.get(f"child-{name}", {}), results.get(f"gkd-{name}", {})
        values = []
        for res in (before, after):
            if key == "retention":
                v = res.get("retention", {}).get("tasks_mean")
            elif key == "speed":
                v = (_speed_and_retention(res) or (None,))[0]
            else:
                v = res.get(key)
            values.append(format(v, fmt) if v is not None else "-")
        return " -> ".join(values) if key != "speed" else values[1] + "x"

    for target in dict.fromkeys(r["target"] for r in records):
        group = [r for r in records if r["target"] == target]
        for r in group:
            kind = r.get("peer") or f"puzzle ({r['name']})"
            arch = r.get("description") or f"MIP, sum of scores {r['objective']:.3f}"
            tokens = gkd_tokens.get(r["name"])
            lines.append(f"| {target} | {kind} | {arch} | {cell(r['name'], 'speed', '.2f')} | "
                         f"{cell(r['name'], 'perplexity', '.1f')} | {cell(r['name'], 'kl_to_parent', '.3f')} | "
                         f"{cell(r['name'], 'retention', '.3f')} | {f'{tokens:,}' if tokens else '-'} |")
        for u in (u for u in unreachable if u["target"] == target):
            fastest = u.get("fastest", u.get("closest"))
            why = (f"cannot fit: its fastest ({fastest}) reaches {u['best_speedup']:.2f}x predicted"
                   if "best_speedup" in u else f"cannot fit: closest ({u.get('closest')}) misses "
                   + "; ".join(u.get("missed", [])))
            lines.append(f"| {target} | {u['method']} | {why} | - | - | - | - | - |")
    return lines + [""]


# =============================================================================================
# Out-of-genre text, chat quality, passes over each source (the teacher / genres work)
# =============================================================================================
def genres_section(ctx: ReportContext) -> list[str]:
    return genres_markdown(ctx.results)


def chat_section(ctx: ReportContext) -> list[str]:
    return chat_markdown(ctx.results)


def passes_section(ctx: ReportContext) -> list[str]:
    return passes_markdown(ctx.run_dir, ctx.records)


def genres_markdown(results: dict) -> list[str]:
    """A table per out-of-genre text: perplexity (x the parent's), KL and agreement of every model."""
    genres = list(next((r["genres"] for r in results.values() if r.get("genres")), {}))
    if not genres:
        return []
    lines = ["## Out-of-genre text", "",
             "Text of genres no training source holds (`puzzlenas/eval/genres.py`): what a child keeps of the "
             "parent beyond the corpus it was distilled on.", ""]
    parent = results.get("parent", {}).get("genres", {})
    for g in genres:
        lines += [f"**{g}**", "", "| model | perplexity | x parent | KL to parent | top-1 agreement |",
                  "|---|---|---|---|---|"]
        for n, r in results.items():
            m = r.get("genres", {}).get(g)
            if m:
                ratio = m["perplexity"] / parent[g]["perplexity"] if g in parent else float("nan")
                lines.append(f"| {n} | {m['perplexity']:.2f} | {ratio:.2f}x | {m['kl_to_parent']:.4f} | "
                             f"{m['top1_agreement']:.3f} |")
        lines.append("")
    return lines


def with_se(value: float, se: float | None, digits: int) -> str:
    """"0.664 +- 0.021" (the value alone for results written before standard errors were)."""
    return f"{value:.{digits}f}" + ("" if se is None else f" +- {se:.{digits}f}")


def chat_markdown(results: dict) -> list[str]:
    """Chat quality of every model (instruct parents)."""
    rows = {n: r["chat_quality"] for n, r in results.items() if r.get("chat_quality")}
    if not rows:
        return []
    lines = ["## Chat quality", "", "Greedy answers to fixed prompts through the chat template "
             "(`puzzlenas/eval/chat_quality.py`).", "",
             "| model | empty answers | mean tokens | distinct-2 (+- se) | longest repeated span (mean +- se / max) | "
             "KL on the parent's answers | agreement |", "|---|---|---|---|---|---|---|"]
    for n, c in rows.items():
        lines.append(f"| {n} | {c['empty_rate']:.2f} | {c['mean_tokens']:.1f} | "
                     f"{with_se(c['distinct_2'], c.get('distinct_2_se'), 3)} | "
                     f"{with_se(c['longest_repeated_span'], c.get('longest_repeated_span_se'), 1)} / "
                     f"{c['longest_repeated_span_max']} | {c['kl_to_parent']:.4f} | {c['top1_agreement']:.3f} |")
    prompts = len(next(iter(rows.values())).get("answers", {}))
    return lines + ["", f"{prompts} prompts; se: the standard error of the mean over the prompts.", ""]


def passes_markdown(run_dir: Path, records: list[dict]) -> list[str]:
    """How many passes over each source every stage made (their passes.json / history.json)."""
    found = []
    for stage in ("bld", "scores", "search"):
        path = run_dir / stage / "passes.json"
        if path.is_file():
            found += json.loads(path.read_text())
    for r in records:
        history = run_dir / f"gkd-{r['name']}" / "history.json"
        if history.is_file():
            found += json.loads(history.read_text()).get("passes", [])[:1]
    if not found:
        return []
    lines = ["## Passes over each source", "", "Tokens each stage read from each source / the source's tokens "
             "in that split = passes (training reads are drawn at random: expected counts).", "",
             "| read | split | tokens | source | tokens read | in the split | passes |", "|---|---|---|---|---|---|---|"]
    for p in found:
        for src, (read, n, passes) in p["sources"].items():
            lines.append(f"| {p['what']} | {p['split']} | {p['tokens']:,} | {src} | {read:,} | {n:,} | {passes:.3g} |")
    return lines + [""]


# =============================================================================================
# Whether the task sizes carry signal
# =============================================================================================
def accuracy_interval(acc: float, n: int) -> float:
    """Half-width of the 95% normal interval of an accuracy measured on n examples."""
    return Z95 * math.sqrt(max(acc * (1 - acc), 0.0) / n) if n else float("inf")


def retention_interval(child_acc: float, parent_acc: float, n: int) -> float:
    """Half-width of the 95% interval of child / parent accuracy on the same n examples (delta
    method, the two accuracies taken as independent: wider than a paired test, never narrower)."""
    if not n or parent_acc <= 0:
        return float("inf")
    ratio = child_acc / parent_acc
    rel_var = (child_acc * (1 - child_acc) / n) / max(child_acc, 1e-12) ** 2 + \
        (parent_acc * (1 - parent_acc) / n) / parent_acc ** 2
    return Z95 * ratio * math.sqrt(rel_var) if child_acc > 0 else Z95 * math.sqrt(parent_acc * (1 - parent_acc) / n) / parent_acc


def task_signal_section(ctx: ReportContext) -> list[str]:
    parent_tasks = ctx.results.get("parent", {}).get("tasks", {})
    if not parent_tasks:
        return ["## Do the tasks carry signal?", "",
                "No downstream task was evaluated (`eval.tasks` is empty): retention is judged on perplexity "
                "and KL to the parent alone.", ""]
    lines = ["## Do the tasks carry signal?", "",
             "95% intervals from the number of examples: a child's accuracy within the parent's interval, or a "
             "retention interval that holds 1.0, is no measured loss. The last column is the smallest "
             "accuracy drop these examples can tell from noise (two independent 95% intervals).", "",
             "| task | examples | parent accuracy | ± 95% | chance | parent above chance | smallest visible drop |",
             "|---|---|---|---|---|---|---|"]
    for task, r in sorted(parent_tasks.items()):
        n, acc, chance = r.get("n"), r.get("acc"), r.get("chance")
        if not n or acc is None:
            continue
        half = accuracy_interval(acc, n)
        above = "-" if chance is None else ("yes" if acc - half > chance else "**no**: at chance")
        lines.append(f"| {task} | {n} | {acc:.3f} | {half:.3f} | {_fmt(chance, '.2f')} | {above} | "
                     f"{math.sqrt(2) * half:.3f} |")
    rows = []
    for r in ctx.ours:
        model, res = ctx.measured(r["name"])
        for task, t in sorted(res.get("tasks", {}).items()):
            p = parent_tasks.get(task, {})
            if p.get("acc") and t.get("acc") is not None and t.get("n"):
                ratio = t["acc"] / p["acc"]
                half = retention_interval(t["acc"], p["acc"], t["n"])
                verdict = "no" if ratio - half > 1 or ratio + half < 1 else "yes (no signal)"
                rows.append(f"| {model} | {task} | {ratio:.3f} | {ratio - half:.3f} to {ratio + half:.3f} | {verdict} |")
    if rows:
        lines += ["", "| child | task | retention | 95% interval | holds 1.0 |", "|---|---|---|---|---|"] + rows
    return lines + [""]


# =============================================================================================
# Plots
# =============================================================================================
def _speed_and_retention(res: dict | None) -> tuple[float, float] | None:
    """(measured decode speedup in the first scenario, mean task retention) of one evaluated model."""
    if not res or "speedup" not in res:
        return None
    speed = next(iter(res["speedup"].values()))["decode_step_s"]
    return speed, res["retention"].get("tasks_mean", res["retention"].get("perplexity"))


def place_labels(ax, points: list[tuple[float, float, str]], fontsize: int = 8) -> list:
    """Annotate each (x, y, text) at the first of several offsets whose box overlaps no label
    placed before (greedy, in display space): labels of nearby points do not print over each other."""
    fig = ax.figure
    ax.autoscale_view()  # the final limits, so boxes are where they will be drawn
    renderer = fig.canvas.get_renderer()
    offsets = [(5, 5), (5, -12), (-5, 5), (-5, -12), (8, 14), (8, -22), (-8, 14), (-8, -22), (12, 26), (12, -34)]
    placed, boxes = [], []
    for x, y, text in points:
        ann = None
        for dx, dy in offsets:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                              ha="left" if dx >= 0 else "right")
            box = ann.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(b) for b in boxes):
                break
            ann.remove()
            ann = None
        if ann is None:  # crowded: the last offset, with a leader line
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=offsets[-1], fontsize=fontsize,
                              arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "gray"})
            box = ann.get_window_extent(renderer)
        boxes.append(box)
        placed.append(ann)
    return placed


def _target_lines(ax, targets: list[dict], metric: str = "decode", vertical: bool = True) -> None:
    """A dashed line at each speedup target on `metric`."""
    for i, t in enumerate(x for x in targets if x.get("speedup") and x.get("metric", "decode") == metric):
        line = ax.axvline if vertical else ax.axhline
        line(t["speedup"], color=f"C{(i + 3) % 10}", ls="--", lw=1, label=f"target {t['name']}: {t['speedup']:g}x")


def _quality_panel(ax, ctx: ReportContext, quality: str) -> None:
    """Measured decode speedup vs `quality` (retention or KL) of each child, assembled -> after GKD."""
    ylabel = {"retention": "task retention (child / parent)", "kl": "KL(parent || child), test split"}[quality]

    def y_of(res: dict):
        if quality == "retention":
            return res.get("retention", {}).get("tasks_mean")
        return res.get("kl_to_parent")

    labels = []
    series = [("Puzzle", ctx.ours, "*")] + [(label.split(",")[0], [r for r in ctx.records if r.get("peer") == m], mk)
                                           for m, (mk, label) in PEER_MARKERS.items()]
    for label, group, marker in series:
        after = []
        for r in group:
            pts = []
            for kind in ("child", "gkd"):
                res = ctx.results.get(f"{kind}-{r['name']}")
                speed = (_speed_and_retention(res) or (None,))[0] if res else None
                if speed is not None and y_of(res) is not None:
                    pts.append((speed, y_of(res)))
            if len(pts) == 2:  # assembled -> after GKD
                ax.annotate("", pts[1], pts[0], arrowprops={"arrowstyle": "->", "color": "gray", "lw": 0.8})
                ax.scatter([pts[0][0]], [pts[0][1]], marker="o", facecolors="none", edgecolors="gray", s=40)
            if pts:
                after.append(pts[-1])
                labels.append((*pts[-1], r["target"] if r.get("peer") else r["name"]))
        if after:
            ax.scatter([p[0] for p in after], [p[1] for p in after], marker=marker, s=90, label=f"{label}, after GKD")
    if quality == "retention":
        ax.scatter([1.0], [1.0], marker="s", color="black", label="parent")
    elif labels and all(y > 0 for _, y, _ in labels):
        ax.set_yscale("log")
    ax.scatter([], [], marker="o", facecolors="none", edgecolors="gray", label="assembled, before GKD")
    _target_lines(ax, ctx.targets)
    ax.set_xlabel("measured decode speedup over the parent")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    place_labels(ax, labels)


def frontier_plot(ctx: ReportContext, path: Path) -> None:
    """Quality vs measured speedup (retention when tasks ran, KL always; target lines), and the
    search's view (predicted speedup vs summed score, the best reachable line) when it swept one."""
    plt = _plt()
    qualities = (["retention"] if any(r.get("retention", {}).get("tasks_mean") for r in ctx.results.values())
                 else []) + ["kl"]
    panels = len(qualities) + (1 if ctx.front and ctx.front_key else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.8), squeeze=False)
    for ax, quality in zip(axes[0], qualities):
        _quality_panel(ax, ctx, quality)
    if ctx.front and ctx.front_key:
        _search_panel(axes[0, -1], ctx.records, ctx.front, ctx.front_key)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _search_panel(ax, records: list[dict], front: list[dict], key: str) -> None:
    reach = [f for f in front if f["objective"] is not None]
    ax.plot([1.0] + [f["speedup"] for f in reach], [0.0] + [f["objective"] for f in reach], "-", color="gray",
            label="best summed score the library reaches (MIP)")
    labels = []
    for marker, label, group in [("*", "Puzzle", [r for r in records if not r.get("peer")])] + \
            [(m, lab.split(",")[0], [r for r in records if r.get("peer") == method])
             for method, (m, lab) in PEER_MARKERS.items()]:
        points = [(r["predicted_speedup"][key], r["objective"], r["target"] if r.get("peer") else r["name"])
                  for r in group if key in r["predicted_speedup"]]
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, s=80, label=label)
            labels += points
    metric, scenario = key.split("/", 1)
    ax.set_xlabel(f"predicted {metric.replace('_s', '')} speedup ({scenario})")
    ax.set_ylabel("sum of replace-1-block scores (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    place_labels(ax, labels)


def speedups_plot(ctx: ReportContext, path: Path) -> bool:
    """Predicted (search) vs measured (eval) decode speedup of each child, first scenario; y = x and
    the targets. False (no file) when nothing was measured."""
    points = []
    for r in ctx.ours:
        for kind, marker in (("child", "o"), ("gkd", "*")):
            res = ctx.results.get(f"{kind}-{r['name']}", {})
            for scenario, measured in res.get("speedup", {}).items():
                predicted = r.get("predicted_speedup", {}).get(f"decode_s/{scenario}")
                if predicted is not None:
                    points.append((predicted, measured["decode_step_s"], kind, marker, r["name"], scenario))
                break  # the first scenario
    if not points:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 5.0))
    for kind, marker, label in (("child", "o", "assembled"), ("gkd", "*", "after GKD")):
        pts = [p for p in points if p[2] == kind]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=80, label=label)
    lo = min(0.9, *(min(p[0], p[1]) for p in points))
    hi = max(1.1, *(max(p[0], p[1]) for p in points)) * 1.05
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1, label="measured = predicted")
    _target_lines(ax, ctx.targets, vertical=False)
    ax.set_xlabel(f"predicted decode speedup ({points[0][5]})")
    ax.set_ylabel("measured decode speedup")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    place_labels(ax, [(p[0], p[1], p[4]) for p in points if p[2] == "gkd"] or [(p[0], p[1], p[4]) for p in points])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def losses_plot(ctx: ReportContext, path: Path) -> bool:
    """BLD: each job's train loss per step (attention and FFN jobs in two colors); GKD: each child's
    loss and KL per step. False (no file) when neither was recorded."""
    bld = [m for m in ctx.bld_metrics if len(m.get("loss_curve") or []) > 1]
    gkd = {n: h for n, h in ctx.gkd_histories.items() if len(h.get("steps") or []) > 1}
    if not bld and not gkd:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12.0, 4.4), squeeze=False)
    ax = axes[0, 0]
    for m in bld:
        steps, losses = zip(*m["loss_curve"])
        ax.plot(steps, losses, color="C0" if m["kind"] == "attention" else "C1", lw=0.7, alpha=0.6)
    ax.plot([], [], color="C0", label="attention jobs")
    ax.plot([], [], color="C1", label="FFN and coupled jobs")
    ax.set_title(f"BLD: train loss (normalized MSE) of {len(bld)} jobs" if bld else
                 "BLD: no loss curves recorded (a run from before they were kept)", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("normalized MSE")
    if bld:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[0, 1]
    for i, (name, h) in enumerate(sorted(gkd.items())):
        steps = [s["step"] for s in h["steps"]]
        ax.plot(steps, [s["loss"] for s in h["steps"]], color=f"C{i}", label=f"{name}: loss")
        if all("kl" in s for s in h["steps"]):
            ax.plot(steps, [s["kl"] for s in h["steps"]], color=f"C{i}", ls=":", label=f"{name}: KL")
    ax.set_title("GKD: training loss per step" if gkd else "GKD: no history recorded", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if gkd:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def layers_plot(records: list[dict], path: Path) -> None:
    plt = _plt()
    names = sorted({part for r in records for n in r["names"] for part in n.split("+")})
    colors = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    fig, axes = plt.subplots(len(records), 1, figsize=(10, 1.2 + 1.1 * len(records)), squeeze=False)
    for ax, r in zip(axes[:, 0], records):
        for i, n in enumerate(r["names"]):
            a, f = n.split("+")
            ax.add_patch(plt.Rectangle((i, 1), 0.95, 0.9, color=colors[a]))
            ax.add_patch(plt.Rectangle((i, 0), 0.95, 0.9, color=colors[f]))
        ax.set_xlim(0, len(r["names"]))
        ax.set_ylim(0, 2)
        ax.set_yticks([0.45, 1.45], ["FFN", "attention"])
        ax.set_title(r["name"], fontsize=9, loc="left")
        ax.set_xticks(range(0, len(r["names"]), max(1, len(r["names"]) // 15)))
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[n]) for n in names]
    fig.legend(handles, names, loc="lower center", ncol=min(6, len(names)), fontsize=7)
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plots_section(ctx: ReportContext, plots: list[str]) -> list[str]:
    captions = {"frontier.png": "Quality against measured speedup (dashed: the targets; hollow: assembled, "
                                "arrow to after GKD), and the search's predicted view.",
                "speedups.png": "Predicted against measured decode speedup (dashed: the targets).",
                "losses.png": "BLD train loss per job and GKD loss per child.",
                "layers.png": "The attention and FFN variant of each layer of each child."}
    lines = ["## Plots", ""]
    for name in plots:
        lines += [f"![{name.removesuffix('.png')}]({name})", "", captions.get(name, ""), ""]
    return lines


# =============================================================================================
# How to serve each child
# =============================================================================================
def serving_section(ctx: ReportContext) -> list[str]:
    """Per child and runtime: the folder to export, or why the runtime cannot run it, and the command."""
    from ..export import serving_snippet
    from ..model.info import runtime_support
    from ..model.modeling import DeciLMConfig

    if not ctx.ours:
        return []
    lines = ["## Serve a child", "",
             "For a runtime other than the run's `serving.runtime`, export again with the command given "
             "(`--force` replaces the folder). vLLM and "
             "TensorRT-LLM read the configuration module shipped with the export (`--trust-remote-code`); "
             "mlx-lm reads its own weight names (`--runtime mlx`).", ""]
    for r in ctx.ours:
        model, _ = ctx.measured(r["name"])
        source = ctx.run_dir / model
        if not (source / "config.json").is_file():
            continue
        folder = f"export-{r['name']}"
        support = runtime_support(DeciLMConfig.from_pretrained(source))
        lines += [f"### {r['name']}", "", f"From `{model}/`; the run's export stage (after this report) writes "
                  f"`{folder}/` for its `serving.runtime`.", ""]
        for runtime in SERVING_RUNTIMES:
            problems = support.get(runtime, [])
            if problems:
                lines += [f"- {runtime}: cannot run this child: " + "; ".join(problems), ""]
                continue
            lines += [f"- {runtime} (`puzzlenas export {ctx.run_dir / model} {ctx.run_dir / folder} --runtime {runtime}"
                      " --force`):", "",
                      "```", serving_snippet(runtime, folder), "```", ""]
    return lines


# =============================================================================================
# Completions and config
# =============================================================================================
def samples_section(ctx: ReportContext) -> list[str]:
    return samples_markdown(ctx.results)


def samples_markdown(results: dict) -> list[str]:
    """One table per prompt: each model's greedy completion (newlines flattened)."""
    first = next((r["samples"] for r in results.values() if r.get("samples")), [])
    if not first:
        return []
    lines = ["## Greedy completions", ""]
    for i, sample in enumerate(first):
        kind = "chat" if sample["chat"] else "plain text"
        lines += [f"**{sample['prompt']}** ({kind})", "", "| model | completion |", "|---|---|"]
        for name, r in results.items():
            if len(r.get("samples", [])) > i:
                text = " ".join(r["samples"][i]["completion"].split()).replace("|", "\\|")
                lines.append(f"| {name} | {text} |")
        lines.append("")
    return lines


def config_section(ctx: ReportContext) -> list[str]:
    return ["## Config", "", "```yaml", ctx.config_text.rstrip(), "```", ""]


# The report's sections, in order (plots_section takes the written plots and is placed by write_report).
SECTIONS = (targets_section, eval_section, search_section, peers_section, genres_section, chat_section,
            passes_section, task_signal_section)
TAIL_SECTIONS = (serving_section, samples_section, config_section)


# =============================================================================================
# Entry point
# =============================================================================================
def load_context(run_dir: Path, records: list[dict], unreachable: list[dict] = (), front_key: str | None = None,
                 targets: list[dict] = ()) -> ReportContext:
    raw = json.loads((run_dir / "eval" / "results.json").read_text())
    results = {n: r for n, r in raw.items() if isinstance(r, dict) and "perplexity" in r}
    front_path = run_dir / "search" / "frontier.json"
    histories = {}
    for r in records:
        path = run_dir / f"gkd-{r['name']}" / "history.json"
        if path.is_file():
            histories[r["name"]] = json.loads(path.read_text())
    bld_path = run_dir / "bld" / "metrics.jsonl"
    bld = [json.loads(line) for line in bld_path.read_text().splitlines() if line.strip()] if bld_path.is_file() else []
    config_path = run_dir / "config.yaml"
    return ReportContext(run_dir=run_dir, results=results, records=list(records), targets=list(targets),
                         unreachable=list(unreachable), front=json.loads(front_path.read_text())
                         if front_path.is_file() else [], front_key=front_key,
                         config_text=config_path.read_text() if config_path.is_file() else "",
                         gkd_histories=histories, bld_metrics=bld)


def write_report(run_dir: Path, out: Path, records: list[dict], unreachable: list[dict] = (),
                 front_key: str | None = None, targets: list[dict] = ()) -> Path:
    """records: the children's solutions (Puzzle's, then any peers'); unreachable: peers that could
    not fit; targets: search.targets as dicts (for the missed-target check and the target lines)."""
    ctx = load_context(run_dir, records, unreachable, front_key, targets)
    out.mkdir(parents=True, exist_ok=True)
    frontier_plot(ctx, out / "frontier.png")
    plots = ["frontier.png"]
    for name, draw in (("speedups.png", speedups_plot), ("losses.png", losses_plot)):
        if draw(ctx, out / name):
            plots.append(name)
        elif (out / name).exists():
            (out / name).unlink()  # from an earlier report of other children
    layers_plot(records, out / "layers.png")
    plots.append("layers.png")
    lines = ["# puzzlenas report", ""]
    for section in SECTIONS:
        lines += section(ctx)
    lines += plots_section(ctx, plots)
    for section in TAIL_SECTIONS:
        lines += section(ctx)
    atomic_write_text(out / "README.md", "\n".join(lines).rstrip() + "\n")
    return out / "README.md"
