"""Tiny benchmark files in each benchmark's public layout and format, written at test time.

Parquet files are written through `datasets` with its `Image` feature (as the hub's parquet exports are),
laid out like a local snapshot of the hub repository (config sub-directories, `{split}-0000x-of-0000y`
names, plus a file of another split that must not be read). JSON benchmarks get their image files next
to them. Each image is a solid colour, so a test can tell which image was paired with which question.
"""

from __future__ import annotations

import json
import os

from PIL import Image

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
MMMU_IMAGE_COLUMNS = [f"image_{k}" for k in range(1, 8)]


def png(color, size=(12, 10)) -> Image.Image:
    return Image.new("RGB", size, color)


def _parquet(path: str, rows: list[dict], image_columns=(), list_columns=()) -> str:
    import datasets

    os.makedirs(os.path.dirname(path), exist_ok=True)
    columns = {key: [r.get(key) for r in rows] for key in rows[0]}
    features = {}
    for key, values in columns.items():
        if key in image_columns:
            features[key] = datasets.Image()
        elif key in list_columns:
            features[key] = datasets.Sequence(datasets.Value("string"))
    inferred = datasets.Dataset.from_dict({k: v for k, v in columns.items() if k not in features}).features
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features({**inferred, **features}))
    ds.to_parquet(path)
    return path


