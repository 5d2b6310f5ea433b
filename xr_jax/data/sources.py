"""Readers: one normalised `Example` per row of OpenThoughts, Orz-math, ORZ-eval, GSM8K, MedQA (and the synthetic task).

Rows come from `files.read_rows` (local json/jsonl/parquet/arrow/csv files or directories, or a hub id when
online). A JSON row is parsed on access, so one bad line (invalid JSON, non-UTF-8, a field of the wrong type)
becomes one counted skip in the pipeline instead of a failed load. A source whose schema does not match at all
fails in `load_source` with the expected and found fields named.

A format's `to_example(row, rid)` raises `BadRow(reason, detail)` for a malformed row; the pipeline skips and
counts it (pipeline.py). Ids are stable: `"{source}:{row index}"` in the file's own order (or the row's own
`id` field when the data carries one).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Optional

from xr_jax.data import templates
from xr_jax.data.files import BadRow, read_rows
from xr_jax.errors import UserError

SCHEMA_SAMPLE_ROWS = 32  # rows inspected at start to decide whether a raw-JSON source has the right schema


class SchemaError(UserError, ValueError):
    """The source's columns do not fit the format at all (raised at start, not in the middle of a run)."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One normalised example.

    question: the problem text, without any prompt template.
    response: the SFT target (assistant turn), already in the `<think>…</think>…<answer>…</answer>` form.
    answer: the verifiable ground truth (RL / eval), e.g. "18", "\\frac{1}{2}", "C".
    choices: multiple-choice options {letter: text} (RL and eval), in order.
    images: image references (paths, bytes, PIL images, arrays, datasets Image cells), images first in the turn.
    meta: anything else worth carrying to evaluation logs (file name, domain).
    """

    id: str
    question: str
    response: Optional[str] = None
    answer: Optional[str] = None
    choices: Optional[dict[str, str]] = None
    images: tuple = ()
    system: Optional[str] = None
    meta: dict = dataclasses.field(default_factory=dict)


# -- field helpers ----------------------------------------------------------------------------------------


def _field(row: Mapping, key: str, kind: type = str) -> Any:
    if not isinstance(row, Mapping):
        raise BadRow("wrong_type", f"expected an object with {key!r}, got {type(row).__name__}")
    if key not in row or row[key] is None:
        raise BadRow("missing_field", f"no {key!r} (found {sorted(map(str, row))})")
    value = row[key]
    if not isinstance(value, kind):
        raise BadRow("wrong_type", f"{key!r} should be {kind.__name__}, got {type(value).__name__}")
    return value


def _text(row: Mapping, key: str, empty_reason: str = "empty_field") -> str:
    value = _field(row, key, str)
    if not value.strip():
        raise BadRow(empty_reason, f"{key!r} is empty")
    return value


# -- formats -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Format:
    """How one dataset's rows map to `Example`s. `required` lists the top-level fields checked at start."""

    name: str
    required: tuple[str, ...]
    to_example: Callable[[Mapping, str], Example]
    alternatives: tuple[tuple[str, ...], ...] = ()  # other accepted column sets (e.g. datasets' "0"/"1")


# OpenThoughts markers -> X-Reasoner tags ([xr_jax default]: the paper trains on the tagged form).
OPENTHOUGHTS_MARKERS: dict[str, str] = {
    "<|begin_of_thought|>": "<think>",
    "<|end_of_thought|>": "</think>",
    "<|begin_of_solution|>": "<answer>",
    "<|end_of_solution|>": "</answer>",
}


def rewrite_markers(text: str, markers: Mapping[str, str]) -> str:
    for old, new in markers.items():
        text = text.replace(old, new)
    return text


def openthoughts_format(markers: Optional[Mapping[str, str]] = OPENTHOUGHTS_MARKERS, keep_system: bool = False) -> Format:
    """`{system, conversations: [{from: user|human, value}, {from: assistant|gpt, value}]}`.

    markers: the marker rewrite (None keeps the Sky-T1 markers). keep_system: keep the dataset's own system
    prompt (it asks for the `<|begin_of_thought|>` format, so it is dropped by default).
    """

    def to_example(row: Mapping, rid: str) -> Example:
        turns = _field(row, "conversations", list)
        if len(turns) < 2:
            raise BadRow("missing_field", f"'conversations' has {len(turns)} turns, need a user and an assistant turn")
        user, assistant = turns[0], turns[1]
        if _field(user, "from") not in ("user", "human"):
            raise BadRow("wrong_role", f"first turn is from {user['from']!r}, expected 'user'")
        if _field(assistant, "from") not in ("assistant", "gpt"):
            raise BadRow("wrong_role", f"second turn is from {assistant['from']!r}, expected 'assistant'")
        question = _text(user, "value", "empty_question")
        response = _text(assistant, "value", "empty_response")
        if markers:
            response = rewrite_markers(response, markers)
        system = row.get("system") if keep_system and isinstance(row.get("system"), str) else None
        return Example(id=str(row.get("id", rid)), question=question, response=response, system=system)

    return Format("openthoughts", ("conversations",), to_example)


