"""eval: perplexity, KL, agreement, downstream tasks and throughput of the parent and every child;
speedups against the parent measured in the same process."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import data, peers, search
from .base import RunDir, Stage, content_id
from .common import load_data, read_json, solutions, validation_batches

if TYPE_CHECKING:
    from ..config import RunConfig


def model_names(cfg: RunConfig, run_dir: Path) -> list[str]:
    """The parent, then each child as assembled (eval.before_gkd) and after GKD (those that exist)."""
    kinds = ("child", "gkd") if cfg.eval.before_gkd else ("gkd",)
    names = ["parent"] + [f"{kind}-{r['name']}" for r in solutions(run_dir, cfg) for kind in kinds]
    return [n for n in names if (run_dir / n / "config.json").is_file()]


STAGE = Stage("eval", config=("gkd", "eval", "costs"), upstream=(search.STAGE, peers.STAGE),
              extra_inputs=lambda cfg, run_dir: {n: run_dir / n for n in model_names(cfg, run_dir)},
              checks_own_work=True, all_ranks=True)


def models_of_rank(todo: list[str], rank: int, world: int) -> list[str]:
    """This rank's share of the models to evaluate (todo[0] is the parent, which rank 0 evaluates):
    the children dealt round-robin from rank 1 on, so that rank 0's parent counts as one model.
    Every rank still loads the parent: each child is measured against it (hidden states, chat
    transcripts, throughput in alternation) on the child's own device."""
    children = todo[1:]
    mine = [c for i, c in enumerate(children) if (i + 1) % world == rank]
    return ([todo[0]] if rank == 0 else []) + mine


def run(cfg: RunConfig, run_dir: Path) -> Path:
    """Write eval/results.json and table.txt; each model's results are kept in eval/models/<name>.json
    under a fingerprint of the model, the eval settings and the device, so adding or changing
    children evaluates only those. Under torchrun the models are split over the ranks (each rank
    writes its models' files, on its own GPU); rank 0 writes the tables once every rank is done."""
    import torch

    from ..checkpoint import atomic_write_json, atomic_write_text
    from ..config import config_hash
    from ..dist import barrier, distributed_rank, resolve_device
    from ..eval.metrics import retention

    paths = RunDir(run_dir)
    out = paths.eval
    rank, world = distributed_rank()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "models").mkdir(exist_ok=True)
    barrier(world)
    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.parent_dtype)
    names = model_names(cfg, run_dir)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    genre_fp = genre_texts(cfg)
    model_fp = {n: config_hash({"model": content_id(run_dir / n), "eval": cfg.eval, "costs": cfg.costs,
                                "device": device_name, "parent": content_id(paths.parent),
                                "data": data.STAGE.fingerprint(cfg),  # the test split the metrics are on
                                "genres": genre_fp})
                for n in names}
    results, session_parent = read_kept(out, names, model_fp)
    todo = [n for n in names if n not in results]
    if todo:
        kept = len(names) - len(todo)
        todo = ["parent"] + [n for n in todo if n != "parent"]  # speedups: the parent measured in the same process
        mine = models_of_rank(todo, rank, world)
        print(f"[eval] {len(todo)} of {len(names)} models to evaluate ({kept} kept from eval/models)"
              + (f"; rank {rank}/{world}: {', '.join(mine) or 'none'}" if world > 1 else ""))

        def keep(n: str, r: dict, parent_throughput: dict | None) -> None:  # after each: a killed eval resumes
            atomic_write_json(out / "models" / f"{n}.json", {"fingerprint": model_fp[n], "result": r,
                                                              "parent_throughput": parent_throughput})

        if mine:
            evaluate_models(cfg, run_dir, mine, device, dtype, keep)
    barrier(world)  # every rank's models written
    if rank != 0:
        return out
    results, session_parent = read_kept(out, names, model_fp)
    missing = [n for n in names if n not in results]
    if missing:
        raise RuntimeError(f"eval: no result for {', '.join(missing)} in {out / 'models'} after every rank finished; "
                           f"rerun `puzzlenas run` (eval resumes with the models it lacks)")
    results = {n: results[n] for n in names}
    for n in results:
        if n != "parent":
            results[n]["retention"] = retention(results[n], results["parent"])
            base = session_parent.get(n)
            if cfg.eval.throughput and base:
                results[n]["speedup"] = {
                    s: {k: base[s][k] / results[n]["throughput"][s][k]
                        for k in ("decode_step_s", "prefill_s", "generate_s")}
                    for s in results[n]["throughput"]}
    flag_missed_targets(cfg, run_dir, results)
    atomic_write_json(out / "results.json", results)
    text = eval_table(results) + "".join(f"\n{line}" for line in missed_lines(results))
    atomic_write_text(out / "table.txt", text + "\n")
    print(text)
    STAGE.mark_done(cfg, run_dir, models=len(results))
    return out