def _jsonl(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def _save_png(path: str, color) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    png(color).save(path, format="PNG")  # lossless, whatever the file name says


def _mmmu_row(rid, question, options, answer, images, qtype="multiple-choice", **extra):
    row = {"id": rid, "question": question, "options": options, "explanation": "",
           **{c: None for c in MMMU_IMAGE_COLUMNS}, "img_type": "['Photographs']", "answer": answer,
           "topic_difficulty": "Medium", "question_type": qtype, "subfield": "x", **extra}
    for k, color in enumerate(images, 1):
        row[f"image_{k}"] = png(color)
    return row


def write_mmmu(root: str) -> str:
    """MMMU/MMMU: one config directory per subject; `dev` and `validation` splits."""
    d = os.path.join(root, "mmmu")
    _parquet(os.path.join(d, "Clinical_Medicine", "validation-00000-of-00001.parquet"), [
        _mmmu_row("validation_Clinical_Medicine_1", "Compare <image 1> with <image 2>. Which organ is shown?",
                  "['Heart', 'Liver', 'Lung']", "B", [RED, BLUE]),
        _mmmu_row("validation_Clinical_Medicine_2", "What is the dose in mg shown in <image 1>?", "[]",
                  "['3.5', '7/2']", [GREEN], qtype="open"),
    ], MMMU_IMAGE_COLUMNS)
    _parquet(os.path.join(d, "Art", "validation-00000-of-00001.parquet"), [
        _mmmu_row("validation_Art_1", "Which style is <image 1>?", "['Baroque', 'Cubism']", "A", [YELLOW]),
    ], MMMU_IMAGE_COLUMNS)
    _parquet(os.path.join(d, "Art", "dev-00000-of-00001.parquet"), [
        _mmmu_row("dev_Art_1", "A dev question <image 1>", "['x', 'y']", "A", [RED]),
    ], MMMU_IMAGE_COLUMNS)
    return d


def write_mmmu_pro(root: str) -> str:
    """MMMU/MMMU_Pro: configs "standard (10 options)" and "vision", split `test`."""
    d = os.path.join(root, "mmmu_pro")
    ten = str([f"opt{i}" for i in range(10)])
    _parquet(os.path.join(d, "standard (10 options)", "test-00000-of-00001.parquet"), [
        {**_mmmu_row("pro_1", "Which drug is in <image 1>?", ten, "J", [RED]), "subject": "Pharmacy"},
        {**_mmmu_row("pro_2", "Which bridge is in <image 1>?", ten, "C", [BLUE]),
         "subject": "Architecture_and_Engineering"},
    ], MMMU_IMAGE_COLUMNS)
    _parquet(os.path.join(d, "vision", "test-00000-of-00001.parquet"), [
        {"id": "pro_1", "image": png(GREEN), "options": str(["a", "b", "c", "d"]), "answer": "D",
         "subject": "Pharmacy"},
    ], ["image"])
    return d


def write_mathvista(root: str) -> str:
    """AI4Math/MathVista `data/testmini-*.parquet` (and a `test` file that must not be read)."""
    d = os.path.join(root, "mathvista")
    meta = {"category": "math-targeted-vqa", "context": "geometry diagram", "grade": "high school",
            "img_height": 10, "img_width": 12, "language": "english", "skills": ["geometry reasoning"],
            "source": "Geometry3K", "split": "testmini", "task": "geometry problem solving"}
    rows = [
        {"pid": "1", "question": "Find x.", "image": "images/1.jpg", "decoded_image": png(RED),
         "choices": ["3", "5", "7", "9"], "unit": None, "precision": None, "answer": "7",
         "question_type": "multi_choice", "answer_type": "text", "metadata": meta,
         "query": "Hint: ... Question: Find x.\nChoices:\n(A) 3\n(B) 5\n(C) 7\n(D) 9"},
        {"pid": "2", "question": "What is the ratio?", "image": "images/2.jpg", "decoded_image": png(BLUE),
         "choices": None, "unit": None, "precision": 2.0, "answer": "1.45", "question_type": "free_form",
         "answer_type": "float", "metadata": meta,
         "query": "Hint: Please answer the question requiring a floating-point number with two decimal places "
                  "and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.\nQuestion: What is the ratio?"},
    ]
    _parquet(os.path.join(d, "data", "testmini-00000-of-00001.parquet"), rows, ["decoded_image"], ["choices"])
    _parquet(os.path.join(d, "data", "test-00000-of-00002.parquet"), rows[:1], ["decoded_image"], ["choices"])
    return d


def write_mathvision(root: str) -> str:
    """MathLLMs/MathVision `data/test-*.parquet`: options list (empty for free-form), letter answers."""
    d = os.path.join(root, "mathvision")
    _parquet(os.path.join(d, "data", "test-00000-of-00001.parquet"), [
        {"id": "1", "question": "<image1>\nHow many triangles?", "options": ["2", "3", "4", "5", "6"],
         "image": "images/1.jpg", "decoded_image": png(YELLOW), "answer": "B", "solution": None, "level": 2,
         "subject": "counting"},
        {"id": "2", "question": "<image1>\nWhat is the area?", "options": [], "image": "images/2.jpg",
         "decoded_image": png(GREEN), "answer": "12", "solution": None, "level": 3,
         "subject": "metric geometry - area"},
    ], ["decoded_image"], ["options"])
    return d


def write_mmstar(root: str) -> str:
    """Lin-Chen/MMStar ships one `mmstar.parquet` (split `val`); options are inline in the question."""
    d = os.path.join(root, "mmstar")
    _parquet(os.path.join(d, "mmstar.parquet"), [
        {"index": 0, "question": "Which colour fills the image?\nOptions: A: red, B: blue, C: green, D: dark, yellow",
         "image": png(BLUE), "answer": "B", "category": "coarse perception", "l2_category": "image style & quality",
         "meta_info": {"source": "MMBench", "split": "val", "image_path": "images/0.jpg"}},
    ], ["image"])
    return d


def write_mmlu_pro(root: str) -> str:
    """TIGER-Lab/MMLU-Pro `data/{test,validation}-*.parquet`."""
    d = os.path.join(root, "mmlu_pro")
    ten = [f"choice {i}" for i in range(10)]
    rows = [
        {"question_id": 70, "question": "Which vitamin deficiency causes scurvy?", "options": ten, "answer": "C",
         "answer_index": 2, "cot_content": "", "category": "health", "src": "ori_mmlu-clinical_knowledge"},
        {"question_id": 71, "question": "What is 2 + 2?", "options": ten[:4], "answer": "D", "answer_index": 3,
         "cot_content": "", "category": "math", "src": "ori_mmlu-elementary_mathematics"},
    ]
    _parquet(os.path.join(d, "data", "test-00000-of-00001.parquet"), rows, list_columns=["options"])
    _parquet(os.path.join(d, "data", "validation-00000-of-00001.parquet"), rows[1:], list_columns=["options"])
    return d


def medqa_row(question, options, letter, meta="step1"):
    return {"question": question, "answer": options[letter], "options": options, "meta_info": meta,
            "answer_idx": letter, "metamap_phrases": ["phrase"]}


def write_medqa(root: str) -> tuple[str, str]:
    """jind11/MedQA `US/test.jsonl` (5 options) and GBaker's 4-option `phrases_no_exclude_test.jsonl`."""
    five = _jsonl(os.path.join(root, "medqa", "US", "test.jsonl"), [
        medqa_row("A 23-year-old woman has a fever. Which drug?",
                  {"A": "Ampicillin", "B": "Ceftriaxone", "C": "Doxycycline", "D": "Nitrofurantoin",
                   "E": "Ciprofloxacin"}, "D"),
    ])
    four_dir = os.path.join(root, "medqa_4op")
    _jsonl(os.path.join(four_dir, "phrases_no_exclude_test.jsonl"), [
        medqa_row("Which nerve is injured?", {"A": "Radial", "B": "Ulnar", "C": "Median", "D": "Axillary"}, "B"),
        medqa_row("Which test next?", {"A": "CT", "B": "MRI", "C": "X-ray", "D": "Biopsy"}, "D"),
    ])
    _jsonl(os.path.join(four_dir, "phrases_no_exclude_train.jsonl"), [
        medqa_row("A training question", {"A": "a", "B": "b", "C": "c", "D": "d"}, "A"),
    ])
    return five, four_dir


def write_medxpertqa(root: str) -> tuple[str, str]:
    """TsinghuaC3I/MedXpertQA `MM/{dev,test}.jsonl`; images (by file name) from the release's images.zip."""
    d = os.path.join(root, "medxpertqa")
    images = os.path.join(root, "medxpertqa_images")
    _save_png(os.path.join(images, "MM-1-a.jpeg"), RED)
    _save_png(os.path.join(images, "MM-1-b.jpeg"), GREEN)
    options = {"A": "Erythema infectiosum", "B": "Cutaneous larva migrans", "C": "Cold agglutinin disease",
               "D": "Cutis marmorata", "E": "Erythema ab igne"}
    row = {"id": "MM-1", "question": "What is the most probable diagnosis?\nAnswer Choices: (A) Erythema "
           "infectiosum (B) Cutaneous larva migrans (C) Cold agglutinin disease (D) Cutis marmorata "
           "(E) Erythema ab igne",
           "options": options, "label": "C", "images": ["MM-1-a.jpeg", "MM-1-b.jpeg"], "medical_task": "Diagnosis",
           "body_system": "Integumentary", "question_type": "Reasoning"}
    _jsonl(os.path.join(d, "MM", "test.jsonl"), [row])
    _jsonl(os.path.join(d, "MM", "dev.jsonl"), [{**row, "id": "MM-dev"}])
    return d, images


def write_omnimedvqa(root: str) -> str:
    """OmniMedVQA: `QA_information/Open-access/<dataset>.json` lists; images under `Images/`."""
    d = os.path.join(root, "OmniMedVQA")
    qa = os.path.join(d, "QA_information", "Open-access")
    os.makedirs(qa)
    _save_png(os.path.join(d, "Images", "Chest CT Scan", "test", "a.png"), BLUE)
    _save_png(os.path.join(d, "Images", "Fundus", "b.png"), YELLOW)
    with open(os.path.join(qa, "Chest CT Scan.json"), "w") as f:
        json.dump([{"dataset": "Chest CT Scan", "question_id": "Chest CT Scan_0001",
                    "question_type": "Disease Diagnosis",
                    "question": "What abnormality is seen?", "gt_answer": "Adenocarcinoma",
                    "image_path": "Images/Chest CT Scan/test/a.png", "option_A": "Normal",
                    "option_B": "Adenocarcinoma", "option_C": "Squamous cell carcinoma",
                    "option_D": "Large cell carcinoma",
                    "modality_type": "CT(Computed Tomography)"}], f)
    with open(os.path.join(qa, "Fundus.json"), "w") as f:
        json.dump([{"dataset": "Fundus", "question_id": "Fundus_0001", "question_type": "Modality Recognition",
                    "question": "What imaging modality is used?", "gt_answer": "Fundus photography",
                    "image_path": "Images/Fundus/b.png", "option_A": "Fundus photography", "option_B": "MRI",
                    "modality_type": "Fundus Photography"}], f)
    return d


def write_nejm(root: str) -> str:
    d = os.path.join(root, "nejm")
    _save_png(os.path.join(d, "images", "1.png"), GREEN)
    return _jsonl(os.path.join(d, "nejm.jsonl"), [
        {"id": "2023-05-04", "question": "A 54-year-old man presents with this rash. What is the diagnosis?",
         "options": {"A": "Psoriasis", "B": "Tinea corporis", "C": "Lichen planus", "D": "Eczema",
                     "E": "Pityriasis rosea"},
         "answer": "Lichen planus", "image_path": "images/1.png"},
    ])
