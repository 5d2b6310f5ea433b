"""End to end on fixtures: prompts, tables, predictions JSONL, and re-scoring without regenerating.

The model here is a scripted generator (injected responses), scored by the real reward functions; see
test_eval_model.py for the tiny real model behind the real sampler.
"""

import dataclasses
import json
import os

import pytest

from tests import eval_fixtures as fx
from tests.eval_fakes import ScriptedGenerator, gen, tag_scorer
from xr_jax.eval import benchmarks as bm
from xr_jax.eval import runner as ev
from xr_jax.data import templates

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "eval")


@pytest.fixture(scope="module")
def scorer():
    s = ev.RewardScorer(num_workers=1, timeout=20.0)
    yield s
    s.close()


def suite(tmp_path, **kw):
    return ev.EvalSection(
        benchmarks=("gsm8k", "gpqa_diamond", "mmmu_val"),
        sources={"gsm8k": {"path": os.path.join(FIXTURES, "gsm8k_test.jsonl"), "limit": 3},
                 "gpqa_diamond": {"path": os.path.join(FIXTURES, "gpqa_diamond.json")},
                 "mmmu_val": {"path": fx.write_mmmu(str(tmp_path / "data"))}},
        output_dir=str(tmp_path / "out"), **kw)


def answers(prompt, budget):
    """Right on GSM8K items 0-1, wrong on 2; GPQA: D always; MMMU: B / 3.5 / none."""
    table = {"gsm8k:0": "18", "gsm8k:1": "3", "gsm8k:2": "7", "mmmu_val:validation_Clinical_Medicine_1": "B",
             "mmmu_val:validation_Clinical_Medicine_2": "3.5", "mmmu_val:validation_Art_1": None}
    return gen(table.get(prompt.id, "D"), tokens=len(prompt.text) % 50 + 5)


def test_prompts_follow_the_papers_templates(tmp_path):
    cfg = suite(tmp_path)
    medqa = bm.BenchmarkItem("medqa_4op", "m:1", "Which nerve?", ("B",), "multiple_choice",
                             {"A": "Radial", "B": "Ulnar"})
    p = ev.render_prompt(medqa, cfg)
    assert p.text == templates.X_REASONER_EVAL_MC.text.replace("{{ question }}", "Which nerve?") + \
        "\n\nOptions:\n\nA: Radial\nB: Ulnar"
    (gpqa, *_) = bm.load_benchmark("gpqa_diamond", os.path.join(FIXTURES, "gpqa_diamond.json"))
    p = ev.render_prompt(gpqa, cfg)  # options are already in GPQA's question: not repeated
    assert p.text.startswith("You should provide your thoughts") and "Options:" not in p.text
    (gsm, *_) = bm.load_benchmark("gsm8k", os.path.join(FIXTURES, "gsm8k_test.jsonl"))
    assert ev.render_prompt(gsm, cfg).text.startswith("A conversation between User and Assistant.")
    open_q = bm.BenchmarkItem("mmmu_val", "x", "Dose in <image 1>?", ("3.5",), "math", images=(fx.png(fx.RED),))
    p = ev.render_prompt(open_q, cfg)  # an open question of an MC benchmark gets the math template
    assert p.text.startswith("A conversation between") and p.images == open_q.images