def read_kept(out: Path, names: list[str], model_fp: dict[str, str]) -> tuple[dict, dict]:
    """The results kept in eval/models/ that were made from these models and settings, and the
    parent's throughput measured alongside each."""
    results, session_parent = {}, {}
    for n in names:
        cached = read_json(out / "models" / f"{n}.json")
        if cached and cached.get("fingerprint") == model_fp[n]:
            results[n], session_parent[n] = cached["result"], cached.get("parent_throughput")
    return results, session_parent


def evaluate_models(cfg: RunConfig, run_dir: Path, names: list[str], device, dtype,
                    keep: Callable[[str, dict, dict | None], None]) -> None:
    """Metrics, tasks, samples, sizes and throughput of each named model (the parent, when named,
    first); keep(name, result, the parent's throughput measured with it) after each."""
    import torch
    from transformers import AutoTokenizer

    from ..costs import Scenario
    from ..eval.metrics import final_hidden, lm_metrics, sample_completions
    from ..model.inference import measure_generations
    from ..model.info import count_model_params, layer_costs
    from ..model.modeling import DeciLMForCausalLM
    from ..progress import progress
    from ..integrity import load_model_checked

    dataset = load_data(cfg, run_dir, teacher=False)  # the test split never holds teacher text
    batches = validation_batches(dataset, cfg.eval.tokens, cfg.eval.batch_size, split="test")
    tokenizer = AutoTokenizer.from_pretrained(RunDir(run_dir).parent)
    throughput_dtype = getattr(torch, cfg.costs.dtype)
    parent = load_model_checked(RunDir(run_dir).parent, dtype).to(device).eval()
    parent_hidden = [final_hidden(parent, b.to(device)) for b in batches]  # (B, T, C) each, computed once
    genres = GenreEval(cfg, tokenizer, parent, dataset.seq_len)
    chat = ChatQualityEval(cfg, tokenizer, parent, device)
    results = {}
    for n in progress(names, desc="[eval] models", unit="model"):  # one child on the device at a time, next to the parent (large parents fit)
        model = parent if n == "parent" else \
            load_model_checked(run_dir / n, dtype).to(device).eval()
        results[n] = lm_metrics({n: model}, parent, batches, cfg.eval.logits_chunk, parent_hidden)[n]
        if cfg.eval.tasks:
            from ..eval.tasks import evaluate_tasks

            results[n]["tasks"] = evaluate_tasks(model, tokenizer, cfg.eval.tasks, max_examples=cfg.eval.max_examples,
                                                 batch_size=cfg.eval.batch_size, device=device)
        if cfg.eval.genres:
            results[n]["genres"] = genres.measure(model)
        if chat.enabled:
            results[n]["chat_quality"] = chat.measure(model)
        results[n]["samples"] = sample_completions(model, tokenizer, cfg.eval)
        results[n]["params"] = count_model_params(model)
        results[n]["kv_bytes_per_token"] = sum(c.kv_cache_bytes_per_token for c in layer_costs(model.config,
                                                                                                cfg.costs.dtype))
        parent_throughput = results.get("parent", {}).get("throughput")
        if cfg.eval.throughput:
            # A child is timed in alternation with the parent (measure_generations), so that its
            # speedup holds on a busy machine; the parent's own figures are from its timing alone.
            pair = [model] if model is parent else [parent, model]
            for m in pair:
                m.to(throughput_dtype)
            results[n]["throughput"], parent_throughput = {}, {}
            for s in cfg.costs.scenarios:
                s = s if isinstance(s, Scenario) else Scenario(**s)
                runs = measure_generations(pair, s.batch_size, s.prompt_tokens, s.generate_tokens,
                                           iters=cfg.eval.throughput_iters)
                results[n]["throughput"][s.name], parent_throughput[s.name] = runs[-1], runs[0]
            for m in pair:
                m.to(dtype)
        if model is not parent:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"[eval] {n}: perplexity {results[n]['perplexity']:.2f}, KL {results[n]['kl_to_parent']:.4f}")
        keep(n, results[n], parent_throughput)


