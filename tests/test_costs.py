"""Static-cache inference path and the cost model built on it."""

import json

import pytest
import torch

from puzzlenas.costs import (CostConfig, Scenario, check_against_whole_models, measure_costs, predicted_costs,
                             subblock_key)
from puzzlenas.model.inference import StaticKVCache, measure_generation, static_forward
from tests.test_child import MIXED_BLOCKS, make_child


def test_static_cache_greedy_equals_dynamic_generate():
    model = make_child()
    prompt = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                  min_new_tokens=8, do_sample=False, pad_token_id=0)
        cache = StaticKVCache(model, batch_size=2, max_len=6 + 8)
        ids = prompt
        logits = static_forward(model, prompt, cache)
        for _ in range(8):
            token = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], 1)
            logits = static_forward(model, token, cache)
    assert torch.equal(ids, expected)
    assert [k.shape[1] for k in cache.k] == [4, 1, 2]  # each GQA layer's own KV heads


def test_static_prefill_logits_match_the_full_forward():
    model = make_child()
    ids = torch.randint(0, 128, (3, 11))
    cache = StaticKVCache(model, 3, 20)
    with torch.no_grad():
        assert torch.allclose(static_forward(model, ids, cache), model(ids).logits[:, -1], atol=1e-5)


def test_measure_generation_reports_consistent_numbers():
    model = make_child()
    r = measure_generation(model, batch_size=2, prompt_tokens=8, generate_tokens=4, iters=2)
    assert r["generate_s"] == pytest.approx(r["prefill_s"] + 4 * r["decode_step_s"])
    assert r["decode_tokens_per_s"] == pytest.approx(2 / r["decode_step_s"])
    assert r["kv_cache_bytes"] == 2 * (4 + 1 + 2) * 16 * 12 * 2 * 4  # (K+V) x heads x D x len x B x fp32


def test_cost_table_and_whole_model_check_on_cpu():
    model = make_child()
    config = model.config
    attention = [b.attention for b in MIXED_BLOCKS]
    ffn = [b.ffn for b in MIXED_BLOCKS]
    cfg = CostConfig(scenarios=[Scenario("tiny", 2, 16, 4)], dtype="float32", iters=3, check_children=0)
    table = measure_costs(config, attention, ffn, cfg, torch.device("cpu"), log=lambda *a: None)
    assert set(table["attention"]) == {subblock_key(a) for a in attention}
    assert table["attention"]["no-op"]["decode_s/tiny"] == 0.0
    assert table["attention"]["gqa kv=1"]["kv_bytes_per_token"] == 2 * 1 * 16 * 4
    assert table["ffn"]["ffn 512"]["params_bytes"] == (3 * 64 * 512 + 64) * 4
    assert table["ffn"]["ffn 512"]["prefill_s/tiny"] > 0
    predicted = predicted_costs(table, MIXED_BLOCKS)
    assert predicted["params_bytes"] == sum(p.numel() for p in model.parameters()) * 4
    rows = check_against_whole_models(config, table, {"child": MIXED_BLOCKS}, cfg, torch.device("cpu"),
                                      log=lambda *a: None)
    assert rows[0]["decode_s"] > 0 and rows[0]["decode_s_predicted"] > 0


def test_blocks_are_timed_as_stacks_of_independent_copies_on_cpu():
    """A block timed alone sits in the CPU's caches; "auto" stacks copies up to the parent's layer bytes."""
    from puzzlenas.model.blocks import AttentionConfig, BlockConfig, FFNConfig
    from puzzlenas.costs import stack_size, time_layer
    from puzzlenas.model.info import attention_params, ffn_params

    config = make_child().config
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    parent_bytes = 4 * sum(attention_params(config, b) + ffn_params(config, b) for b in config.blocks)
    big = BlockConfig(AttentionConfig("no_op"), FFNConfig("gated", 512))
    big_bytes = 4 * ffn_params(config, big)
    auto = CostConfig(dtype="float32")
    copies = stack_size(auto, config, big, cpu)
    assert copies * big_bytes >= parent_bytes > (copies - 1) * big_bytes  # as many bytes as all layers
    small = BlockConfig(AttentionConfig("gqa", 1), FFNConfig("no_op"))
    assert stack_size(auto, config, small, cpu) == 4 * config.num_hidden_layers  # capped
    assert stack_size(auto, config, small, cuda) == 1  # single copies were checked against whole models there
    assert stack_size(CostConfig(stack_layers=5), config, small, cpu) == 5
    with pytest.raises(ValueError, match="stack_layers"):
        CostConfig(stack_layers=0).validate()
    times = time_layer(config, small, Scenario("tiny", 2, 8, 4), torch.float32, cpu, iters=2, copies=3)
    assert times["prefill"] > 0 and times["decode"] > 0


