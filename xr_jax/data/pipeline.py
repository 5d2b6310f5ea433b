"""Grain pipelines: SFT (template, tokenize, truncate, pack), RL prompt batches, evaluation batches.

Every pipeline is `MapDataset.range(rows) -> this host's shard -> seeded shuffle -> repeat(epochs) -> map
(read + encode; a bad row becomes a `Skipped` marker) -> IterDataset -> skip-and-count -> pack/pad -> batch`.
SFT and eval shard by host first (every `process_count`-th row; SFT then shuffles per host): a packed SFT batch
is a sum over rows. RL shuffles globally and gives each host its contiguous slice of every global batch, so
the prompts and their order do not depend on the host count. All randomness is a function of `seed`.
The iterator's `get_state()` is a JSON-serialisable dict (it includes the skip counters) and `set_state()`
restores it, so a resumed run sees exactly the batches it would have seen (checkpoint it with the model).

SFT batch (`sft_pipeline`), numpy, B = per-host batch (global batch / process_count), L = max_len:
  input_ids   int32 [B, L]  tokens; padding = `<|endoftext|>` (pad id)
  targets     int32 [B, L]  the next token of the same example (targets[i] = token i+1); pad id on padding
  loss_mask   float32 [B, L] 1.0 where targets[i] is an assistant token (response and its `<|im_end|>`)
  segment_ids int32 [B, L]  0 = padding, 1..k = the k packed examples of the row
  positions   int32 [B, L]  position within the example, restarting at 0 for each segment (0 on padding)
An example is truncated to max_len + 1 tokens, so input_ids/targets hold at most max_len of them.
Attention must stay inside a segment: `attention_mask(segment_ids)` is the reference mask (causal,
same segment, not padding). Packing (first-fit, never splitting an example) is for text; rows with images use
`pack=False` (one example per row, right-padded) and the batch also carries `pixel_values` float32
[sum of patches, 1176] and `image_grid_thw` int32 [n_images, 3], concatenated in row order (the order the
model scatters image features into `<|image_pad|>` tokens; text rows of a source that mixes text and images add
none); `positions` are then the 1-D text positions and the model derives M-RoPE positions from input_ids and
image_grid_thw.

RL batch (`rl_pipeline`): `prompt_ids` int32 [B, P] LEFT-padded to P = max_prompt_len with the pad id,
`prompt_mask` bool [B, P], `prompt_lengths` int32 [B], lists `ids`, `answers`, `questions`, `choices`, and
`pixel_values` / `image_grid_thw` when the source has images. A prompt longer than P is dropped and counted
(`prompt_too_long`), never truncated (truncation could cut an image's pad run).

Eval batch (`eval_pipeline`): as RL plus `valid` bool [B] and `meta` (list of dicts); one pass, in order;
the last batch is filled with copies of its last row marked `valid=False` (static shapes).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional, Sequence

import grain
import numpy as np

from xr_jax.data import images as images_lib
from xr_jax.data import templates
from xr_jax.data.sources import BadRow, Example, Source
from xr_jax.errors import UserError

log = logging.getLogger("xr_jax.data")
MAX_LOGGED_IDS = 5


# -- skipping and counting bad rows ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Stands in for a row that could not be used; the skip stage counts it by `reason`."""

    id: str
    reason: str
    detail: str


@dataclasses.dataclass
class RowStats:
    """Rows used, rows skipped by reason (with the first few ids), examples truncated. Part of the iterator
    state, so the counts of a resumed run equal those of an uninterrupted one."""

    examples: int = 0
    truncated: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    first_ids: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def record_skip(self, item: Skipped, pipeline: str) -> None:
        self.skipped[item.reason] = self.skipped.get(item.reason, 0) + 1
        ids = self.first_ids.setdefault(item.reason, [])
        if len(ids) < MAX_LOGGED_IDS:
            ids.append(item.id)
            log.warning("%s: skipped row %s (%s: %s)", pipeline, item.id, item.reason, item.detail)

    def state(self) -> dict:
        return {"examples": self.examples, "truncated": self.truncated, "skipped": dict(self.skipped),
                "first_ids": {k: list(v) for k, v in self.first_ids.items()}}

    def load(self, state: dict) -> None:
        self.examples, self.truncated = int(state["examples"]), int(state["truncated"])
        self.skipped = dict(state["skipped"])
        self.first_ids = {k: list(v) for k, v in state["first_ids"].items()}

    def summary(self) -> str:
        skipped = ", ".join(f"{k}={v} (first: {', '.join(self.first_ids.get(k, []))})" for k, v in sorted(self.skipped.items()))
        return f"{self.examples} examples used, {self.truncated} truncated, skipped: {skipped or 'none'}"


