"""Readers on real files (GSM8K, MATH500, GPQA fixtures), OpenThoughts/Orz schemas, the synthetic task, bad rows."""

import json
import pathlib

import numpy as np
import pytest

from xr_jax.data import sources, synthetic

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"


def _all(source):
    return [source[i] for i in range(len(source))]


def test_gsm8k_fixture():
    src = sources.load_source(str(FIXTURES / "gsm8k_test_50.jsonl"), "gsm8k")
    examples = _all(src)
    assert len(examples) == 50
    assert [e.answer for e in examples[:5]] == ["18", "3", "70000", "540", "20"]
    first = examples[0]
    assert first.id == "gsm8k_test_50:0" and first.question.startswith("Janet’s ducks lay 16 eggs per day.")
    assert first.response == (
        "<think>\nJanet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day at the farmer’s "
        "market.\n</think>\n\n<answer>18</answer>"
    )
    assert all("<<" not in e.response for e in examples)
    raw = [json.loads(line) for line in (FIXTURES / "gsm8k_test_50.jsonl").read_text().splitlines()]
    assert [e.answer for e in examples] == [r["answer"].split("####")[-1].strip() for r in raw]
    keep = sources.load_source(str(FIXTURES / "gsm8k_test_50.jsonl"), "gsm8k", strip_calculator=False)
    assert "<<16-3-4=9>>" in keep[0].response


def test_math500_and_gpqa_fixtures():
    math = sources.load_source(str(FIXTURES / "math500_40.json"), "orz_eval")
    assert len(math) == 40
    m = _all(math)
    assert [e.answer for e in m[:6]] == ["\\left( 3, \\frac{\\pi}{2} \\right)", "p - q", "\\frac{14}{3}", "9", "\\text{Evelyn}", "42"]
    assert m[0].question.startswith("Convert the point $(0,3)$") and m[0].choices is None
    assert m[0].meta == {"file_name": "math500_40", "options_in_question": False}
    gpqa = _all(sources.load_source(str(FIXTURES / "gpqa_diamond_30.json"), "orz_eval"))
    assert len(gpqa) == 30
    assert [e.answer for e in gpqa[:10]] == ["D", "C", "D", "C", "C", "A", "C", "A", "D", "B"]
    assert {e.answer for e in gpqa} == {"A", "B", "C", "D"}
    assert gpqa[0].choices == {"A": "d", "B": "a", "C": "b", "D": "c"} and gpqa[0].meta["options_in_question"]


def test_openthoughts_rewrite_and_options():
    src = sources.load_source(str(FIXTURES / "openthoughts_sample.jsonl"), "openthoughts")
    examples = _all(src)
    assert len(examples) == 3 and examples[1].question.startswith("Return your final response within \\boxed{}. Solve")
    assert examples[0].response == (
        "<think>\n\nMultiplication first: 3*4 = 12.\n\nThen 2 + 12 = 14.\n\n</think>\n\n<answer>\n\n"
        "$2+3\\cdot4 = 2 + 12 = \\boxed{14}$\n\n</answer>"
    )
    assert examples[0].system is None  # the Sky-T1 system prompt is dropped by default
    raw = sources.load_source(str(FIXTURES / "openthoughts_sample.jsonl"), "openthoughts", markers=None, keep_system=True)
    assert raw[0].response.startswith("<|begin_of_thought|>") and raw[0].system.startswith("Your role as an assistant")


def test_orz_math_json_and_datasets_columns(tmp_path):
    expected = [("4. (7 points) Find the smallest", "12"), ("Example 31", "\\frac{5}{6}"), ("What is", "5\\sqrt{2}"), ("Solve", "3")]
    src = sources.load_source(str(FIXTURES / "orz_math_sample.json"), "orz_math")
    got = [(e.question, e.answer) for e in _all(src)]
    assert all(q.startswith(p) and a == b for (q, a), (p, b) in zip(got, expected))
    # the same file through `datasets` as columns "0"/"1" (parquet), as load_dataset("json") produces them
    import datasets

    pairs = json.loads((FIXTURES / "orz_math_sample.json").read_text())
    ds = datasets.Dataset.from_dict({"0": [p[0] for p in pairs], "1": [p[1] for p in pairs]})
    ds.to_parquet(str(tmp_path / "orz.parquet"))
    src2 = sources.load_source(str(tmp_path / "orz.parquet"), "orz_math", cache_dir=str(tmp_path / "cache"))
    assert [(e.question, e.answer) for e in _all(src2)] == got