def test_end_to_end_tables_jsonl_and_rescore(tmp_path, scorer):
    cfg = suite(tmp_path)
    generator = ScriptedGenerator(respond=answers)
    metrics = ev.evaluate(cfg, generator, scorer, progress=False, info={"model": "scripted"})
    assert {n: (m.n, round(m.avg, 2)) for n, m in metrics.items()} == {
        "gsm8k": (3, 66.67), "gpqa_diamond": (3, 66.67), "mmmu_val": (3, 66.67)}
    assert metrics["mmmu_val"].n_unparsable == 1
    # images travelled with their prompts
    mmmu_prompt = next(p for p in generator.prompts if p.id == "mmmu_val:validation_Clinical_Medicine_1")
    assert [im.getpixel((0, 0)) for im in mmmu_prompt.images] == [fx.RED, fx.BLUE]

    out = cfg.output_dir
    assert sorted(os.listdir(out)) == ["generation.json", "predictions.jsonl", "results.json", "results.md"]
    lines = [json.loads(x) for x in open(os.path.join(out, "predictions.jsonl"))]
    assert len(lines) == 9
    first = lines[0]
    assert {"benchmark", "id", "sample", "response", "answer", "correct", "finish_reason", "forced", "num_tokens",
            "answers", "choices", "kind", "prompt"} <= set(first)
    assert first["id"] == "gsm8k:0" and first["answer"] == "18" and first["correct"] is True
    assert first["finish_reason"] == "eos" and first["forced"] is False
    md = open(os.path.join(out, "results.md")).read()
    assert "| gsm8k | 3 | 66.7 |" in md and "| mmmu_val | 3 | 66.7 | 33.3 |" in md
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["info"]["model"] == "scripted" and saved["info"]["max_tokens"] == 4096
    assert saved["metrics"]["gsm8k"]["pass"] == saved["metrics"]["gsm8k"]["avg"]

    # Re-scoring the saved predictions reproduces every number, with and without scoring again.
    path = os.path.join(out, "predictions.jsonl")
    assert ev.rescore(path) == metrics
    assert ev.rescore(path, scorer, out_dir=str(tmp_path / "rescored")) == metrics
    assert open(tmp_path / "rescored" / "results.md").read() == md

    # A different scorer changes the numbers without regenerating.
    strict = lambda reqs: [ev.Scored(s.answer, s.key, False) for s in tag_scorer(reqs)]  # noqa: E731
    assert all(m.avg == 0.0 for m in ev.rescore(path, strict).values())
    assert ev.rescore(path, tag_scorer) == metrics  # a second scorer that agrees gives the same numbers


def test_reward_scorer_on_real_answers(scorer):
    """The real scorer (reward functions in their worker pool): numeric GSM8K answers with separators, LaTeX
    MATH500 answers, option letter or option text for multiple choice, several accepted MMMU answers."""
    (gsm,) = bm.load_benchmark("gsm8k", os.path.join(FIXTURES, "gsm8k_test.jsonl"), limit=1)  # gold 18
    math500 = bm.load_benchmark("math500", os.path.join(FIXTURES, "math500.json"))[2]  # gold \frac{14}{3}
    (gpqa, *_) = bm.load_benchmark("gpqa_diamond", os.path.join(FIXTURES, "gpqa_diamond.json"))  # D = "c"
    medqa = bm.BenchmarkItem("medqa_4op", "m:1", "q", ("B",), "multiple_choice", {"A": "Radial", "B": "Ulnar nerve"})
    mmmu_open = bm.BenchmarkItem("mmmu_val", "o:1", "q", ("3.5", "7/2"), "math")
    cases = [
        (gsm, "<think>16-3-4=9, 9*2</think><answer>$18</answer>", True, "18"),
        (gsm, "<think>...</think><answer>18.5</answer>", False, "18.5"),
        (math500, "<think>...</think><answer>\\dfrac{14}{3}</answer>", True, "\\frac{14}{3}"),
        (math500, "I think it is 14/3", False, None),  # no answer span: unparsable, wrong
        (gpqa, "<think>...</think> <answer>D</answer>", True, "D"),
        (gpqa, "<answer>B: a</answer>", False, "B"),
        (medqa, "<answer>Ulnar nerve</answer>", True, "B"),  # the option's text picks its letter
        (medqa, "<answer>The answer is B</answer>", False, None),
        (mmmu_open, "<answer>7/2</answer>", True, "7/2"),
    ]
    records = [ev.Record(it.benchmark, it.id, i, it.kind, it.answers, it.choices, "", resp, 5, "eos", False)
               for i, (it, resp, _, _) in enumerate(cases)]
    scored = ev.score_records(records, scorer)
    assert [r.correct for r in scored] == [c[2] for c in cases]
    assert [r.key for r in scored] == [c[3] for c in cases]
    assert scored[3].answer is None and scored[7].answer == "The answer is B"