class UnusableData(UserError, ValueError):
    """Every row of a whole pass was skipped: repeating the data would loop forever."""


class _SkipIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, stats: RowStats, pipeline: str, pass_rows: Optional[int]):
        super().__init__(parent)
        self.stats = stats
        self._pipeline = pipeline
        self._pass_rows = pass_rows

    def __next__(self):
        streak = 0
        while True:
            item = next(self._parent)
            if isinstance(item, Skipped):
                self.stats.record_skip(item, self._pipeline)
                streak += 1
                if self._pass_rows and streak >= self._pass_rows:
                    raise UnusableData(
                        f"{self._pipeline}: all {streak} rows of a whole pass were skipped ({self.stats.summary()}); "
                        "fix the data or the settings (e.g. a prompt budget too small for the template)")
                continue
            self.stats.examples += 1
            self.stats.truncated += int(item.pop("truncated", False))
            return item

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "stats": self.stats.state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.stats.load(state["stats"])


class _SkipBadRows(grain.IterDataset):
    """Drops `Skipped` markers, counting them; the `RowStats` of the latest iterator is `self.stats`.

    With `pass_rows` (data repeated forever), a whole pass of skipped rows raises `UnusableData` instead of
    looping forever."""

    def __init__(self, parent: grain.IterDataset, pipeline: str, pass_rows: Optional[int]):
        super().__init__(parent)
        self._pipeline = pipeline
        self._pass_rows = pass_rows
        self.stats = RowStats()

    def __iter__(self) -> grain.DatasetIterator:
        self.stats = RowStats()
        return _SkipIterator(self._parent.__iter__(), self.stats, self._pipeline, self._pass_rows)


@dataclasses.dataclass
class Pipeline:
    """A grain IterDataset of batches and the counters of its (latest) iterator."""

    dataset: grain.IterDataset
    _skip: _SkipBadRows

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)

    @property
    def stats(self) -> RowStats:
        return self._skip.stats


# -- shared encoding ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How an example becomes a user turn: a named prompt template (templates.PROMPT_TEMPLATES) and an optional
    system message (None: the chat template's default). `append_options` appends the example's choices unless
    its question already lists them (ORZ GPQA)."""

    template: str = "x_reasoner_train"
    system: Optional[str] = None
    append_options: bool = True


def _messages(example: Example, prompt: PromptConfig, response: Optional[str] = None) -> list[dict]:
    choices = example.choices if prompt.append_options and not example.meta.get("options_in_question") else None
    text = templates.get_prompt_template(prompt.template).format(example.question, choices)
    system = example.system if example.system is not None else prompt.system
    return templates.build_messages(text, len(example.images), system=system, response=response)


def _images(example: Example, image_config: images_lib.ImageConfig) -> tuple[Optional[np.ndarray], Optional[np.ndarray], list[int]]:
    if not example.images:
        return None, None, []
    try:
        pixel_values, grid = images_lib.preprocess_images(example.images, image_config, name=example.id)
    except images_lib.ImageError as e:
        raise BadRow("bad_image", str(e)) from e
    return pixel_values, grid, images_lib.image_pad_counts(grid, image_config.merge_size)


def _reader(source: Source, encode: Callable[[Example], dict]) -> Callable[[int], Any]:
    """Row index -> encoded dict, or `Skipped` for a malformed row (never an exception mid-run)."""

    def read(index: int):
        index = int(index)
        try:
            return encode(source[index])
        except BadRow as e:
            return Skipped(source.row_id(index), e.reason, e.detail)

    return read


def _indices(n_rows: int, process_index: int, process_count: int, trim: bool) -> grain.MapDataset:
    """This host's rows: every `process_count`-th. `trim` drops the last n_rows % process_count rows so every
    host has the same number of rows per epoch (training); evaluation keeps all."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, {process_count})")
    if trim:
        n_rows -= n_rows % process_count
    if n_rows < process_count:
        raise ValueError(f"{n_rows} rows cannot be sharded over {process_count} processes")
    return grain.MapDataset.range(n_rows)[process_index::process_count]