def test_schema_mismatch_fails_at_start_naming_fields(tmp_path):
    with pytest.raises(sources.SchemaError, match=r"expected fields \['question', 'answer'\].*found \['final_answer', 'prompt'\]"):
        sources.load_source(str(FIXTURES / "math500_40.json"), "gsm8k")
    with pytest.raises(sources.SchemaError, match=r"orz_eval: expected fields \['prompt', 'final_answer'\].*\['answer', 'question'\]"):
        sources.load_source(str(FIXTURES / "gsm8k_test_50.jsonl"), "orz_eval")
    import datasets

    datasets.Dataset.from_dict({"text": ["a"]}).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(sources.SchemaError, match=r"expected fields \['conversations'\], found columns \['text'\]"):
        sources.load_source(str(tmp_path / "t.parquet"), "openthoughts", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="unknown source format 'mmlu'"):
        sources.load_source(str(FIXTURES / "gsm8k_test_50.jsonl"), "mmlu")
    with pytest.raises(FileNotFoundError, match="no such file"):
        sources.load_source(str(tmp_path / "nope.jsonl"), "gsm8k")


def write_planted_gsm8k(path: pathlib.Path) -> dict[str, int]:
    """The 50 fixture rows with bad rows planted between them; returns the expected skip counts."""
    good = (FIXTURES / "gsm8k_test_50.jsonl").read_bytes().splitlines()
    bad = [
        b'{"question": "no answer field"}',                                   # missing_field
        b'{"question": 7, "answer": "x #### 1"}',                             # wrong_type
        b'{"question": "q", "answer": "no final answer"}',                    # empty_answer
        b'{"question": "q", "answer": "steps ####   "}',                      # empty_answer
        b'{"question": "caf\xe9 latin-1", "answer": "#### 2"}',               # non_utf8
        b'{"question": "unterminated',                                        # bad_json
        b'["a", "list"]',                                                     # wrong_type
        b'{"question": "  ", "answer": "#### 3"}',                            # empty_question
    ]
    lines = []
    for i, line in enumerate(good):
        lines.append(line)
        if i % 6 == 2 and bad:
            lines.append(bad.pop(0))
    path.write_bytes(b"\n".join(lines + bad) + b"\n")
    return {"missing_field": 1, "wrong_type": 2, "empty_answer": 2, "non_utf8": 1, "bad_json": 1, "empty_question": 1}


def test_bad_rows_raise_badrow_with_reason(tmp_path):
    expected = write_planted_gsm8k(tmp_path / "bad.jsonl")
    src = sources.load_source(str(tmp_path / "bad.jsonl"), "gsm8k")
    assert len(src) == 58
    reasons = {}
    good = 0
    for i in range(len(src)):
        try:
            src[i]
            good += 1
        except sources.BadRow as e:
            reasons[e.reason] = reasons.get(e.reason, 0) + 1
    assert good == 50 and reasons == expected