def test_main_rescores_a_predictions_file_without_a_model(tmp_path, scorer, capsys):
    import types

    cfg = suite(tmp_path)
    metrics = ev.evaluate(cfg, ScriptedGenerator(respond=answers), scorer, progress=False)
    config = types.SimpleNamespace(eval=ev.EvalSection(
        rescore=os.path.join(cfg.output_dir, "predictions.jsonl"), output_dir=str(tmp_path / "rescored"),
        score_workers=1))
    assert ev.main(config) == metrics
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[:3] == ["benchmark", "n", "acc"] and "mmmu_val" in printed
    assert os.path.exists(tmp_path / "rescored" / "results.md")


class _Killed(Exception):
    pass


def seeded(prompt, budget):
    """`answers`, with a length that depends on the batch's seed: a resumed run must keep the seeds."""
    g = answers(prompt, budget)
    return gen(g.text.split("<answer>")[-1].split("</answer>")[0] or None, tokens=5 + budget["seed"] % 7)


def test_interrupted_eval_resumes_without_regenerating(tmp_path, scorer):
    kw = dict(batch_size=2, protocol="sampling", num_samples=2)
    clean_gen = ScriptedGenerator(respond=seeded)
    clean = ev.evaluate(suite(tmp_path / "clean", **kw), clean_gen, scorer, progress=False)

    cfg = suite(tmp_path / "resumed", **kw)
    dying = ScriptedGenerator(respond=seeded)
    real_generate = dying.generate

    def generate_then_die(prompts, **k):
        if len(dying.calls) == 3:  # killed during the fourth batch
            raise _Killed
        return real_generate(prompts, **k)

    dying.generate = generate_then_die
    with pytest.raises(_Killed):
        ev.evaluate(cfg, dying, scorer, progress=False)
    path = os.path.join(cfg.output_dir, "predictions.jsonl")
    saved = [json.loads(x) for x in open(path)]
    assert len(saved) == (3 + 2) * 2  # GSM8K's batches of 2 + 1 questions, GPQA's first 2, x two samples
    with open(path, "a") as f:
        f.write('{"benchmark": "gpqa_diam')  # and a line torn by the kill

    again = ScriptedGenerator(respond=seeded)
    assert ev.evaluate(cfg, again, scorer, progress=False) == clean
    assert len(again.calls) == len(clean_gen.calls) - 3
    assert [p.id for p in again.prompts] == [p.id for p in clean_gen.prompts][5:]
    assert [c["seed"] for c in again.calls] == [c["seed"] for c in clean_gen.calls][3:]
    assert open(path).read() == open(tmp_path / "clean" / "out" / "predictions.jsonl").read()

    # Changed generation settings are refused, naming what changed; the saved predictions stay as they are.
    before = open(path).read()
    with pytest.raises(ev.ResumeMismatch, match="max_tokens 4096 -> 2048"):
        ev.evaluate(suite(tmp_path / "resumed", max_tokens=2048, **kw), again, scorer, progress=False)
    assert open(path).read() == before

    # An empty predictions file (a run that failed before its first batch) holds nothing to protect.
    fresh = suite(tmp_path / "fresh", **kw)
    os.makedirs(fresh.output_dir)
    open(os.path.join(fresh.output_dir, "predictions.jsonl"), "w").close()
    assert ev.evaluate(dataclasses.replace(fresh, max_tokens=2048), ScriptedGenerator(respond=seeded), scorer,
                       progress=False)["gsm8k"].n == 3
