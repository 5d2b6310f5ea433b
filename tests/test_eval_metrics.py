"""Metric arithmetic on injected responses: avg@k, maj@k, pass@k, unparsable counts, endless/forced rates,
and the forced-exit budget (responses bounded by the cap)."""

import pytest

from tests.eval_fakes import ScriptedGenerator, endless_thinker, gen, tag_scorer
from xr_jax.eval import benchmarks as bm
from xr_jax.eval import runner as ev


def mc_item(i, gold, bench="medqa_4op"):
    return bm.BenchmarkItem(bench, f"{bench}:{i}", f"question {i}", (gold,), "multiple_choice",
                            {"A": "a", "B": "b", "C": "c", "D": "d"})


def run(items, script, tmp_path, **cfg):
    cfg = ev.EvalSection(benchmarks=tuple(dict.fromkeys(it.benchmark for it in items)),
                         output_dir=str(tmp_path), **cfg)
    by_bench = {}
    for it in items:
        by_bench.setdefault(it.benchmark, []).append(it)
    generator = ScriptedGenerator(script) if isinstance(script, dict) else ScriptedGenerator(respond=script)
    return ev.evaluate(cfg, generator, tag_scorer, items_by_benchmark=by_bench, progress=False), generator


def test_sampling_metrics_by_hand(tmp_path):
    items = [mc_item(1, "A"), mc_item(2, "C"), mc_item(3, "D"), mc_item(4, "A")]
    script = {
        # correct 3/5, majority A (3 votes) -> right, one unparsable
        "medqa_4op:1": [gen("A", 10), gen("A", 20), gen("B", 30), gen(None, 40), gen("A", 50)],
        # correct 1/5, majority B -> wrong, two unparsable (cut by forced exit, then no answer)
        "medqa_4op:2": [gen("B"), gen("B"), gen("C"), gen(None, 100, "forced_exit", True),
                        gen(None, 100, "forced_exit", True)],
        # nothing parsable: every sample ran out of tokens after forced exit -> endless
        "medqa_4op:3": [gen(None, 4096, "length", True) for _ in range(5)],
        # tie A/B (2 votes each): the answer seen first (B) wins -> wrong; pass@5 right
        "medqa_4op:4": [gen("B"), gen("A"), gen("A"), gen("B"), gen(None)],
    }
    metrics, generator = run(items, script, tmp_path, protocol="sampling", num_samples=5, temperature=0.3)
    m = metrics["medqa_4op"]
    assert (m.n, m.k, m.n_samples) == (4, 5, 20)
    assert m.avg == pytest.approx(100 * 6 / 20)  # 3 + 1 + 0 + 2 correct samples
    assert m.maj == pytest.approx(100 * 1 / 4)
    assert m.pass_ == pytest.approx(100 * 3 / 4)
    assert m.n_unparsable == 9 and m.unparsable == pytest.approx(45.0)
    assert m.endless == pytest.approx(100 * 5 / 20) and m.forced == pytest.approx(100 * 7 / 20)
    assert m.max_tokens == 4096
    call = generator.calls[0]
    assert call["greedy"] is False and call["temperature"] == 0.3 and call["num_samples"] == 5


def test_majority_ignores_unparsable_and_breaks_ties_by_first_seen():
    rec = lambda key, correct: ev.Record("b", "b:1", 0, "math", ("1",), None, "", "", 1, "eos", False,  # noqa: E731
                                         key, key, correct)
    assert ev.majority_correct([rec(None, False), rec(None, False), rec("2", True)])
    assert not ev.majority_correct([rec("3", False), rec("2", True)])
    assert ev.majority_correct([rec("2", True), rec("3", False), rec("3", False), rec("2", True)])
    assert not ev.majority_correct([rec(None, False)])


