"""Benchmark readers on small fixtures in each benchmark's real public format (see tests/eval_fixtures.py)."""

import json
import os

import pytest

from tests import eval_fixtures as fx
from xr_jax.eval import benchmarks as bm

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "eval")


def colors(item):
    return [im.getpixel((0, 0)) for im in item.images]


def test_gsm8k_real_rows():
    items = bm.load_benchmark("gsm8k", os.path.join(FIXTURES, "gsm8k_test.jsonl"))
    assert [it.answer for it in items] == ["18", "3", "70000", "540"]
    assert items[0].kind == "math" and items[0].choices is None and items[0].images == ()
    assert items[0].question.startswith("Janet\u2019s ducks lay 16 eggs")
    assert [it.id for it in items] == [f"gsm8k:{i}" for i in range(4)]


def test_math500_real_rows_orz_format():
    items = bm.load_benchmark("math500", os.path.join(FIXTURES, "math500.json"))
    assert [it.answer for it in items] == ["\\left( 3, \\frac{\\pi}{2} \\right)", "p - q", "\\frac{14}{3}", "9"]
    assert items[0].question.startswith("Convert the point $(0,3)$") and items[0].kind == "math"


def test_gpqa_real_rows_options_already_in_prompt():
    items = bm.load_benchmark("gpqa_diamond", os.path.join(FIXTURES, "gpqa_diamond.json"))
    assert [it.answer for it in items] == ["D", "C", "D"]
    first = items[0]
    assert first.kind == "multiple_choice" and first.choices == {"A": "d", "B": "a", "C": "b", "D": "c"}
    assert first.show_options is False and first.question.endswith("A. d\nB. a\nC. b\nD. c")


def test_mmlu_pro_and_health_subset(tmp_path):
    d = fx.write_mmlu_pro(str(tmp_path))
    items = bm.load_benchmark("mmlu_pro", d)
    assert [it.id for it in items] == ["mmlu_pro:70", "mmlu_pro:71"]  # the validation file is not read
    assert items[0].choices == {L: f"choice {i}" for i, L in enumerate("ABCDEFGHIJ")}
    assert items[0].answer == "C" and items[1].answer == "D" and len(items[1].choices) == 4
    health = bm.load_benchmark("mmlu_pro_health", d)
    assert [it.id for it in health] == ["mmlu_pro_health:70"]


def test_mmlu_pro_answer_index_must_agree(tmp_path):
    row = {"question_id": 1, "question": "q", "options": ["a", "b"], "answer": "A", "answer_index": 1, "category": "x"}
    with pytest.raises(bm.BenchmarkFormatError, match="mmlu_pro row 0: answer 'A' disagrees with answer_index 1"):
        bm.read_mmlu_pro(row, bm.ReadContext("mmlu_pro", 0))


def test_medqa_original_and_four_options(tmp_path):
    five, four_dir = fx.write_medqa(str(tmp_path))
    original = bm.load_benchmark("medqa", five)
    assert len(original) == 1 and list(original[0].choices) == list("ABCDE") and original[0].answer == "D"
    four = bm.load_benchmark("medqa_4op", four_dir)  # the train file in the same folder is not read
    assert [it.answer for it in four] == ["B", "D"]
    assert four[0].choices == {"A": "Radial", "B": "Ulnar", "C": "Median", "D": "Axillary"}
    assert four[0].show_options  # options go into the prompt's Options block


def test_mmmu_images_paired_in_order_and_health_subset(tmp_path):
    d = fx.write_mmmu(str(tmp_path))
    items = {it.id: it for it in bm.load_benchmark("mmmu_val", d)}
    assert set(items) == {"mmmu_val:validation_Clinical_Medicine_1", "mmmu_val:validation_Clinical_Medicine_2",
                          "mmmu_val:validation_Art_1"}  # dev split not read
    mc = items["mmmu_val:validation_Clinical_Medicine_1"]
    assert mc.choices == {"A": "Heart", "B": "Liver", "C": "Lung"} and mc.answer == "B"
    assert colors(mc) == [fx.RED, fx.BLUE] and mc.images[0].size == (12, 10) and mc.images[0].mode == "RGB"
    assert "<image 1>" in mc.question  # placeholders stay; images are given in their order
    open_q = items["mmmu_val:validation_Clinical_Medicine_2"]
    assert open_q.kind == "math" and open_q.answers == ("3.5", "7/2") and colors(open_q) == [fx.GREEN]
    assert colors(items["mmmu_val:validation_Art_1"]) == [fx.YELLOW]
    health = bm.load_benchmark("mmmu_health", d)
    assert sorted(it.id for it in health) == ["mmmu_health:validation_Clinical_Medicine_1",
                                              "mmmu_health:validation_Clinical_Medicine_2"]


def test_mmmu_missing_referenced_image_is_an_error():
    row = fx._mmmu_row("validation_Art_9", "See <image 2>", "['a', 'b']", "A", [fx.RED])
    with pytest.raises(bm.BenchmarkFormatError, match=r"mmmu_val row 3: .*<image 2>"):
        bm.read_mmmu(row, bm.ReadContext("mmmu_val", 3))


def test_mmmu_pro_standard_vision_and_health(tmp_path):
    d = fx.write_mmmu_pro(str(tmp_path))
    std = bm.load_benchmark("mmmu_pro", d)
    assert [it.answer for it in std] == ["J", "C"] and len(std[0].choices) == 10 and colors(std[0]) == [fx.RED]
    vision = bm.load_benchmark("mmmu_pro_vision", d)
    assert len(vision) == 1 and vision[0].answer == "D" and colors(vision[0]) == [fx.GREEN]
    assert vision[0].show_options is False and vision[0].question == bm.MMMU_PRO_VISION_QUESTION
    health = bm.load_benchmark("mmmu_pro_health", d)
    assert [it.meta["subject"] for it in health] == ["Pharmacy"]


