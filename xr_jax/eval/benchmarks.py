"""The paper's evaluation benchmarks: one reader per public format, and a registry by name.

Each `Benchmark` knows where its data lives (a hub id, config(s) and split), how to turn one row of its
public format into a `BenchmarkItem` (question, gold answer(s), option letters, decoded images), which
prompt template it uses, and an optional subset filter (the paper's "-Health" subsets). Rows are read
by `data.files.read_rows` (JSON, JSON lines, parquet, arrow, csv, and hub ids when online); JSON rows are parsed
one by one, because several benchmarks ship JSON files whose rows do not share one schema (OmniMedVQA).

A row that does not fit its format raises `BenchmarkFormatError` naming the benchmark, the row and the
field: a silently skipped row would change the denominator of a published number.

Formats were written from each benchmark's dataset card / release (see docs/evaluation.md):
- GSM8K            `{question, answer}`; the final answer follows `####`.
- ORZ eval         `{prompt: [{from, value}], final_answer, choices?}` (math500, aime2024, gpqa_diamond);
                   HuggingFaceH4/MATH-500's `{problem, answer}` is read too.
- MMLU-Pro         `{question_id, question, options: list, answer: letter, answer_index, category}`.
- MedQA            `{question, answer: text, options: {A: ...}, answer_idx: letter, meta_info}`
                   (jind11/MedQA US 5-option files and GBaker/MedQA-USMLE-4-options); bigbio/med_qa's
                   `options: [{key, value}]` too (the RL reader `sources.medqa_format`).
- MMMU / MMMU-Pro  `{id, question, options: "['..', ..]" (a stringified list), answer, image_1..image_7,
                   question_type, subject?}`; `<image k>` placeholders refer to `image_k`.
                   MMMU-Pro vision: `{id, image, options, answer, subject}` (question inside the image).
- MathVista        `{pid, question, decoded_image, choices, answer, question_type, answer_type, query}`.
- MathVision       `{id, question, options: list, decoded_image, answer, level, subject}`.
- MMStar           `{index, question (options inline: "Options: A: .., B: .."), image, answer, category}`.
- MedXpertQA MM    `{id, question (choices inline), options: {A..E}, label, images: [file names]}`.
- OmniMedVQA       `{question_id, question, gt_answer: text, option_A.., image_path, dataset, ...}`.
- NEJM Image Ch.   no canonical public release; the documented schema is
                   `{id, question, options: {A..E} | list, answer: letter | option text, image | image_path}`.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import random
import re
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Sequence

from xr_jax.data import files
from xr_jax.errors import UserError

Kind = Literal["multiple_choice", "math"]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class BenchmarkFormatError(UserError, ValueError):
    """A row (or a whole source) that does not fit its benchmark's public format."""


@dataclasses.dataclass(frozen=True)
class BenchmarkItem:
    """One evaluation question.

    answers: the gold answer first, then any other accepted forms (MMMU open questions list several).
        For multiple choice it is the option letter.
    choices: {letter: option text} in order (multiple choice), else None.
    show_options: whether the prompt template should append the options block; False where the
        benchmark's own question text (or image) already lists them (GPQA, MMStar, MedXpertQA, MMMU-Pro vision).
    images: decoded RGB PIL images, in the order the question refers to them.
    """

    benchmark: str
    id: str
    question: str
    answers: tuple[str, ...]
    kind: Kind
    choices: Optional[dict[str, str]] = None
    show_options: bool = True
    images: tuple = ()
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def answer(self) -> str:
        return self.answers[0]


@dataclasses.dataclass(frozen=True)
class ReadContext:
    """What a row reader needs besides the row: names for errors, and where relative image paths live."""

    benchmark: str
    index: int
    image_root: Optional[str] = None
    where: Optional[str] = None  # the row's file and line (JSON lines) or row number, for messages

    def error(self, message: str) -> BenchmarkFormatError:
        at = f" ({self.where})" if self.where else ""
        return BenchmarkFormatError(f"{self.benchmark} row {self.index}{at}: {message}")