def _orz_turns(row: Any) -> tuple[Mapping, Mapping]:
    """A 2-element list (the ORZ file) or a row with columns "0"/"1" (the same file through `datasets`)."""
    if isinstance(row, Mapping) and "0" in row:
        turns = [row.get("0"), row.get("1")]
    elif isinstance(row, list):
        turns = row
    else:
        raise BadRow("wrong_type", f"expected a [question, answer] pair, got {type(row).__name__}")
    if len(turns) != 2 or not all(isinstance(t, Mapping) for t in turns):
        raise BadRow("wrong_type", f"expected exactly 2 turn objects, got {turns!r:.120}")
    return turns[0], turns[1]


def orz_math_format() -> Format:
    """Orz-math-57k: `[{from: human, value}, {from: assistant, ground_truth: {value}}]`."""

    def to_example(row: Any, rid: str) -> Example:
        human, assistant = _orz_turns(row)
        if _field(human, "from") not in ("human", "Human", "user"):
            raise BadRow("wrong_role", f"first turn is from {human['from']!r}, expected 'human'")
        question = _text(human, "value", "empty_question")
        answer = _text(_field(assistant, "ground_truth", Mapping), "value", "empty_answer").strip()
        return Example(id=rid, question=question, answer=answer)

    return Format("orz_math", ("0", "1"), to_example)


def orz_eval_format(file_name: str = "") -> Format:
    """ORZ eval files (math500, aime, gpqa_diamond): `{prompt: [{from: user, value}], final_answer, choices?}`."""

    def to_example(row: Mapping, rid: str) -> Example:
        prompt = _field(row, "prompt", list)
        if not prompt:
            raise BadRow("missing_field", "'prompt' is an empty list")
        question = _text(prompt[0], "value", "empty_question")
        answer = _field(row, "final_answer", object)
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise BadRow("wrong_type", f"'final_answer' should be a string, got {type(answer).__name__}")
        answer = str(answer).strip()
        if not answer:
            raise BadRow("empty_answer", "'final_answer' is empty")
        choices = row.get("choices")
        if choices is not None:
            if not isinstance(choices, Mapping) or not all(isinstance(v, str) for v in choices.values()):
                raise BadRow("wrong_type", "'choices' should map letters to strings")
            choices = {str(k): v for k, v in choices.items() if v is not None}
        # ORZ prompts already list the options (`A. …` lines): the prompt template must not add them again.
        return Example(id=rid, question=question, answer=answer, choices=choices or None,
                       meta={"file_name": file_name, "options_in_question": bool(choices)})

    return Format("orz_eval", ("prompt", "final_answer"), to_example)


GSM8K_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_format(strip_calculator: bool = True) -> Format:
    """GSM8K `{question, answer}`: the final answer follows `####`; the worked solution before it becomes the
    SFT trace `<think>\\n{steps}\\n</think>\\n\\n<answer>{final}</answer>` (calculator `<<…>>` removed)."""

    def to_example(row: Mapping, rid: str) -> Example:
        question = _text(row, "question", "empty_question")
        solution = _text(row, "answer", "empty_answer")
        if "####" not in solution:
            raise BadRow("empty_answer", "'answer' has no '####' final answer")
        steps, final = solution.rsplit("####", 1)
        final = final.strip()
        if not final:
            raise BadRow("empty_answer", "nothing after '####'")
        steps = steps.strip()
        if strip_calculator:
            steps = GSM8K_CALCULATOR.sub("", steps)
        return Example(id=rid, question=question, answer=final, response=templates.format_trace(steps, final))

    return Format("gsm8k", ("question", "answer"), to_example)


def _medqa_choices(options: Any) -> dict[str, str]:
    """`{A: text, ...}` (jind11/MedQA, GBaker) or `[{key: A, value: text}, ...]` (bigbio/med_qa source schema)."""
    if isinstance(options, Mapping):
        pairs = list(options.items())
    elif isinstance(options, list) and all(isinstance(o, Mapping) and {"key", "value"} <= set(o) for o in options):
        pairs = [(o["key"], o["value"]) for o in options]
    else:
        raise BadRow("wrong_type", "'options' should map letters to texts (or be a list of {key, value})")
    choices = {str(k).strip(): v for k, v in pairs if v is not None}
    if not choices or not all(isinstance(v, str) and v.strip() for v in choices.values()):
        raise BadRow("wrong_type", f"'options' should hold non-empty option texts, got {options!r:.120}")
    return choices