def test_calibration_makes_block_sums_predict_the_checked_whole_models():
    """measured = scale x block sum + offset, fitted on the checked models, folded into the table."""
    from puzzlenas.model.blocks import AttentionConfig, BlockConfig, FFNConfig
    from puzzlenas.costs import calibrate, calibrated_check, fit_line

    s = Scenario("s", 2, 4, 10)

    def entry(prefill, decode):
        return {"params_bytes": 1.0, "kv_bytes_per_token": 0, "prefill_s/s": prefill, "decode_s/s": decode,
                "generate_s/s": prefill + 10 * decode}

    table = {"attention": {"gqa kv=1": entry(2.0, 0.2), "no-op": entry(0.0, 0.0)},
             "ffn": {"ffn 8": entry(1.0, 0.1), "ffn 4": entry(0.5, 0.06)}, "fixed": entry(0.3, 0.05)}
    a, f, f4, noop = AttentionConfig("gqa", 1), FFNConfig("gated", 8), FFNConfig("gated", 4), AttentionConfig("no_op")
    children = {"parent": [BlockConfig(a, f)] * 3, "small": [BlockConfig(noop, f4)] * 3,
                "mixed": [BlockConfig(a, f4), BlockConfig(noop, f), BlockConfig(a, f)]}
    check = []
    for name, blocks in children.items():
        p = predicted_costs(table, blocks)
        check.append({"model": name, "scenario": "s", "prefill_s": 1.1 * p["prefill_s/s"] + 0.4,
                      "prefill_s_predicted": p["prefill_s/s"], "decode_s": 1.25 * p["decode_s/s"] + 0.03,
                      "decode_s_predicted": p["decode_s/s"]})
    fits = calibrate(table, check, [s])
    assert fits["decode_s/s"]["scale"] == pytest.approx(1.25) and fits["decode_s/s"]["offset_s"] == pytest.approx(0.03)
    for r in calibrated_check(table, [{**r, "generate_s": r["prefill_s"] + 10 * r["decode_s"]} for r in check], children):
        assert r["decode_s_calibrated"] == pytest.approx(r["decode_s"])
        assert r["prefill_s_calibrated"] == pytest.approx(r["prefill_s"])
        assert r["generate_s_calibrated"] == pytest.approx(r["generate_s"])  # rebuilt as prefill + M x decode
    assert table["attention"]["no-op"]["decode_s/s"] == 0.0  # nothing costs nothing still
    assert table["uncalibrated"]["ffn"]["ffn 8"]["decode_s/s"] == 0.1  # the raw measurement is kept
    assert fit_line([(1.0, 2.0)]) is None  # one model: no fit
    bad = {"attention": {}, "ffn": {}, "fixed": entry(0.3, 0.05)}
    assert calibrate(bad, [{**check[0], "decode_s": 1.0}, {**check[1], "decode_s": 2.0}], [s]).get("decode_s/s") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_counts_only_the_measured_model():
    model = make_child(seed=0).cuda().eval()
    alone = measure_generation(model, batch_size=2, prompt_tokens=8, generate_tokens=4, iters=2)
    bystander = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # another resident, 256 MiB
    beside = measure_generation(model, batch_size=2, prompt_tokens=8, generate_tokens=4, iters=2)
    del bystander
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert beside["peak_memory_bytes"] == pytest.approx(alone["peak_memory_bytes"], rel=0.05, abs=2**20)
    assert alone["peak_memory_bytes"] >= weights + alone["kv_cache_bytes"]


def test_decode_cost_is_integrated_over_the_fills_of_the_generation():
    from puzzlenas.model.inference import decode_positions, mean_over_fills

    assert decode_positions(128, 1024) == [128, 640, 1151]  # fills of the first, middle and last step
    assert decode_positions(16, 1) == [16] and decode_positions(16, 2, 3) == [16, 17]
    linear = {p: 1.0 + 0.01 * p for p in decode_positions(128, 1024)}
    steps = [1.0 + 0.01 * p for p in range(128, 128 + 1024)]
    assert mean_over_fills(linear) == pytest.approx(sum(steps) / len(steps))  # exact for a linear cost
    assert mean_over_fills({5: 2.0}) == 2.0
    with pytest.raises(ValueError, match="decode_fills"):
        CostConfig(decode_fills=0).validate()


def test_cost_table_records_bytes_read_fills_and_bandwidth():
    from puzzlenas.costs import costs_table, mean_context

    config = make_child().config
    s = Scenario("tiny", 2, 6, 4)
    cfg = CostConfig(scenarios=[s], dtype="float32", iters=2, check_children=0)
    table = measure_costs(config, [b.attention for b in MIXED_BLOCKS], [b.ffn for b in MIXED_BLOCKS], cfg,
                          torch.device("cpu"), log=lambda *a: None)
    kv1 = table["attention"]["gqa kv=1"]
    assert mean_context(s) == 6 + 2.5  # fills 7..10 read
    assert kv1["read_bytes/tiny"] == kv1["params_bytes"] + kv1["kv_bytes_per_token"] * 2 * 8.5
    assert table["attention"]["no-op"]["read_bytes/tiny"] == 0.0
    assert set(table["decode_by_fill"]["attention"]["gqa kv=1"]["tiny"]) == {"6", "8", "9"}
    assert table["device"]["copy_bandwidth_Bps"] > 0
    text = costs_table(table, [])
    assert "copy bandwidth" in text and "GB/s" in text and "of copy" in text