def test_greedy_is_k1_and_table_columns(tmp_path):
    items = [mc_item(1, "A"), mc_item(2, "B"), mc_item(3, "C", bench="mmlu_pro")]
    script = {"medqa_4op:1": [gen("A")], "medqa_4op:2": [gen("C")], "mmlu_pro:3": [gen(None)]}
    metrics, generator = run(items, script, tmp_path)
    assert metrics["medqa_4op"].avg == 50.0 == metrics["medqa_4op"].maj == metrics["medqa_4op"].pass_
    assert metrics["mmlu_pro"].avg == 0.0 and metrics["mmlu_pro"].n_unparsable == 1
    assert all(c["greedy"] and c["num_samples"] == 1 for c in generator.calls)
    table = ev.format_table(metrics)
    assert table.splitlines()[0].startswith("| benchmark | n | acc | unparsable % | endless %")
    assert "| medqa_4op | 2 | 50.0 | 0.0 |" in table and "| mmlu_pro | 1 | 0.0 | 100.0 |" in table
    text = ev.format_table(metrics, markdown=False)
    assert text.splitlines()[0].split()[:3] == ["benchmark", "n", "acc"]


def test_forced_exit_bounds_responses_by_the_cap(tmp_path):
    items = [mc_item(i, "A") for i in range(4)]
    # Before forced exit (the paper's Table 2, left): every response runs to the cap.
    before, g0 = run(items, endless_thinker, tmp_path / "before", forced_exit=False)
    assert g0.calls[0]["max_think"] is None and g0.calls[0]["max_new_tokens"] == 4096
    assert before["medqa_4op"].endless == 100.0 and before["medqa_4op"].avg == 0.0
    # After: thinking is cut at 4096 - 256 - 3 tokens, the answer fits, nothing is endless.
    after, g1 = run(items, endless_thinker, tmp_path / "after")
    assert (g1.calls[0]["max_think"], g1.calls[0]["max_answer"]) == (4096 - 256 - 3, 256)
    m = after["medqa_4op"]
    assert m.endless == 0.0 and m.forced == 100.0 and m.avg == 100.0 and m.max_tokens <= 4096
    # A smaller cap and answer allowance are honoured (configurable).
    small, g2 = run(items, endless_thinker, tmp_path / "small", max_tokens=512, max_answer=64)
    assert g2.calls[0]["max_think"] == 512 - 64 - 3 and small["medqa_4op"].max_tokens <= 512


def test_generator_breaking_the_cap_is_an_error(tmp_path):
    items = [mc_item(1, "A")]
    with pytest.raises(RuntimeError, match="medqa_4op:1: response of 5000 tokens exceeds eval.max_tokens 4096"):
        run(items, {"medqa_4op:1": [gen("A", 5000)]}, tmp_path)
    with pytest.raises(RuntimeError, match="unknown finish reason 'stop'"):
        run(items, {"medqa_4op:1": [gen("A", 5, "stop")]}, tmp_path)


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="eval.protocol is 'beam'"):
        ev.EvalSection(benchmarks=("gsm8k",), protocol="beam").validate()
    with pytest.raises(KeyError, match="unknown benchmark 'gsm9k'"):
        ev.EvalSection(benchmarks=("gsm9k",)).validate()
    with pytest.raises(ValueError, match="unknown key eval.sources.gsm8k.paht"):
        ev.EvalSection(benchmarks=("gsm8k",), sources={"gsm8k": {"paht": "x"}}).validate()
    with pytest.raises(ValueError, match="eval.max_answer \\(4096\\) must be below eval.max_tokens"):
        ev.EvalSection(benchmarks=("gsm8k",), max_answer=4096).validate()


def test_paper_suite_config_mirrors_table_7():
    import os

    import yaml

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "eval_paper.yaml")
    section = yaml.safe_load(open(path))["eval"]
    cfg = ev.EvalSection(**{**section, "benchmarks": tuple(section["benchmarks"])}).validate()
    sizes = {name: bm.get(name).paper_size for name in cfg.benchmarks}
    assert sizes == {"gsm8k": 1319, "mmlu_pro": 12032, "mmmu_val": 900, "mmmu_pro": 1730, "mmstar": 1500,
                     "mathvista": 1000, "mathvision": 3040, "medqa": 1273, "medqa_4op": 1273,
                     "mmlu_pro_health": 818, "mmmu_health": 150, "mmmu_pro_health": 286, "medxpertqa_mm": 2000,
                     "omnimedvqa": 1000, "nejm": 947}
    assert (cfg.protocol, cfg.max_tokens, cfg.forced_exit, cfg.k) == ("greedy", 4096, True, 1)