def medqa_format() -> Format:
    """MedQA (USMLE) multiple choice, 4 or 5 options: `{question, options, answer_idx: letter, answer?: text,
    meta_info?}`. `options` is `{A: text, ...}` in jind11/MedQA (`data_clean/questions/US/*.jsonl`, 5 options)
    and GBaker/MedQA-USMLE-4-options, or `[{key, value}, ...]` in bigbio/med_qa's source schema (5 options).
    The answer is the option letter (the RL reward and evaluation also credit the option text); `answer`, when
    present, must be that option's text. Shared by RL (`data.source: medqa`) and evaluation (`medqa`,
    `medqa_4op`)."""

    def to_example(row: Mapping, rid: str) -> Example:
        question = _text(row, "question", "empty_question")
        choices = _medqa_choices(_field(row, "options", object))
        letter = _text(row, "answer_idx", "empty_answer").strip()
        if letter not in choices:
            raise BadRow("bad_answer", f"answer_idx {letter!r} is not one of the option letters {list(choices)}")
        text = row.get("answer")
        if text is not None and str(text).strip() != choices[letter].strip():
            raise BadRow("bad_answer", f"answer text {text!r} is not option {letter} ({choices[letter]!r})")
        meta = {"meta_info": row["meta_info"]} if row.get("meta_info") is not None else {}
        return Example(id=str(row.get("id", rid)), question=question, answer=letter, choices=choices, meta=meta)

    return Format("medqa", ("question", "options", "answer_idx"), to_example)


FORMATS: dict[str, Callable[..., Format]] = {
    "openthoughts": openthoughts_format,
    "orz_math": orz_math_format,
    "orz_eval": orz_eval_format,
    "gsm8k": gsm8k_format,
    "medqa": medqa_format,
}


# -- a source ------------------------------------------------------------------------------------------------


class Source:
    """A random-access sequence of rows plus the format that turns row i into an `Example`.

    `source[i]` returns the `Example` or raises `BadRow`; `len(source)` counts rows (good and bad).
    """

    def __init__(self, name: str, rows: Any, fmt: Format, has_images: bool = False):
        self.name = name
        self.rows = rows
        self.format = fmt
        self.has_images = has_images

    def __len__(self) -> int:
        return len(self.rows)

    def row_id(self, index: int) -> str:
        return f"{self.name}:{index}"

    def __getitem__(self, index: int) -> Example:
        return self.format.to_example(self.rows[index], self.row_id(index))

    def check_schema(self) -> None:
        """Fail now, naming expected and found fields, when no sampled row has the format's fields."""
        column_sets = [self.format.required, *self.format.alternatives]
        columns = self.rows.columns
        if columns is not None:
            found = set(columns)
            if not any(set(cols) <= found for cols in column_sets):
                raise SchemaError(
                    f"source {self.name!r} does not look like {self.format.name}: expected fields "
                    f"{list(self.format.required)}, found columns {sorted(found)}"
                )
            return
        found_keys: set[str] = set()
        n = min(len(self), SCHEMA_SAMPLE_ROWS)
        for i in range(n):
            try:
                row = self.rows[i]
            except BadRow:
                continue
            if isinstance(row, list):  # the ORZ pair form maps onto the "0"/"1" columns
                row = {str(k): v for k, v in enumerate(row)}
            if isinstance(row, Mapping):
                if any(set(cols) <= set(row) for cols in column_sets):
                    return
                found_keys.update(map(str, row))
        raise SchemaError(
            f"source {self.name!r} does not look like {self.format.name}: expected fields "
            f"{list(self.format.required)} in the first {n} rows, found {sorted(found_keys) or 'no JSON objects'}"
        )


def load_source(
    path_or_id: str, format: str, *, name: Optional[str] = None, split: str = "train",
    cache_dir: Optional[str] = None, **format_options,
) -> Source:
    """Open a dataset file/directory/hub id in one of `FORMATS`; checks the schema before returning."""
    if format not in FORMATS:
        raise ValueError(f"unknown source format {format!r}; known: {sorted(FORMATS)}")
    if format == "orz_eval":
        format_options.setdefault("file_name", os.path.splitext(os.path.basename(path_or_id.rstrip("/")))[0])
    fmt = FORMATS[format](**format_options)
    if name is None:
        name = os.path.splitext(os.path.basename(path_or_id.rstrip("/")))[0] if os.path.exists(path_or_id) else path_or_id
    source = Source(name, read_rows(path_or_id, split, cache_dir=cache_dir), fmt)
    source.check_schema()
    return source
