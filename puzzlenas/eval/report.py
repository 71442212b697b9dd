"""The report: what the run produced, at a glance (Markdown + PNG plots).

- frontier.png: measured decode speedup (x) vs retention (y) of every child (and peer), before
  and after GKD; beside it the search's view: predicted speedup vs summed replace-1-block score,
  the best the library reaches (the MIP's frontier sweep) and where each child sits;
- layers.png: which attention and FFN variant each layer of each child got;
- README.md: parent vs children (parameters, KV bytes/token, measured throughput and speedup,
  perplexity, KL, agreement, task accuracies, retention), the search's predictions, and each
  model's greedy completions of the eval prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import atomic_write_text
from ..search import speedup_text


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display here or on servers
    import matplotlib.pyplot as plt

    return plt


PEER_MARKERS = {"shortgpt": ("v", "ShortGPT layer removal, after GKD"),
                "minitron_width": ("D", "Minitron-style uniform FFN width, after GKD"),
                "uniform_kv": ("P", "uniform KV heads, after GKD")}


def _speed_and_retention(res: dict | None) -> tuple[float, float] | None:
    """(measured decode speedup in the first scenario, mean task retention) of one evaluated model."""
    if not res or "speedup" not in res:
        return None
    speed = next(iter(res["speedup"].values()))["decode_step_s"]
    return speed, res["retention"].get("tasks_mean", res["retention"].get("perplexity"))


def frontier_plot(results: dict, records: list[dict], front: list[dict], path: Path,
                  front_key: str | None = None) -> None:
    """Left: measured speedup vs retention of every child. Right (when the search swept a frontier):
    the search's view, predicted speedup vs summed replace-1-block score, the best reachable line and
    where each child (and peer) sits on it."""
    plt = _plt()
    panels = 2 if front and front_key else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.4), squeeze=False)
    ax = axes[0, 0]
    ours = [r for r in records if not r.get("peer")]
    series = [("child", ours, "o", "Puzzle, assembled (after BLD)"), ("gkd", ours, "*", "Puzzle, after GKD")]
    for method, (marker, label) in PEER_MARKERS.items():
        series.append(("gkd", [r for r in records if r.get("peer") == method], marker, label))
    for kind, group, marker, label in series:
        points = [(p, r["target"] if r.get("peer") else r["name"]) for r in group
                  if (p := _speed_and_retention(results.get(f"{kind}-{r['name']}")))]
        if not points:
            continue
        ax.scatter([p[0] for p, _ in points], [p[1] for p, _ in points], marker=marker, s=80, label=label)
        for (x, y), n in points:
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.scatter([1.0], [1.0], marker="s", color="black", label="parent")
    ax.set_xlabel("measured decode speedup over the parent")
    ax.set_ylabel("retention (child / parent)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if panels == 2:
        _search_panel(axes[0, 1], records, front, front_key)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _search_panel(ax, records: list[dict], front: list[dict], key: str) -> None:
    reach = [f for f in front if f["objective"] is not None]
    ax.plot([1.0] + [f["speedup"] for f in reach], [0.0] + [f["objective"] for f in reach], "-", color="gray",
            label="best summed score the library reaches (MIP)")
    for marker, label, group in [("*", "Puzzle", [r for r in records if not r.get("peer")])] + \
            [(m, lab.split(",")[0], [r for r in records if r.get("peer") == method])
             for method, (m, lab) in PEER_MARKERS.items()]:
        points = [(r["predicted_speedup"][key], r["objective"], r["target"]) for r in group
                  if key in r["predicted_speedup"]]
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, s=80, label=label)
            for x, y, n in points:
                ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    metric, scenario = key.split("/", 1)
    ax.set_xlabel(f"predicted {metric.replace('_s', '')} speedup ({scenario})")
    ax.set_ylabel("sum of replace-1-block scores (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


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


def markdown(results: dict, records: list[dict], eval_table: str, config_text: str,
             unreachable: list[dict] = (), gkd_tokens: dict[str, int] | None = None,
             extra: list[str] = ()) -> str:
    lines = ["# puzzlenas report", "", "## Parent vs children", "", "```", eval_table, "```", "",
             "## What the search chose and predicted", ""]
    for r in (r for r in records if not r.get("peer")):
        pred = speedup_text(r["predicted_speedup"])
        measured = results.get(f"gkd-{r['name']}", results.get(f"child-{r['name']}", {})).get("speedup", {})
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
    lines += [""] + peers_markdown(results, records, unreachable, gkd_tokens) + list(extra)
    lines += ["![frontier](frontier.png)", "", "![layers](layers.png)", ""] + samples_markdown(results)
    lines += ["## Config", "", "```yaml",
              config_text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


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


def chat_markdown(results: dict) -> list[str]:
    """Chat quality of every model (instruct parents)."""
    rows = {n: r["chat_quality"] for n, r in results.items() if r.get("chat_quality")}
    if not rows:
        return []
    lines = ["## Chat quality", "", "Greedy answers to fixed prompts through the chat template "
             "(`puzzlenas/eval/chat_quality.py`).", "",
             "| model | empty answers | mean tokens | distinct-2 | longest repeated span (mean / max) | "
             "KL on the parent's answers | agreement |", "|---|---|---|---|---|---|---|"]
    for n, c in rows.items():
        lines.append(f"| {n} | {c['empty_rate']:.2f} | {c['mean_tokens']:.1f} | {c['distinct_2']:.3f} | "
                     f"{c['longest_repeated_span']:.1f} / {c['longest_repeated_span_max']} | {c['kl_to_parent']:.4f} | "
                     f"{c['top1_agreement']:.3f} |")
    return lines + [""]


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


def write_report(run_dir: Path, out: Path, records: list[dict], unreachable: list[dict] = (),
                 front_key: str | None = None) -> Path:
    """records: the children's solutions (Puzzle's, then any peers'); unreachable: peers that could not fit."""
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    front = json.loads((run_dir / "search" / "frontier.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    frontier_plot(results, records, front, out / "frontier.png", front_key)
    layers_plot(records, out / "layers.png")
    gkd_tokens = {}
    for r in records:  # tokens each child was distilled on (history.json of its GKD)
        history = run_dir / f"gkd-{r['name']}" / "history.json"
        if history.is_file():
            gkd_tokens[r["name"]] = json.loads(history.read_text()).get("tokens")
    text = markdown(results, records, (run_dir / "eval" / "table.txt").read_text().rstrip(),
                    (run_dir / "config.yaml").read_text(), unreachable, gkd_tokens,
                    extra=genres_markdown(results) + chat_markdown(results) + passes_markdown(run_dir, records))
    atomic_write_text(out / "README.md", text)
    return out / "README.md"