def test_a_recorded_table_is_checked_against_the_library_and_scenarios(tmp_path):
    import json

    from puzzlenas.costs import load_recorded_table
    from puzzlenas.model.blocks import AttentionConfig, FFNConfig
    from tests.conftest import RECORDED_COSTS

    attention = [AttentionConfig("gqa", 2), AttentionConfig("no_op")]
    ffn = [FFNConfig("gated", 96), FFNConfig("no_op")]
    tiny = Scenario("tiny", 2, 16, 8)
    table = load_recorded_table(RECORDED_COSTS, attention, ffn, [tiny])
    assert [s["name"] for s in table["device"]["scenarios"]] == ["tiny"]
    assert not any(k.endswith("/wide") for k in table["fixed"])  # reduced to the asked scenarios
    predicted_costs(table, [])  # every kept key is priced
    with pytest.raises(ValueError, match="ffn ffn 64.*remove costs.recorded"):
        load_recorded_table(RECORDED_COSTS, attention, [FFNConfig("gated", 64)], [tiny])
    with pytest.raises(ValueError, match="scenario tiny with other sizes"):
        load_recorded_table(RECORDED_COSTS, attention, ffn, [Scenario("tiny", 3, 16, 8)])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot be read"):
        load_recorded_table(str(tmp_path / "bad.json"), attention, ffn, [tiny])
    assert json.loads(open(RECORDED_COSTS).read())["device"]["name"]


def test_costs_and_the_whole_model_check(finished_run):
    table = json.loads((finished_run / "costs" / "costs.json").read_text())
    assert table["device"]["scenarios"][0]["name"] == "tiny"
    assert table["attention"]["no-op"]["decode_s/tiny"] == 0.0
    check = json.loads((finished_run / "costs" / "check.json").read_text())
    assert {r["model"] for r in check} == {"parent", "random-0"}


# ---- timing on a shared machine: interleaved rounds, trimmed statistics --------------------------
def test_interleaved_timing_keeps_ratios_through_a_burst_of_load(monkeypatch):
    """A fake clock: `a` costs 1 s and `b` 2 s, calls repeated to fill a sample, and every call
    made during one round pays a burst of 100 s (another process took the CPU). Each round samples
    both (order rotated), and the trimmed mean drops the burst: b / a stays 2."""
    from puzzlenas.model import inference

    clock, calls = [0.0], []
    monkeypatch.setattr(inference.time, "perf_counter", lambda: clock[0])

    def timed(name, cost):
        def fn():
            calls.append(name)
            clock[0] += cost + (100.0 if 10 < len(calls) <= 14 else 0.0)  # the third round's calls
        return fn

    a, b = inference.time_interleaved([timed("a", 1.0), timed("b", 2.0)], torch.device("cpu"), iters=8,
                                      warmup=1, calls_per_sample=2)
    assert b / a == pytest.approx(2.0) and a == pytest.approx(1.0)
    timed_calls = calls[2:]  # after one warm-up call each
    assert timed_calls[:4] == ["a", "a", "b", "b"] and timed_calls[4:8] == ["b", "b", "a", "a"]  # rotated


def test_small_functions_get_more_calls_per_sample(monkeypatch):
    from puzzlenas.model import inference

    clock = [0.0]
    monkeypatch.setattr(inference.time, "perf_counter", lambda: clock[0])

    def costs(seconds):
        def fn():
            clock[0] += seconds
        return fn

    assert inference._calls_for(costs(1e-4), torch.device("cpu")) == 50  # 5 ms / 0.1 ms
    assert inference._calls_for(costs(1.0), torch.device("cpu")) == 1
    assert inference.trimmed_mean([1.0, 1.0, 1.0, 50.0]) == 1.0 and inference.trimmed_mean([3.0, 1.0]) == 2.0


def test_other_processes_load_is_the_machines_busy_time_less_this_process(tmp_path):
    """OtherLoad: (machine busy ticks - own CPU time) / all ticks between start and share();
    the warning names the fix only from OTHER_LOAD_WARNING on."""
    from puzzlenas.costs import OTHER_LOAD_WARNING, OtherLoad, other_load_warning

    stat = tmp_path / "stat"

    def write(user, idle, iowait=0):  # cpu user nice system idle iowait irq softirq steal
        stat.write_text(f"cpu  {user} 0 0 {idle} {iowait} 0 0 0 0 0\ncpu0 1 2 3 4\n")

    own = iter([10.0, 14.0])  # seconds of this process: 4 s = 400 ticks at 100 Hz
    write(1000, 5000)
    load = OtherLoad(str(stat), own=lambda: next(own), ticks_per_second=100)
    write(1000 + 900, 5000 + 900, iowait=200)  # 2,000 ticks: 900 busy (400 ours), 1,100 idle or iowait
    assert load.share() == pytest.approx(500 / 2000)
    assert "25% of the CPU" in other_load_warning(0.25) and "--force costs" in other_load_warning(0.25)
    assert other_load_warning(OTHER_LOAD_WARNING - 0.01) is None and other_load_warning(None) is None
    stat.write_text("garbage")
    assert OtherLoad(str(stat), own=lambda: 0.0).share() is None  # unreadable: no claim either way