RowReader = Callable[[Mapping[str, Any], ReadContext], BenchmarkItem]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A benchmark: its data location, row reader, prompt family and optional subset filter.

    prompt: "mc" (the paper's multiple-choice template) or "math" (its math template); items without
        options always get the math template, whose wording covers "the option letter or the number".
    configs: hub configs read and concatenated (MMMU has one per subject); for a local snapshot of the hub
        repository, the sub-directories of those names.
    """

    name: str
    reader: RowReader
    prompt: Literal["mc", "math"]
    hub_id: Optional[str] = None
    split: str = "test"
    configs: tuple[str, ...] = ()
    keep: Optional[Callable[[BenchmarkItem], bool]] = None
    paper_size: Optional[int] = None
    description: str = ""


# ----------------------------------------------------------------------------- field helpers


def _get(row: Mapping, key: str, ctx: ReadContext, kind: type | tuple = str) -> Any:
    if key not in row or row[key] is None:
        raise ctx.error(f"missing field {key!r} (found {sorted(map(str, row))})")
    value = row[key]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ctx.error(f"field {key!r} should be {expected}, got {type(value).__name__}")
    return value


def _text(row: Mapping, key: str, ctx: ReadContext) -> str:
    value = _get(row, key, ctx, (str, int, float))
    value = str(value)
    if not value.strip():
        raise ctx.error(f"field {key!r} is empty")
    return value


def _row_id(row: Mapping, ctx: ReadContext, *keys: str) -> str:
    for key in keys:
        if row.get(key) not in (None, ""):
            return f"{ctx.benchmark}:{row[key]}"
    return f"{ctx.benchmark}:{ctx.index}"


def choices_from_list(options: Sequence[str], ctx: ReadContext) -> dict[str, str]:
    if len(options) > len(LETTERS):
        raise ctx.error(f"{len(options)} options is more than the {len(LETTERS)} letters")
    return {LETTERS[i]: str(o) for i, o in enumerate(options)}


def parse_list_string(value: Any, ctx: ReadContext, key: str = "options") -> list[str]:
    """MMMU's `options` / open `answer`: a Python-literal list written as a string ("['a', 'b']")."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if not isinstance(value, str):
        raise ctx.error(f"field {key!r} should be a list or a stringified list, got {type(value).__name__}")
    try:
        parsed = ast.literal_eval(value)  # literals only: never evaluates code
    except (ValueError, SyntaxError) as e:
        raise ctx.error(f"field {key!r} is not a stringified list: {value[:80]!r} ({e})") from None
    if not isinstance(parsed, (list, tuple)):
        raise ctx.error(f"field {key!r} should hold a list, got {type(parsed).__name__}")
    return [str(v) for v in parsed]


def _letter(value: Any, choices: Mapping[str, str], ctx: ReadContext, key: str) -> str:
    letter = str(value).strip()
    if letter not in choices:
        raise ctx.error(f"answer {key}={letter!r} is not one of the option letters {list(choices)}")
    return letter


def _letter_of_text(text: str, choices: Mapping[str, str], ctx: ReadContext, key: str) -> str:
    for letter, option in choices.items():
        if option.strip() == str(text).strip():
            return letter
    raise ctx.error(f"answer {key}={text!r} is not the text of any option {list(choices.values())}")


# ----------------------------------------------------------------------------- images


def decode_image(cell: Any, ctx: ReadContext, base_dir: Optional[str] = None):
    """A datasets Image cell (PIL image, or {bytes, path}), raw bytes, or a file path -> RGB PIL image.

    Relative paths are resolved against the source's `image_root` (for benchmarks that ship images in a
    separate archive: MedXpertQA, OmniMedVQA, NEJM), else against `base_dir` (the data file's folder).
    """
    from xr_jax.data.images import ImageError, load_image

    if isinstance(cell, Mapping) and cell.get("bytes") is None and cell.get("path"):
        cell = cell["path"]
    if isinstance(cell, str) and not os.path.isabs(cell):
        roots = [r for r in (ctx.image_root, base_dir) if r]
        found = [os.path.join(r, cell) for r in roots if os.path.exists(os.path.join(r, cell))]
        if not found:
            raise ctx.error(
                f"image {cell!r} not found under {roots or 'any folder'}; set the source's image_root "
                "to the folder the benchmark's image archive was extracted to"
            )
        cell = found[0]
    try:
        return load_image(cell, f"{ctx.benchmark} row {ctx.index}")
    except ImageError as e:
        raise BenchmarkFormatError(str(e)) from e


_MMMU_PLACEHOLDER = re.compile(r"<image ?(\d+)>")


def _numbered_images(row: Mapping, text: str, ctx: ReadContext) -> tuple:
    """MMMU-style `image_1..image_7` columns; every `<image k>` placeholder in the text must have its image."""
    images, present = [], set()
    for k in range(1, 8):
        cell = row.get(f"image_{k}")
        if cell is not None:
            images.append(decode_image(cell, ctx, row.get("_base_dir")))
            present.add(k)
    referenced = {int(k) for k in _MMMU_PLACEHOLDER.findall(text)}
    if referenced - present:
        raise ctx.error(f"the text refers to <image {sorted(referenced - present)[0]}> but that image column is empty")
    return tuple(images)


# ----------------------------------------------------------------------------- readers


def _from_source_format(fmt, row: Mapping, ctx: ReadContext):
    """An `Example` through one of the data pipeline's readers (`xr_jax.data.sources`), errors renamed."""
    from xr_jax.data.sources import BadRow

    try:
        return fmt.to_example({k: v for k, v in row.items() if k != "_base_dir"}, f"{ctx.benchmark}:{ctx.index}")
    except BadRow as e:
        raise ctx.error(str(e)) from None


def read_gsm8k(row: Mapping, ctx: ReadContext) -> BenchmarkItem:
    """GSM8K through the data pipeline's reader; thousands separators are dropped from the final answer."""
    from xr_jax.data.sources import gsm8k_format

    ex = _from_source_format(gsm8k_format(), row, ctx)
    return BenchmarkItem(ctx.benchmark, ex.id, ex.question, (ex.answer.replace(",", ""),), "math")


def read_orz_eval(row: Mapping, ctx: ReadContext) -> BenchmarkItem:
    """ORZ eval files through the data pipeline's reader; HuggingFaceH4/MATH-500's `{problem, answer}` too."""
    from xr_jax.data.sources import orz_eval_format

    if "prompt" not in row and "problem" in row:
        rid = _row_id(row, ctx, "unique_id")
        answer = _text(row, "answer", ctx).strip()
        return BenchmarkItem(ctx.benchmark, rid, _text(row, "problem", ctx), (answer,), "math")
    ex = _from_source_format(orz_eval_format(), row, ctx)
    if ex.choices:
        # The ORZ GPQA prompt already lists the options as "A. ..." lines.
        return BenchmarkItem(ctx.benchmark, ex.id, ex.question, (_letter(ex.answer, ex.choices, ctx, "final_answer"),),
                             "multiple_choice", ex.choices, show_options=False)
    return BenchmarkItem(ctx.benchmark, ex.id, ex.question, (ex.answer,), "math")


def read_mmlu_pro(row: Mapping, ctx: ReadContext) -> BenchmarkItem:
    choices = choices_from_list(_get(row, "options", ctx, (list, tuple)), ctx)
    letter = _letter(_text(row, "answer", ctx), choices, ctx, "answer")
    index = row.get("answer_index")
    if index is not None and LETTERS[int(index)] != letter:
        raise ctx.error(f"answer {letter!r} disagrees with answer_index {index}")
    return BenchmarkItem(ctx.benchmark, _row_id(row, ctx, "question_id"), _text(row, "question", ctx),
                         (letter,), "multiple_choice", choices, meta={"category": row.get("category")})


def read_medqa(row: Mapping, ctx: ReadContext) -> BenchmarkItem:
    """MedQA through the data pipeline's reader (the RL source `medqa`), so RL and evaluation read alike."""
    from xr_jax.data.sources import medqa_format

    ex = _from_source_format(medqa_format(), row, ctx)
    return BenchmarkItem(ctx.benchmark, _row_id(row, ctx, "id"), ex.question, (ex.answer,), "multiple_choice",
                         ex.choices, meta={"meta_info": ex.meta.get("meta_info")})


def read_mmmu(row: Mapping, ctx: ReadContext) -> BenchmarkItem:
    """MMMU (val) and MMMU-Pro standard: stringified `options`, `<image k>` placeholders, image_1..image_7."""
    question = _text(row, "question", ctx)
    options = parse_list_string(_get(row, "options", ctx, (str, list, tuple)), ctx)
    images = _numbered_images(row, question + " " + " ".join(options), ctx)
    subject = row.get("subject") or _mmmu_subject(str(row.get("id", "")))
    meta = {"subject": subject}
    rid = _row_id(row, ctx, "id")
    if options and row.get("question_type", "multiple-choice") == "multiple-choice":
        choices = choices_from_list(options, ctx)
        letter = _letter(_text(row, "answer", ctx), choices, ctx, "answer")
        return BenchmarkItem(ctx.benchmark, rid, question, (letter,), "multiple_choice", choices,
                             images=images, meta=meta)
    raw = _text(row, "answer", ctx)
    answers = tuple(parse_list_string(raw, ctx, "answer")) if raw.strip().startswith("[") else (raw.strip(),)
    return BenchmarkItem(ctx.benchmark, rid, question, answers, "math", images=images, meta=meta)


def _mmmu_subject(row_id: str) -> Optional[str]:
    """MMMU ids are `{split}_{Subject}_{n}` (e.g. `validation_Clinical_Medicine_7`)."""
    m = re.fullmatch(r"(?:dev|validation|test)_(.+)_\d+", row_id)
    return m.group(1) if m else None


MMMU_PRO_VISION_QUESTION = "Answer the multiple-choice question shown in the image."  # [xr_jax default]


def read_mmmu_pro_vision(row: Mapping, ctx: ReadContext) -> BenchmarkItem:
    """MMMU-Pro vision: question and options are rendered inside the one image; `options` (when present)
    serve only to recognise an answer given as option text."""
    image = decode_image(_get(row, "image", ctx, object), ctx, row.get("_base_dir"))
    choices = choices_from_list(parse_list_string(row["options"], ctx), ctx) if row.get("options") else None
    letter = _text(row, "answer", ctx).strip()
    if choices is not None:
        letter = _letter(letter, choices, ctx, "answer")
    elif letter not in LETTERS:
        raise ctx.error(f"answer {letter!r} is not an option letter")
    return BenchmarkItem(ctx.benchmark, _row_id(row, ctx, "id"), MMMU_PRO_VISION_QUESTION, (letter,),
                         "multiple_choice", choices, show_options=False, images=(image,),
                         meta={"subject": row.get("subject")})


def read_mathvista(row: Mapping, ctx: ReadContext) -> BenchmarkItem:
    """Multiple choice: the bare `question` with `choices` as options (the answer is an option's text).
    Free form: `query`, whose hint states the expected form (integer, 2-decimal float, list)."""
    image = decode_image(_get(row, "decoded_image", ctx, object), ctx, row.get("_base_dir"))
    meta = {"question_type": row.get("question_type"), "answer_type": row.get("answer_type"),
            "precision": row.get("precision"), "unit": row.get("unit")}
    rid = _row_id(row, ctx, "pid")
    qtype = _text(row, "question_type", ctx)
    if qtype == "multi_choice":
        choices = choices_from_list(_get(row, "choices", ctx, (list, tuple)), ctx)
        letter = _letter_of_text(_text(row, "answer", ctx), choices, ctx, "answer")
        return BenchmarkItem(ctx.benchmark, rid, _text(row, "question", ctx), (letter,), "multiple_choice",
                             choices, images=(image,), meta=meta)
    if qtype != "free_form":
        raise ctx.error(f"question_type {qtype!r} is neither 'multi_choice' nor 'free_form'")
    question = row.get("query") or _text(row, "question", ctx)
    return BenchmarkItem(ctx.benchmark, rid, question, (_text(row, "answer", ctx).strip(),), "math",
                         images=(image,), meta=meta)


def read_mathvision(row: Mapping, ctx: ReadContext) -> BenchmarkItem:
    image = decode_image(_get(row, "decoded_image", ctx, object), ctx, row.get("_base_dir"))
    question = _text(row, "question", ctx)
    options = list(row.get("options") or [])
    meta = {"subject": row.get("subject"), "level": row.get("level")}
    rid = _row_id(row, ctx, "id")
    answer = _text(row, "answer", ctx).strip()
    if options:
        choices = choices_from_list(options, ctx)
        return BenchmarkItem(ctx.benchmark, rid, question, (_letter(answer, choices, ctx, "answer"),),
                             "multiple_choice", choices, images=(image,), meta=meta)
    return BenchmarkItem(ctx.benchmark, rid, question, (answer,), "math", images=(image,), meta=meta)


_MMSTAR_OPTION = re.compile(r"(?:^|,\s*)([A-F]):\s*")


def parse_inline_options(text: str) -> Optional[dict[str, str]]:
    """MMStar's "Options: A: x, B: y, C: z" tail -> {letter: text}; None when it does not parse cleanly."""
    head, sep, tail = text.rpartition("Options:")
    if not sep:
        return None
    parts = _MMSTAR_OPTION.split(tail.strip())
    letters, texts = parts[1::2], parts[2::2]
    if not letters or "".join(letters) != LETTERS[: len(letters)]:
        return None
    return {letter: t.strip() for letter, t in zip(letters, texts)}


def read_mmstar(row: Mapping, ctx: ReadContext) -> BenchmarkItem:
    question = _text(row, "question", ctx)
    choices = parse_inline_options(question)
    letter = _text(row, "answer", ctx).strip()
    if choices is not None:
        letter = _letter(letter, choices, ctx, "answer")
    elif letter not in LETTERS:
        raise ctx.error(f"answer {letter!r} is not an option letter")
    image = decode_image(_get(row, "image", ctx, object), ctx, row.get("_base_dir"))
    return BenchmarkItem(ctx.benchmark, _row_id(row, ctx, "index"), question, (letter,), "multiple_choice",
                         choices, show_options=False, images=(image,),
                         meta={"category": row.get("category"), "l2_category": row.get("l2_category")})


def read_medxpertqa(row: Mapping, ctx: ReadContext) -> BenchmarkItem:
    options = _get(row, "options", ctx, Mapping)
    choices = {str(k): str(v) for k, v in options.items() if v is not None}
    letter = _letter(_text(row, "label", ctx), choices, ctx, "label")
    names = _get(row, "images", ctx, (list, tuple))
    images = tuple(decode_image(name, ctx, row.get("_base_dir")) for name in names)
    return BenchmarkItem(ctx.benchmark, _row_id(row, ctx, "id"), _text(row, "question", ctx), (letter,),
                         "multiple_choice", choices, show_options=False, images=images,
                         meta={"medical_task": row.get("medical_task"), "body_system": row.get("body_system")})


def read_omnimedvqa(row: Mapping, ctx: ReadContext) -> BenchmarkItem:
    choices = {L: str(row[f"option_{L}"]) for L in LETTERS[:6] if row.get(f"option_{L}") not in (None, "")}
    if len(choices) < 2:
        raise ctx.error(f"fewer than two option_X fields (found {sorted(map(str, row))})")
    letter = _letter_of_text(_text(row, "gt_answer", ctx), choices, ctx, "gt_answer")
    image = decode_image(_text(row, "image_path", ctx), ctx, row.get("_base_dir"))
    return BenchmarkItem(ctx.benchmark, _row_id(row, ctx, "question_id"), _text(row, "question", ctx), (letter,),
                         "multiple_choice", choices, images=(image,),
                         meta={"dataset": row.get("dataset"), "question_type": row.get("question_type"),
                               "modality_type": row.get("modality_type")})


def read_nejm(row: Mapping, ctx: ReadContext) -> BenchmarkItem:
    options = _get(row, "options", ctx, (Mapping, list, tuple))
    choices = ({str(k): str(v) for k, v in options.items()} if isinstance(options, Mapping)
               else choices_from_list(options, ctx))
    answer = _text(row, "answer", ctx).strip()
    letter = answer if answer in choices else _letter_of_text(answer, choices, ctx, "answer")
    cell = row.get("image") if row.get("image") is not None else _get(row, "image_path", ctx, str)
    image = decode_image(cell, ctx, row.get("_base_dir"))
    return BenchmarkItem(ctx.benchmark, _row_id(row, ctx, "id"), _text(row, "question", ctx), (letter,),
                         "multiple_choice", choices, images=(image,))


# ----------------------------------------------------------------------------- registry

MMMU_SUBJECTS = (
    "Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory", "Basic_Medical_Science",
    "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science", "Design",
    "Diagnostics_and_Laboratory_Medicine", "Economics", "Electronics", "Energy_and_Power", "Finance",
    "Geography", "History", "Literature", "Manage", "Marketing", "Materials", "Math", "Mechanical_Engineering",
    "Music", "Pharmacy", "Physics", "Psychology", "Public_Health", "Sociology",
)
# MMMU's "Health & Medicine" discipline: 5 subjects x 30 = the paper's 150 MMMU-Health questions.
HEALTH_SUBJECTS = ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                   "Pharmacy", "Public_Health")


