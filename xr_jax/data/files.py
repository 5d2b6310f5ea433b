"""The one reader of data files, shared by training sources (data/sources.py) and benchmarks (eval/benchmarks.py).

`read_rows` opens a local file, a directory of files (JSON, JSON lines, parquet, arrow, csv, tsv) or a hub id
and returns random-access `Rows`. JSON and JSON-lines rows stay raw bytes until accessed, so one bad line
(invalid JSON, non-UTF-8) fails that row alone with `BadRow`: training skips and counts it, evaluation refuses
it, naming the file and line (`Rows.where`). Other files go through `datasets` (memory-mapped Arrow).
`datasets` >= 4 never runs dataset scripts, so no remote code can run.
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import json
import os
import re
from collections.abc import Sequence
from typing import Any, Optional

from xr_jax.errors import UserError

DATA_EXTENSIONS = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".tsv")
_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv"}


class BadRow(ValueError):
    """A malformed row; `reason` is the counter key (e.g. 'missing_field', 'bad_json')."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class BadFile(UserError, ValueError):
    """A file that cannot be read at all (a .json that is neither a JSON array nor JSON lines)."""


@dataclasses.dataclass(frozen=True)
class _Part:
    label: str  # the file, or the hub id with config and split
    base_dir: Optional[str]  # the file's directory, for relative image paths (None for a hub dataset)
    rows: Any  # raw JSON bytes (json=True) or a datasets.Dataset
    json: bool = False
    wheres: Sequence[str] = ()  # for JSON rows: file:line or file, item i


class Rows:
    """Random-access rows of one or more files or hub splits, in order.

    `rows[i]` is the row (a JSON row is parsed here: `BadRow` when malformed); `where(i)` names its file and
    line or row (for messages); `base_dir(i)` the folder of its file; `columns` the column names shared by
    every part, or None when there are JSON rows (whose keys vary row to row).
    """

    def __init__(self, parts: Sequence[_Part]):
        self._parts = list(parts)
        self._starts, n = [], 0
        for p in self._parts:
            self._starts.append(n)
            n += len(p.rows)
        self._len = n

    def __len__(self) -> int:
        return self._len

    def _locate(self, index: int) -> tuple[_Part, int]:
        if not 0 <= index < self._len:
            raise IndexError(index)
        k = bisect.bisect_right(self._starts, index) - 1
        return self._parts[k], index - self._starts[k]

    def __getitem__(self, index: int) -> Any:
        part, j = self._locate(index)
        return parse_json_row(part.rows[j]) if part.json else part.rows[j]

    def where(self, index: int) -> str:
        part, j = self._locate(index)
        return part.wheres[j] if part.json else f"{part.label} row {j}"

    def base_dir(self, index: int) -> Optional[str]:
        return self._locate(index)[0].base_dir

    @property
    def columns(self) -> Optional[list[str]]:
        if not self._parts or any(p.json for p in self._parts):
            return None
        common = set.intersection(*(set(p.rows.column_names) for p in self._parts))
        return [c for c in self._parts[0].rows.column_names if c in common]


def parse_json_row(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRow("non_utf8", f"not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRow("bad_json", f"not valid JSON ({e.msg} at column {e.colno})") from None


def json_rows(file: str) -> tuple[list[bytes], list[str]]:
    """Each row's JSON bytes, undecoded, and where it is (file:line, or file, item i of a JSON array)."""
    with open(file, "rb") as f:
        data = f.read()
    if file.endswith(".jsonl") or not data.lstrip().startswith(b"["):
        lines = [(n, line) for n, line in enumerate(data.splitlines(), 1) if line.strip()]
        return [line for _, line in lines], [f"{file}:{n}" for n, _ in lines]
    try:  # one JSON array; surrogateescape keeps invalid bytes so that only their row fails
        items = json.loads(data.decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as e:
        raise BadFile(f"{file}:{e.lineno}: not valid JSON ({e.msg}); expected a JSON array or JSON lines") from None
    raw = [json.dumps(item, ensure_ascii=False).encode("utf-8", errors="surrogateescape") for item in items]
    return raw, [f"{file}, item {i}" for i in range(len(items))]


def _names_split(path: str, split: str) -> bool:
    return re.search(rf"(^|[-_./]){re.escape(split)}([-_.]|$)", os.path.basename(path)) is not None


def data_files(path: str, split: Optional[str] = None, configs: Sequence[str] = ()) -> list[str]:
    """The file itself, or a directory's data files: those under a `configs` sub-directory (a local snapshot of
    a hub repository), then those whose name carries `split` (e.g. MedQA's train/dev/test files), each narrowing
    only when some file matches. Mixed file types are refused."""
    if os.path.isfile(path):
        return [path]
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if f.endswith(DATA_EXTENSIONS) and os.path.isfile(f))
    if not files:
        raise FileNotFoundError(f"{path}: no {'/'.join(DATA_EXTENSIONS)} files in this directory")
    in_configs = [f for f in files if set(os.path.relpath(f, path).split(os.sep)[:-1]) & set(configs)]
    files = in_configs or files
    if split:
        files = [f for f in files if _names_split(f, split)] or files
    exts = {os.path.splitext(f)[1] for f in files}
    if len(exts) > 1:
        raise ValueError(f"{path}: mixed file types {sorted(exts)}; point at one file or one kind of file")
    return files


def read_rows(path_or_id: str, split: str = "train", configs: Sequence[str] = (),
              cache_dir: Optional[str] = None) -> Rows:
    """The rows of a local file or directory (see `data_files`), or of a hub id's `split` (one part per config;
    needs network)."""
    import datasets

    if os.path.exists(path_or_id):
        parts = []
        for file in data_files(path_or_id, split, configs):
            base = os.path.dirname(os.path.abspath(file))
            ext = os.path.splitext(file)[1]
            if ext in (".json", ".jsonl"):
                raw, wheres = json_rows(file)
                parts.append(_Part(file, base, raw, json=True, wheres=wheres))
                continue
            kwargs = {"sep": "\t"} if ext == ".tsv" else {}
            table = datasets.load_dataset(_BUILDERS[ext], data_files=file, split="train", cache_dir=cache_dir, **kwargs)
            parts.append(_Part(f"{file},", base, table))
        return Rows(parts)
    if path_or_id.count("/") != 1 or path_or_id.startswith((".", "/")):
        raise FileNotFoundError(f"{path_or_id}: no such file or directory (and not a hub id 'owner/name')")
    return Rows([_Part(f"{path_or_id}{f' ({config})' if config else ''} {split}", None,
                       datasets.load_dataset(path_or_id, config, split=split, cache_dir=cache_dir))
                 for config in configs or (None,)])