def genre_texts(cfg: RunConfig) -> dict:
    """What the out-of-genre texts are (their hashes and package versions): part of each model's
    cached result's fingerprint."""
    if not cfg.eval.genres:
        return {}
    from ..eval.genres import genre_fingerprint

    return genre_fingerprint(cfg.eval.genres)


class GenreEval:
    """Out-of-genre metrics of one model at a time; the parent's hidden states computed once."""

    def __init__(self, cfg: RunConfig, tokenizer, parent, seq_len: int):
        import torch

        from ..eval.genres import genre_rows
        from ..eval.metrics import final_hidden

        self.cfg, self.parent = cfg, parent
        device = parent.model.embed_tokens.weight.device
        self.batches, self.parent_hidden = {}, {}
        for genre in cfg.eval.genres:
            rows = torch.from_numpy(genre_rows(genre, tokenizer, seq_len, cfg.eval.genre_tokens).astype("int64"))
            self.batches[genre] = list(rows.split(cfg.eval.batch_size))
            with torch.no_grad():
                self.parent_hidden[genre] = [final_hidden(parent, b.to(device)) for b in self.batches[genre]]

    def measure(self, model) -> dict:
        """{genre: perplexity, kl_to_parent, top1_agreement, loss, tokens}."""
        import torch

        from ..eval.metrics import lm_metrics

        with torch.no_grad():
            return {g: lm_metrics({"m": model}, self.parent, self.batches[g], self.cfg.eval.logits_chunk,
                                  self.parent_hidden[g])["m"] for g in self.batches}