def test_directory_reads_the_split_files_and_benchmarks_refuse_bad_rows(tmp_path):
    """One reader (`data.files`) for both: a directory of train/test files gives the split's rows (all files when
    no name carries it); the rows a training source skips and counts, a benchmark refuses with file and line."""
    from xr_jax.eval import benchmarks

    rows = (FIXTURES / "gsm8k_test_50.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:30]) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(rows[30:]) + "\n")
    assert len(sources.load_source(str(tmp_path), "gsm8k")) == 30
    assert len(sources.load_source(str(tmp_path), "gsm8k", split="test")) == 20
    assert len(sources.load_source(str(tmp_path), "gsm8k", split="validation")) == 50
    bad = tmp_path / "bad" / "bad.jsonl"
    bad.parent.mkdir()
    write_planted_gsm8k(bad)  # its first bad row is line 4
    with pytest.raises(benchmarks.BenchmarkFormatError, match=rf"row 3 \({bad}:4\): missing_field"):
        benchmarks.load_benchmark("gsm8k", str(bad))
    bad.write_bytes("\n".join(rows[:3]).encode() + b'\n{"question": "caf\xe9", "answer": "#### 2"}\n')
    with pytest.raises(benchmarks.BenchmarkFormatError, match=rf"{bad}:4: not valid UTF-8"):
        benchmarks.load_benchmark("gsm8k", str(bad))


def test_medqa_four_and_five_options(tmp_path):
    """GBaker's 4-option jsonl and bigbio/med_qa's 5-option source schema (options as [{key, value}]) read to
    the same Example: the letter as the answer, the options as choices, in order."""
    src = sources.load_source(str(FIXTURES / "medqa"), "medqa")
    examples = _all(src)  # the directory's two files, sorted: bigbio first
    assert len(examples) == 8
    five, four = examples[0], examples[4]
    assert five.question == "Which organ makes insulin?" and five.answer == "E"
    assert list(five.choices) == list("ABCDE") and five.choices["E"] == "Pancreas"
    assert four.answer == "B" and four.choices == {"A": "Femoral artery", "B": "Posterior tibial artery",
                                                   "C": "Radial artery", "D": "Aorta"}
    assert four.meta == {"meta_info": "step1"} and four.id == "medqa:4"
    assert [e.answer for e in examples] == ["E", "A", "C", "B", "B", "C", "A", "D"]
    from xr_jax.data import templates

    prompt = templates.X_REASONER_TRAIN.format(five.question, five.choices)
    assert prompt.endswith("Which organ makes insulin?\n\nOptions:\n\nA: Liver\nB: Kidney\nC: Spleen\nD: Thyroid\n"
                           "E: Pancreas")
    rows = [{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "C"},
            {"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "B", "answer": "x"},
            {"question": "q", "options": ["x", "y"], "answer_idx": "A"},
            {"question": "q", "options": {"A": "x", "B": ""}, "answer_idx": "A"}]
    (tmp_path / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    bad = sources.load_source(str(tmp_path / "bad.jsonl"), "medqa")
    reasons = []
    for i in range(len(bad)):
        with pytest.raises(sources.BadRow) as e:
            bad[i]
        reasons.append(e.value.reason)
    assert reasons == ["bad_answer", "bad_answer", "wrong_type", "wrong_type"]


def test_synthetic_task_is_deterministic_and_verifiable():
    cfg = synthetic.SyntheticConfig(num_examples=200, seed=3, min_steps=1, max_steps=4)
    a, b = synthetic.synthetic_source(cfg), synthetic.synthetic_source(cfg)
    assert [a[i] for i in range(20)] == [b[i] for i in range(20)]
    other = synthetic.synthetic_source(synthetic.SyntheticConfig(num_examples=200, seed=4))
    assert [a[i].question for i in range(20)] != [other[i].question for i in range(20)]
    for i in range(len(a)):
        ex = a[i]
        expression = ex.meta["expression"]
        assert set(expression) <= set("0123456789+-*() ")
        assert str(eval(expression)) == ex.answer  # noqa: S307 - our own generated arithmetic
        assert 1 <= ex.meta["steps"] <= 4 and ex.response.endswith(f"<answer>{ex.answer}</answer>")
        last_step = ex.response.split("\n</think>")[0].splitlines()[-1]
        assert last_step.endswith(f"= {ex.answer}")
    with pytest.raises(ValueError, match="min_steps"):
        synthetic.synthetic_source(synthetic.SyntheticConfig(min_steps=3, max_steps=2))


def test_synthetic_task_mix_cycles_tasks_and_restates():
    cfg = synthetic.SyntheticConfig(num_examples=8, seed=2, tasks=("text-direct", "image-read", "text-cot"), restate=True)
    src = synthetic.synthetic_source(cfg)
    assert src.has_images
    for i in range(8):
        ex, problem = src[i], synthetic.make_problem(cfg, i)
        task = cfg.tasks[i % 3]
        assert ex.meta["task"] == task and ex.meta["expression"] == problem.expression
        if task == "text-direct":
            assert ex.question == f"What is {problem.expression}?" and not ex.images
            assert ex.response == f"<answer>{problem.answer}</answer>" and ex.answer == str(problem.answer)
        elif task == "image-read":
            assert ex.question == synthetic.READ_QUESTION and len(ex.images) == 1
            assert ex.response == f"The expression is {problem.expression}." == ex.response.strip()
            assert ex.answer == problem.expression
        else:
            thinking = ex.response.split("<think>\n")[1].split("\n</think>")[0].splitlines()
            assert thinking == [f"The expression is {problem.expression}.", *problem.steps] and not ex.images
    plain = synthetic.synthetic_source(synthetic.SyntheticConfig(num_examples=1, seed=2))
    assert "The expression is" not in plain[0].response and not plain.has_images
    with pytest.raises(ValueError, match="unknown synthetic task.*'image-ocr'"):
        synthetic.synthetic_source(synthetic.SyntheticConfig(tasks=("text-cot", "image-ocr")))


def test_synthetic_images_are_large_clear_renderings():
    src = synthetic.synthetic_source(synthetic.SyntheticConfig(num_examples=4, tasks=("image-cot",), image_size=(112, 224)))
    ex = src[0]
    assert src.has_images and ex.question == synthetic.IMAGE_QUESTION and len(ex.images) == 1
    image = ex.images[0]
    assert image.shape == (112, 224, 3) and image.dtype == np.uint8
    for i in range(4):  # glyphs are large (digits > 20 px tall) and centred
        rows, cols = np.nonzero(src[i].images[0].min(axis=2) < 128)
        assert rows.max() - rows.min() > 20 and cols.max() - cols.min() > 0.3 * 224
        assert abs((rows.max() + rows.min()) / 2 - 56) < 8 and abs((cols.max() + cols.min()) / 2 - 112) < 12
    np.testing.assert_array_equal(image, synthetic.synthetic_source(synthetic.SyntheticConfig(num_examples=4, tasks=("image-cot",)))[0].images[0])