def test_mathvista_testmini(tmp_path):
    d = fx.write_mathvista(str(tmp_path))
    mc, free = bm.load_benchmark("mathvista", d)
    assert mc.kind == "multiple_choice" and mc.choices == {"A": "3", "B": "5", "C": "7", "D": "9"}
    assert mc.answer == "C" and mc.question == "Find x." and colors(mc) == [fx.RED]  # answer text -> letter
    assert free.kind == "math" and free.answer == "1.45" and free.question.startswith("Hint: Please answer")
    assert colors(free) == [fx.BLUE] and free.meta["precision"] == 2.0


def test_mathvision(tmp_path):
    mc, free = bm.load_benchmark("mathvision", fx.write_mathvision(str(tmp_path)))
    assert mc.choices == {"A": "2", "B": "3", "C": "4", "D": "5", "E": "6"} and mc.answer == "B"
    assert free.kind == "math" and free.answer == "12" and colors(free) == [fx.GREEN]


def test_mmstar_inline_options(tmp_path):
    (item,) = bm.load_benchmark("mmstar", fx.write_mmstar(str(tmp_path)))
    assert item.choices == {"A": "red", "B": "blue", "C": "green", "D": "dark, yellow"}
    assert item.answer == "B" and item.show_options is False and colors(item) == [fx.BLUE]


def test_medxpertqa_mm_images_from_image_root(tmp_path):
    d, images = fx.write_medxpertqa(str(tmp_path))
    (item,) = bm.load_benchmark("medxpertqa_mm", d, image_root=images)  # MM/dev.jsonl is not read
    assert item.id == "medxpertqa_mm:MM-1" and item.answer == "C" and colors(item) == [fx.RED, fx.GREEN]
    assert item.show_options is False and len(item.choices) == 5
    with pytest.raises(bm.BenchmarkFormatError, match="image 'MM-1-a.jpeg' not found.*image_root"):
        bm.load_benchmark("medxpertqa_mm", d)


def test_omnimedvqa_and_seeded_subset(tmp_path):
    d = fx.write_omnimedvqa(str(tmp_path))
    items = bm.load_benchmark("omnimedvqa", os.path.join(d, "QA_information", "Open-access"), image_root=d)
    by_id = {it.id: it for it in items}
    ct = by_id["omnimedvqa:Chest CT Scan_0001"]
    assert ct.answer == "B" and len(ct.choices) == 4 and colors(ct) == [fx.BLUE]
    fundus = by_id["omnimedvqa:Fundus_0001"]
    assert fundus.choices == {"A": "Fundus photography", "B": "MRI"} and fundus.answer == "A"
    a = bm.load_benchmark("omnimedvqa", os.path.join(d, "QA_information"), image_root=d, limit=1, subsample_seed=3)
    b = bm.load_benchmark("omnimedvqa", os.path.join(d, "QA_information"), image_root=d, limit=1, subsample_seed=3)
    assert len(a) == 1 and a[0].id == b[0].id


def test_nejm_answer_as_option_text(tmp_path):
    (item,) = bm.load_benchmark("nejm", fx.write_nejm(str(tmp_path)))  # image path relative to the file
    assert item.answer == "C" and colors(item) == [fx.GREEN] and len(item.choices) == 5


def test_errors_name_the_benchmark_field_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"question": "q", "answer": "#### 1"})
    path.write_text(good + "\n\n" + json.dumps({"question": "q", "answer": "no final answer"}) + "\n")
    with pytest.raises(bm.BenchmarkFormatError, match=rf"gsm8k row 1 \({path}:3\): empty_answer: 'answer' has no '####'"):
        bm.load_benchmark("gsm8k", str(path))
    path.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(bm.BenchmarkFormatError, match=rf"gsm8k row 0 \({path}:1\): missing_field: no 'answer'"):
        bm.load_benchmark("gsm8k", str(path))
    path.write_text(good + "\n" + '{"question": "q", "answer": ' + "\n")  # a malformed JSON line
    with pytest.raises(bm.BenchmarkFormatError, match=rf"{path}:2: not valid JSON"):
        bm.load_benchmark("gsm8k", str(path))
    (tmp_path / "bad.json").write_text("[" + good + ",\n" + good + ",\n{oops}]")
    with pytest.raises(bm.BenchmarkFormatError, match=rf"{tmp_path / 'bad.json'}:3: not valid JSON"):
        bm.load_benchmark("gsm8k", str(tmp_path / "bad.json"))
    with pytest.raises(KeyError, match="unknown benchmark 'mmmlu'"):
        bm.get("mmmlu")
    with pytest.raises(ValueError, match="'aime2024' has no hub copy"):
        bm.load_benchmark("aime2024")


def test_registry_covers_the_papers_suite():
    paper = {"gsm8k", "mmlu_pro", "mmmu_val", "mmmu_pro", "mmstar", "mathvista", "mathvision", "medqa",
             "medqa_4op", "mmlu_pro_health", "mmmu_health", "mmmu_pro_health", "medxpertqa_mm", "omnimedvqa", "nejm"}
    assert paper <= set(bm.BENCHMARKS)
    assert {"math500", "aime2024", "gpqa_diamond", "mmmu_pro_vision"} <= set(bm.BENCHMARKS)