class ChatQualityEval:
    """Chat quality of one model at a time against the parent's greedy answers (computed once):
    instruct parents only (eval.chat_quality: auto / on / off)."""

    def __init__(self, cfg: RunConfig, tokenizer, parent, device):
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if cfg.eval.chat_quality == "on" and not has_template:
            raise ValueError("eval.chat_quality = on, but the parent's tokenizer has no chat template; set it to auto")
        self.enabled = cfg.eval.chat_quality == "on" or (cfg.eval.chat_quality == "auto" and has_template)
        if not self.enabled:
            return
        from ..data.teacher import fast_generate_batch, stop_ids
        from ..eval.chat_quality import CHAT_PROMPTS, chat_answers

        self.cfg, self.tokenizer, self.parent = cfg, tokenizer, parent
        self.prompts = list(CHAT_PROMPTS[:cfg.eval.chat_quality_prompts])
        self.generate = fast_generate_batch  # greedy: the same tokens as the static path, faster
        self.stops = set(stop_ids(parent, tokenizer))
        self.transcripts = chat_answers(parent, tokenizer, self.prompts, cfg.eval.chat_quality_max_new_tokens,
                                        len(self.prompts), generate=self.generate)

    def measure(self, model) -> dict:
        """Empty-answer rate, repetition (distinct n-grams, longest repeated span), KL and top-1
        agreement on the parent's answers, and the answers themselves."""
        import torch

        from ..eval.chat_quality import chat_answers, kl_on_transcripts, repetition_stats

        with torch.no_grad():
            pairs = self.transcripts if model is self.parent else chat_answers(
                model, self.tokenizer, self.prompts, self.cfg.eval.chat_quality_max_new_tokens, len(self.prompts),
                generate=self.generate)
            kl = kl_on_transcripts({"m": model}, self.parent, self.transcripts)["m"]
        answers = [[t for t in a if t not in self.stops] for _, a in pairs]
        texts = [self.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        return {**repetition_stats(answers, empty=[not t.strip() for t in texts]), **kl,
                "answers": dict(zip(self.prompts, texts))}


def genre_table(results: dict) -> str:
    """Per genre: perplexity (and its ratio to the parent's), KL and agreement of every model."""
    genres = [g for g in next((r["genres"] for r in results.values() if r.get("genres")), {})]
    if not genres:
        return ""
    w = max([22, *map(len, results)])
    lines = ["out-of-genre text (genres no training source holds): perplexity (x the parent's) / KL / agreement",
             f"{'model':<{w}} " + " ".join(f"{g:>28}" for g in genres)]
    parent = results.get("parent", {}).get("genres", {})
    for n, r in results.items():
        cells = []
        for g in genres:
            m = r.get("genres", {}).get(g)
            ratio = m["perplexity"] / parent[g]["perplexity"] if m and g in parent else float("nan")
            cells.append(f"{m['perplexity']:>8.2f} ({ratio:4.2f}x) {m['kl_to_parent']:5.3f} {m['top1_agreement']:5.3f}"
                         if m else f"{'-':>28}")
        lines.append(f"{n:<{w}} " + " ".join(f"{c:>28}" for c in cells))
    return "\n".join(lines)


def chat_table(results: dict) -> str:
    """Chat quality of every model: empty answers, repetition, KL on the parent's answers."""
    from ..eval.report import with_se

    if not any(r.get("chat_quality") for r in results.values()):
        return ""
    w = max([22, *map(len, results)])
    lines = ["chat quality (greedy answers to fixed prompts through the chat template)",
             f"{'model':<{w}} {'empty':>6} {'tokens':>7} {'distinct-2 +- se':>16} {'rep. span +- se':>15} "
             f"{'max span':>8} {'KL on parent answers':>20} {'agree':>6}"]
    for n, r in results.items():
        c = r.get("chat_quality")
        if c:
            lines.append(f"{n:<{w}} {c['empty_rate']:>6.2f} {c['mean_tokens']:>7.1f} "
                         f"{with_se(c['distinct_2'], c.get('distinct_2_se'), 3):>16} "
                         f"{with_se(c['longest_repeated_span'], c.get('longest_repeated_span_se'), 1):>15} "
                         f"{c['longest_repeated_span_max']:>8} {c['kl_to_parent']:>20.4f} {c['top1_agreement']:>6.3f}")
    answers = next((c["answers"] for c in (r.get("chat_quality") for r in results.values()) if c), {})
    lines.append(f"{len(answers)} prompts; se: standard error of the mean over the prompts")
    return "\n".join(lines)


def eval_table(results: dict) -> str:
    tasks = sorted({t for r in results.values() for t in r.get("tasks", {})})
    w = max([22, *map(len, results)])
    head = f"{'model':<{w}} {'params':>10} {'KV B/tok':>8} {'ppl':>8} {'KL':>7} {'agree':>6} " + \
        " ".join(f"{t[:14]:>14}" for t in tasks) + \
        f" {'decode tok/s':>12} {'peak GiB':>8} {'decode x':>8} {'retention':>9}"
    lines = [head]
    for n, r in results.items():
        speed = next(iter(r.get("speedup", {}).values()), {}).get("decode_step_s") if n != "parent" else 1.0
        ret = r.get("retention", {}).get("tasks_mean", 1.0 if n == "parent" else None)
        run = next(iter(r.get("throughput", {}).values()), {})  # the first scenario's generation benchmark
        tok_s, peak = run.get("decode_tokens_per_s"), run.get("peak_memory_bytes")
        lines.append(f"{n:<{w}} {r['params'] / 1e6:>9.1f}M {r['kv_bytes_per_token']:>8} {r['perplexity']:>8.2f} "
                     f"{r['kl_to_parent']:>7.4f} {r['top1_agreement']:>6.3f} "
                     + " ".join(f"{r.get('tasks', {}).get(t, {}).get('acc', float('nan')):>14.3f}" for t in tasks)
                     + f" {(f'{tok_s:,.0f}' if tok_s else '-'):>12} {(f'{peak / 2**30:.2f}' if peak else '-'):>8}"
                     + f" {(f'{speed:.2f}x' if speed else '-'):>8} {(f'{ret:.3f}' if ret is not None else '-'):>9}")
    lines.append("ppl / KL / agree: test split; task columns: accuracy; decode tok/s, peak GiB (CUDA only: weights + "
                 "KV cache + work space) and decode x (decode-step speedup over the parent): the generation "
                 "benchmark of the first scenario; retention: mean task-accuracy ratio child / parent")
    parent_tasks = results.get("parent", {}).get("tasks", {})
    if parent_tasks:  # how far apart two models' accuracies must be to mean something
        lines.append("task examples and the parent's standard error: " + ", ".join(
            f"{t} {r['n']} (+-{r['acc_stderr']:.3f})" for t, r in sorted(parent_tasks.items())
            if "n" in r and "acc_stderr" in r))
    extra = [t for t in (genre_table(results), chat_table(results)) if t]
    return "\n\n".join(["\n".join(lines), *extra])


# =============================================================================================
# Targets met or missed when measured
# =============================================================================================
METRIC_KEYS = {"decode": "decode_step_s", "prefill": "prefill_s", "generate": "generate_s"}


def flag_missed_targets(cfg: RunConfig, run_dir: Path, results: dict) -> int:
    """Give every child with a speedup target `missed_targets`: the scenarios where the search
    promised the speedup (predicted >= target) and the measurement fell short; [] = met. Returns
    how many children missed."""
    targets = {t.name: t for t in cfg.search.targets}
    first = cfg.costs.scenarios[0].name
    count = 0
    for record in solutions(run_dir, cfg):
        target = targets.get(record.get("target"))
        if target is None or target.speedup is None:
            continue
        names = [n if n else first for n in ([target.scenario] if not isinstance(target.scenario, list)
                                             else target.scenario)]
        for kind in ("child", "gkd"):
            result = results.get(f"{kind}-{record['name']}")
            if not result or "speedup" not in result:
                continue
            missed = []
            for scenario in names:
                predicted = record.get("predicted_speedup", {}).get(f"{target.metric}_s/{scenario}")
                measured = result["speedup"].get(scenario, {}).get(METRIC_KEYS[target.metric])
                if predicted is None or measured is None or predicted < target.speedup:
                    continue  # not promised here ("best" of several scenarios: another one holds it)
                if measured < target.speedup:
                    missed.append({"target": target.name, "scenario": scenario, "metric": target.metric,
                                   "speedup": target.speedup, "measured": measured, "predicted": predicted})
            result["missed_targets"] = missed
            count += bool(missed)
    return count


def missed_lines(results: dict) -> list[str]:
    """One line per child that missed its target when measured (the run summary prints them)."""
    return [f"MISSED: {name} measured {m['measured']:.2f}x {m['metric']} on {m['scenario']} for target "
            f"{m['target']} ({m['speedup']:g}x; predicted {m['predicted']:.2f}x)"
            for name, r in results.items() if isinstance(r, dict) for m in r.get("missed_targets", [])]