def _batch_slice(order: grain.MapDataset, batch_size: int, process_index: int, process_count: int) -> grain.MapDataset:
    """This host's contiguous share of every global batch of `order` (global batches of `batch_size` rows).

    The global batch is then the same rows in the same order for any number of hosts, so a GRPO run samples
    the same responses on 1 host or many (row keys follow the global row index) and may resume on another
    host count. With several hosts a trailing partial global batch is dropped (hosts must yield equally many
    batches); one host reads `order` as it is."""
    if process_count == 1:
        return order
    local = batch_size // process_count
    n_local = len(order) // batch_size * local
    return grain.MapDataset.range(n_local).map(
        lambda j: order[j // local * batch_size + process_index * local + j % local])


def _process(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        return jax.process_index(), jax.process_count()
    return process_index, process_count


def _local_batch_size(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise ValueError(f"global batch size {batch_size} is not divisible by {process_count} processes")
    return batch_size // process_count


# -- SFT ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """max_len: tokens per row (paper: 4096). batch_size: GLOBAL rows per step. pack: first-fit packing
    (text only); False pads one example per row. num_epochs None repeats forever. num_threads: grain reader
    threads (1 was fastest on 2 shared cores, see docs/benchmarks.md; raise it on big hosts)."""

    max_len: int = 4096
    batch_size: int = 128
    pack: bool = True
    seed: int = 0
    shuffle: bool = True
    num_epochs: Optional[int] = 1
    drop_remainder: bool = True
    prompt: PromptConfig = PromptConfig()
    image: images_lib.ImageConfig = images_lib.ImageConfig()
    num_threads: int = 1


def encode_sft(example: Example, tokenizer, config: SFTConfig) -> dict:
    """One example -> {input_ids, targets, loss_mask} (length <= max_len) and its images.

    The conversation is tokenised in three pieces cut at special tokens — up to the assistant's
    `<|im_start|>`, then `assistant\\n` + response, then `<|im_end|>\\n` — which gives exactly the ids of the
    whole string (added tokens always split the text) and tells which tokens are the assistant's.
    """
    if example.response is None:
        raise BadRow("missing_field", "no response to train on")
    pixel_values, grid, pads = _images(example, config.image)
    messages = _messages(example, config.prompt, example.response)
    full = templates.expand_image_pads(tokenizer.apply_chat_template(messages), pads)
    prefix = templates.expand_image_pads(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True), pads)
    if not full.startswith(prefix):
        raise ValueError("the chat template does not render the conversation as prompt + response")
    header_start = prefix.rindex("<|im_start|>") + len("<|im_start|>")
    response_end = len(prefix) + len(example.response)
    header = tokenizer.encode(full[:header_start])
    body = tokenizer.encode(full[header_start:response_end])
    tail = tokenizer.encode(full[response_end:])
    # Tokens of `body` that start after the role line (`assistant\n`) are the response; a token straddling
    # the boundary (a response starting with whitespace) counts as header.
    role_bytes = len(prefix[header_start:].encode("utf-8"))
    n_role, covered = 0, 0
    while n_role < len(body) and covered < role_bytes:
        covered += len(tokenizer.token_bytes(body[n_role]))
        n_role += 1
    is_target = np.zeros(len(header) + len(body) + len(tail), bool)
    is_target[len(header) + n_role: len(header) + len(body)] = True
    if tail and tail[0] == tokenizer.special.im_end:
        is_target[len(header) + len(body)] = True
    tokens = np.asarray(header + body + tail, np.int32)
    prompt_tokens = len(header) + n_role
    if prompt_tokens >= config.max_len:
        raise BadRow("prompt_too_long", f"prompt has {prompt_tokens} tokens, max_len is {config.max_len}")
    truncated = len(tokens) > config.max_len + 1
    tokens, is_target = tokens[: config.max_len + 1], is_target[: config.max_len + 1]
    out = {"input_ids": tokens[:-1], "targets": tokens[1:], "loss_mask": is_target[1:].astype(np.float32),
           "truncated": truncated}
    if pixel_values is not None:
        out["pixel_values"], out["image_grid_thw"] = pixel_values, grid
    return out


def _packed_to_batch_row(row: dict) -> dict:
    """grain's packed features (`x`, `x_segment_ids`, `x_positions` per feature) -> the SFT row format."""
    return {
        "input_ids": row["input_ids"].astype(np.int32),
        "targets": row["targets"].astype(np.int32),
        "loss_mask": row["loss_mask"].astype(np.float32),
        "segment_ids": row["input_ids_segment_ids"].astype(np.int32),
        "positions": row["input_ids_positions"].astype(np.int32),
    }


def _pad_row(max_len: int, pad_id: int) -> Callable[[dict], dict]:
    def pad(row: dict) -> dict:
        n = len(row["input_ids"])
        out = {
            "input_ids": np.full(max_len, pad_id, np.int32),
            "targets": np.full(max_len, pad_id, np.int32),
            "loss_mask": np.zeros(max_len, np.float32),
            "segment_ids": np.zeros(max_len, np.int32),
            "positions": np.zeros(max_len, np.int32),
        }
        out["input_ids"][:n], out["targets"][:n], out["loss_mask"][:n] = row["input_ids"], row["targets"], row["loss_mask"]
        out["segment_ids"][:n], out["positions"][:n] = 1, np.arange(n)
        if "pixel_values" in row:
            out["pixel_values"], out["image_grid_thw"] = row["pixel_values"], row["image_grid_thw"]
        return out

    return pad


IMAGE_FIELDS = ("pixel_values", "image_grid_thw")


def _concat_images(rows: Sequence[dict], batch: dict) -> None:
    """Concatenate the image arrays of the rows that have them, in row order (the order the model scatters
    image features into `<|image_pad|>` tokens); rows without images (text rows of a mixed source) add none."""
    for key in IMAGE_FIELDS:
        values = [r[key] for r in rows if key in r]
        if values:
            batch[key] = np.concatenate(values)


def _stack_rows(rows: Sequence[dict]) -> dict:
    """Stack per-row arrays to [B, ...]; concatenate image arrays across rows."""
    batch = {key: np.stack([r[key] for r in rows]) for key in rows[0] if key not in IMAGE_FIELDS}
    _concat_images(rows, batch)
    return batch


def sft_pipeline(
    source: Source, tokenizer, config: SFTConfig = SFTConfig(), *,
    process_index: Optional[int] = None, process_count: Optional[int] = None,
) -> Pipeline:
    """Batches for SFT (format described in the module docstring), this host's share of the global batch."""
    process_index, process_count = _process(process_index, process_count)
    local_batch = _local_batch_size(config.batch_size, process_count)
    if config.pack and source.has_images:
        raise ValueError(f"source {source.name!r} has images: packing is text-only, use pack=False")
    ds = _indices(len(source), process_index, process_count, trim=True)
    pass_rows = len(ds)
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(config.num_epochs).map(_reader(source, lambda ex: encode_sft(ex, tokenizer, config)))
    skip = _SkipBadRows(ds.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads)), "sft", pass_rows if config.num_epochs is None else None)
    pad_id = tokenizer.special.pad
    if config.pack:
        features = ("input_ids", "targets", "loss_mask")
        it = grain.experimental.FirstFitPackIterDataset(
            skip, length_struct={k: config.max_len for k in features}, num_packing_bins=local_batch,
            shuffle_bins=False, padding_struct={"input_ids": pad_id, "targets": pad_id, "loss_mask": 0.0},
        ).map(_packed_to_batch_row)
    else:
        it = skip.map(_pad_row(config.max_len, pad_id))
    return Pipeline(it.batch(local_batch, drop_remainder=config.drop_remainder, batch_fn=_stack_rows), skip)


def attention_mask(segment_ids: np.ndarray) -> np.ndarray:
    """Reference mask [B, L, L]: query i sees key j iff j <= i, same segment, and not padding."""
    seg = np.asarray(segment_ids)
    n = seg.shape[-1]
    causal = np.tril(np.ones((n, n), bool))
    same = seg[..., :, None] == seg[..., None, :]
    return causal & same & (seg[..., :, None] > 0)


# -- RL and evaluation prompts -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptBatchConfig:
    """RL (shuffled, repeated, dropped remainder) and eval (in order, one pass, padded last batch) prompts.
    max_prompt_len: prompts are left-padded to it; longer prompts are dropped and counted."""

    batch_size: int = 128
    max_prompt_len: int = 1024
    seed: int = 0
    shuffle: bool = True
    num_epochs: Optional[int] = None
    prompt: PromptConfig = PromptConfig()
    image: images_lib.ImageConfig = images_lib.ImageConfig()
    num_threads: int = 1


def encode_prompt(example: Example, tokenizer, config: PromptBatchConfig) -> dict:
    """One example -> its prompt ids (chat template + generation prompt, image pads expanded) and metadata."""
    if not (example.answer or "").strip():
        raise BadRow("empty_answer", "no ground-truth answer")
    pixel_values, grid, pads = _images(example, config.image)
    text = tokenizer.apply_chat_template(_messages(example, config.prompt), add_generation_prompt=True)
    ids = tokenizer.encode(templates.expand_image_pads(text, pads))
    if len(ids) > config.max_prompt_len:
        raise BadRow("prompt_too_long", f"prompt has {len(ids)} tokens, the budget is {config.max_prompt_len}")
    out = {"prompt_ids": np.asarray(ids, np.int32), "id": example.id, "answer": example.answer,
           "question": example.question, "choices": example.choices, "meta": example.meta}
    if pixel_values is not None:
        out["pixel_values"], out["image_grid_thw"] = pixel_values, grid
    return out


def _prompt_batch_fn(max_prompt_len: int, pad_id: int, batch_size: Optional[int] = None) -> Callable:
    """Left-pad prompts; with `batch_size` (eval) fill a short last batch with invalid copies of its last row."""

    def batch(rows: Sequence[dict]) -> dict:
        valid = [True] * len(rows)
        if batch_size is not None and len(rows) < batch_size:
            valid += [False] * (batch_size - len(rows))
            rows = list(rows) + [rows[-1]] * (batch_size - len(rows))
        n = len(rows)
        prompt_ids = np.full((n, max_prompt_len), pad_id, np.int32)
        lengths = np.asarray([len(r["prompt_ids"]) for r in rows], np.int32)
        for i, r in enumerate(rows):
            prompt_ids[i, max_prompt_len - lengths[i]:] = r["prompt_ids"]
        out = {
            "prompt_ids": prompt_ids,
            "prompt_mask": np.arange(max_prompt_len)[None, :] >= (max_prompt_len - lengths)[:, None],
            "prompt_lengths": lengths,
            "ids": [r["id"] for r in rows], "answers": [r["answer"] for r in rows],
            "questions": [r["question"] for r in rows], "choices": [r["choices"] for r in rows],
        }
        if batch_size is not None:
            out["valid"] = np.asarray(valid, bool)
            out["meta"] = [r["meta"] for r in rows]
        _concat_images(rows, out)
        return out

    return batch


def rl_pipeline(
    source: Source, tokenizer, config: PromptBatchConfig = PromptBatchConfig(), *,
    process_index: Optional[int] = None, process_count: Optional[int] = None,
) -> Pipeline:
    """GRPO prompt batches carrying the ground truth (this host's share of `config.batch_size`)."""
    process_index, process_count = _process(process_index, process_count)
    local_batch = _local_batch_size(config.batch_size, process_count)
    ds = grain.MapDataset.range(len(source))
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = _batch_slice(ds.repeat(config.num_epochs), config.batch_size, process_index, process_count)
    pass_rows = len(source) // process_count
    ds = ds.map(_reader(source, lambda ex: encode_prompt(ex, tokenizer, config)))
    skip = _SkipBadRows(ds.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads)), "rl", pass_rows if config.num_epochs is None else None)
    batch_fn = _prompt_batch_fn(config.max_prompt_len, tokenizer.special.pad)
    return Pipeline(skip.batch(local_batch, drop_remainder=True, batch_fn=batch_fn), skip)


def eval_pipeline(
    source: Source, tokenizer, config: PromptBatchConfig, *,
    process_index: Optional[int] = None, process_count: Optional[int] = None,
) -> Pipeline:
    """Every example once, in order, with metadata; this host's rows only (hosts may end one batch apart:
    the evaluation runner must tolerate that, e.g. by gathering `valid` rows only)."""
    process_index, process_count = _process(process_index, process_count)
    local_batch = _local_batch_size(config.batch_size, process_count)
    ds = _indices(len(source), process_index, process_count, trim=False)
    ds = ds.map(_reader(source, lambda ex: encode_prompt(ex, tokenizer, config)))
    skip = _SkipBadRows(ds.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads)), "eval", None)
    batch_fn = _prompt_batch_fn(config.max_prompt_len, tokenizer.special.pad, batch_size=local_batch)
    return Pipeline(skip.batch(local_batch, drop_remainder=False, batch_fn=batch_fn), skip)