def _health(item: BenchmarkItem) -> bool:
    return item.meta.get("subject") in HEALTH_SUBJECTS


def _mmlu_pro_health(item: BenchmarkItem) -> bool:
    return item.meta.get("category") == "health"


BENCHMARKS: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    if benchmark.name in BENCHMARKS:
        raise ValueError(f"benchmark {benchmark.name!r} is already registered")
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def get(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


for _b in (
    Benchmark("gsm8k", read_gsm8k, "math", "openai/gsm8k", "test", ("main",), paper_size=1319,
              description="GSM8K main test"),
    Benchmark("math500", read_orz_eval, "math", "HuggingFaceH4/MATH-500", "test", paper_size=500,
              description="MATH500 (ORZ eval_data/math500.json, or HuggingFaceH4/MATH-500)"),
    Benchmark("aime2024", read_orz_eval, "math", None, "test", paper_size=30,
              description="AIME 2024 (ORZ eval_data/aime2024.json)"),
    Benchmark("gpqa_diamond", read_orz_eval, "mc", None, "test", paper_size=198,
              description="GPQA-diamond (ORZ eval_data/gpqa_diamond.json)"),
    Benchmark("mmlu_pro", read_mmlu_pro, "mc", "TIGER-Lab/MMLU-Pro", "test", paper_size=12032,
              description="MMLU-Pro test"),
    Benchmark("mmlu_pro_health", read_mmlu_pro, "mc", "TIGER-Lab/MMLU-Pro", "test", keep=_mmlu_pro_health,
              paper_size=818, description="MMLU-Pro, category 'health'"),
    Benchmark("medqa", read_medqa, "mc", None, "test", paper_size=1273,
              description="MedQA USMLE original 5-option test (jind11/MedQA data_clean/questions/US/test.jsonl)"),
    Benchmark("medqa_4op", read_medqa, "mc", "GBaker/MedQA-USMLE-4-options", "test", paper_size=1273,
              description="MedQA USMLE 4-option test"),
    Benchmark("mmmu_val", read_mmmu, "mc", "MMMU/MMMU", "validation", MMMU_SUBJECTS, paper_size=900,
              description="MMMU validation, 30 subjects"),
    Benchmark("mmmu_health", read_mmmu, "mc", "MMMU/MMMU", "validation", HEALTH_SUBJECTS, keep=_health,
              paper_size=150, description="MMMU validation, Health & Medicine subjects"),
    Benchmark("mmmu_pro", read_mmmu, "mc", "MMMU/MMMU_Pro", "test", ("standard (10 options)",),
              paper_size=1730, description="MMMU-Pro standard setting, 10 options"),
    Benchmark("mmmu_pro_4op", read_mmmu, "mc", "MMMU/MMMU_Pro", "test", ("standard (4 options)",),
              paper_size=1730, description="MMMU-Pro standard setting, 4 options"),
    Benchmark("mmmu_pro_vision", read_mmmu_pro_vision, "mc", "MMMU/MMMU_Pro", "test", ("vision",),
              paper_size=1730, description="MMMU-Pro vision setting (question inside the image)"),
    Benchmark("mmmu_pro_health", read_mmmu, "mc", "MMMU/MMMU_Pro", "test", ("standard (10 options)",),
              keep=_health, paper_size=286, description="MMMU-Pro standard (10 options), health subjects"),
    Benchmark("mathvista", read_mathvista, "math", "AI4Math/MathVista", "testmini", paper_size=1000,
              description="MathVista testmini"),
    Benchmark("mathvision", read_mathvision, "math", "MathLLMs/MathVision", "test", paper_size=3040,
              description="MATH-Vision test"),
    Benchmark("mmstar", read_mmstar, "mc", "Lin-Chen/MMStar", "val", paper_size=1500, description="MMStar val"),
    Benchmark("medxpertqa_mm", read_medxpertqa, "mc", "TsinghuaC3I/MedXpertQA", "test", ("MM",),
              paper_size=2000, description="MedXpertQA MM test (images from the release's images.zip)"),
    Benchmark("omnimedvqa", read_omnimedvqa, "mc", None, "test", paper_size=1000,
              description="OmniMedVQA open-access QA (the paper used a 1,000-question subset)"),
    Benchmark("nejm", read_nejm, "mc", None, "test", paper_size=947, description="NEJM Image Challenge"),
):
    register(_b)


# ----------------------------------------------------------------------------- reading


def read_rows(path_or_id: str, split: str, configs: Sequence[str] = ()) -> Iterator[tuple[str, dict]]:
    """(where, row) of a local file/directory or a hub id (`files.read_rows`); where names the file and line or
    row (for messages), each row has `_base_dir` (for relative image paths). A malformed row is refused: a
    silently skipped one would change the denominator of a published number."""
    try:
        rows = files.read_rows(path_or_id, split, configs)
    except files.BadFile as e:
        raise BenchmarkFormatError(str(e)) from None
    for i in range(len(rows)):
        where = rows.where(i)
        try:
            row = rows[i]
        except files.BadRow as e:
            raise BenchmarkFormatError(f"{where}: {e.detail}") from None
        if not isinstance(row, dict):
            raise BenchmarkFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, {**row, "_base_dir": rows.base_dir(i)}


def load_benchmark(
    name: str, path: Optional[str] = None, *, split: Optional[str] = None, image_root: Optional[str] = None,
    limit: Optional[int] = None, subsample_seed: Optional[int] = None,
) -> list[BenchmarkItem]:
    """The items of benchmark `name` from `path` (a local file/dir or hub id; default: the registry's hub id).

    limit: keep the first `limit` items, or — with `subsample_seed` — a seeded random subset of that size
    in the original order (e.g. the paper's 1,000-question OmniMedVQA subset, whose ids are unpublished).
    """
    bench = get(name)
    source = path or bench.hub_id
    if source is None:
        raise ValueError(f"benchmark {name!r} has no hub copy; give the path to its files (see docs/evaluation.md)")
    items = []
    for index, (where, row) in enumerate(read_rows(source, split or bench.split, bench.configs)):
        item = bench.reader(row, ReadContext(name, index, image_root, where))
        if bench.keep is None or bench.keep(item):
            items.append(item)
    if not items:
        raise BenchmarkFormatError(f"{name}: no items read from {source!r} (split {split or bench.split!r})")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise BenchmarkFormatError(f"{name}: duplicate item id {dup!r}; ids must be unique to score and rescore")
    if limit is not None and limit < len(items):
        if subsample_seed is None:
            items = items[:limit]
        else:
            keep = sorted(random.Random(subsample_seed).sample(range(len(items)), limit))
            items = [items[i] for i in keep]
    return items
