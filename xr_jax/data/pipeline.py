"""Grain pipelines: SFT (template, tokenize, truncate, pack), RL prompt batches, evaluation batches.

Every pipeline is a sequence of epochs (`EpochIterator`), each one pass `MapDataset.range(rows) -> this host's
shard -> the epoch's seeded shuffle -> map (read + encode; a bad row becomes a `Skipped` marker) -> IterDataset
-> skip-and-count -> pack/chunk/pad -> batch`; a batch never straddles two epochs, and an epoch can be cut at a
counted number of batches (`sft_epoch_batches` / `rl_epoch_batches` count them exactly from a `RowTable`, one
encoded pass, so that every host ends an epoch at the same step).
SFT and eval shard by host first (every `process_count`-th row; SFT then shuffles per host): a packed SFT batch
is a sum over rows. RL shuffles globally and gives each host its contiguous slice of every global batch, so
the prompts and their order do not depend on the host count. All randomness is a function of `seed`.
The iterator's `get_state()` is a JSON-serialisable dict (the epoch, the batches taken in it, and the pass's
grain state with the skip and truncation counters) and `set_state()` restores it, so a resumed run sees
exactly the batches it would have seen (checkpoint it with the model).

SFT batch (`sft_pipeline`), numpy, B = per-host batch (global batch / process_count), L = max_len:
  input_ids   int32 [B, L]  tokens; padding = `<|endoftext|>` (pad id)
  targets     int32 [B, L]  the next token of the same example (targets[i] = token i+1); pad id on padding
  loss_mask   float32 [B, L] 1.0 where targets[i] is an assistant token (response and its `<|im_end|>`)
  segment_ids int32 [B, L]  0 = padding, 1..k = the k packed examples of the row
  positions   int32 [B, L]  position within the example, restarting at 0 for each segment (0 on padding)
An example longer than max_len + 1 tokens is truncated to them (`overflow="truncate"`, counted, with whether it
lost its `</think>` / `</answer>`), skipped (`"drop"`), or continued in the next row (`"chunk"`: the examples are
concatenated and cut into full rows, each piece its own segment).
Attention must stay inside a segment (causal, same segment, not padding: the model masks by segment_ids).
Packing (first-fit, never splitting an example) is for text; rows with images use
`pack=False` (one example per row, right-padded) and the batch also carries `pixel_values` float32
[sum of patches, 1176] and `image_grid_thw` int32 [n_images, 3], concatenated in row order (the order the
model scatters image features into `<|image_pad|>` tokens; text rows of a source that mixes text and images add
none); `positions` are then the 1-D text positions and the model derives M-RoPE positions from input_ids and
image_grid_thw.

RL batch (`rl_pipeline`): `prompt_ids` int32 [B, P] LEFT-padded to P = max_prompt_len with the pad id,
`prompt_mask` bool [B, P], `prompt_lengths` int32 [B], lists `ids`, `answers`, `questions`, `choices`, and
`pixel_values` / `image_grid_thw` when the source has images. A prompt longer than P is dropped and counted
(`prompt_too_long`), never truncated (truncation could cut an image's pad run).
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from typing import Any, Callable, Literal, Optional, Sequence

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
    lost_think: int = 0
    lost_answer: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    first_ids: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    quiet: bool = False  # counting passes (`count_epoch_batches`) do not log the skips again

    def record_skip(self, item: Skipped, pipeline: str) -> None:
        self.skipped[item.reason] = self.skipped.get(item.reason, 0) + 1
        ids = self.first_ids.setdefault(item.reason, [])
        if len(ids) < MAX_LOGGED_IDS:
            ids.append(item.id)
            if not self.quiet:
                log.warning("%s: skipped row %s (%s: %s)", pipeline, item.id, item.reason, item.detail)

    def record_example(self, item: dict) -> None:
        """Count a used example and its truncation flags (removed from the item)."""
        self.examples += 1
        for flag in TRUNCATION_FLAGS:
            setattr(self, flag, getattr(self, flag) + int(item.pop(flag, False)))

    def state(self) -> dict:
        return {"examples": self.examples, **{f: getattr(self, f) for f in TRUNCATION_FLAGS},
                "skipped": dict(self.skipped), "first_ids": {k: list(v) for k, v in self.first_ids.items()}}

    def load(self, state: dict) -> None:
        self.examples = int(state["examples"])
        for flag in TRUNCATION_FLAGS:  # .get: data states saved before these counters existed
            setattr(self, flag, int(state.get(flag, 0)))
        self.skipped = dict(state["skipped"])
        self.first_ids = {k: list(v) for k, v in state["first_ids"].items()}

    def summary(self) -> str:
        skipped = ", ".join(f"{k}={v} (first: {', '.join(self.first_ids.get(k, []))})" for k, v in sorted(self.skipped.items()))
        return (f"{self.examples} examples used, {self.truncated} truncated ({self.lost_think} lost their </think>), "
                f"skipped: {skipped or 'none'}")


TRUNCATION_FLAGS = ("truncated", "lost_think", "lost_answer")


class UnusableData(UserError, ValueError):
    """A whole pass over the data gave no batch: repeating the data would loop forever."""


class _SkipIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, stats: RowStats, pipeline: str):
        super().__init__(parent)
        self.stats = stats
        self._pipeline = pipeline

    def __next__(self):
        while True:
            item = next(self._parent)
            if isinstance(item, Skipped):
                self.stats.record_skip(item, self._pipeline)
                continue
            self.stats.record_example(item)
            return item

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "stats": self.stats.state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.stats.load(state["stats"])


class _SkipBadRows(grain.IterDataset):
    """Drops `Skipped` markers, counting them (and the used examples) in `stats`, which outlives one pass."""

    def __init__(self, parent: grain.IterDataset, pipeline: str, stats: RowStats):
        super().__init__(parent)
        self._pipeline = pipeline
        self.stats = stats

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipIterator(self._parent.__iter__(), self.stats, self._pipeline)


class EpochIterator:
    """Batches of epoch 0, then epoch 1, ...: every epoch is its own pass over the rows (its own shuffle, packing
    that never straddles two epochs), cut after `epoch_batches[e]` batches when given (every host then ends
    each epoch at the same step), `num_epochs` None = forever. `epoch` / `batches` say where it stands; the
    state is both plus the inner pass's grain state (which carries the row counters)."""

    def __init__(self, make_epoch: Callable[[int, RowStats], grain.IterDataset], num_epochs: Optional[int],
                 epoch_batches: Optional[Sequence[int]], stats: RowStats, name: str):
        self._make, self._num_epochs, self._limits, self.stats, self._name = make_epoch, num_epochs, epoch_batches, stats, name
        self.epoch, self.batches = 0, 0
        self._it = iter(make_epoch(0, stats))

    def __iter__(self):
        return self

    def __next__(self):
        while self._num_epochs is None or self.epoch < self._num_epochs:
            limit = self._limits[self.epoch] if self._limits is not None else None
            if limit is None or self.batches < limit:
                try:
                    batch = next(self._it)
                    self.batches += 1
                    return batch
                except StopIteration:
                    if self.batches == 0 and self._num_epochs is None:
                        raise UnusableData(
                            f"{self._name}: a whole pass over the data gave no batch ({self.stats.summary()}); fix "
                            "the data or the settings (e.g. a prompt budget too small for the template)") from None
            self.epoch, self.batches = self.epoch + 1, 0
            if self._num_epochs is None or self.epoch < self._num_epochs:
                self._it = iter(self._make(self.epoch, self.stats))
        raise StopIteration

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "pass": self._it.get_state()}

    def set_state(self, state: dict) -> None:
        if "epoch" not in state:
            raise ValueError("this data position was saved by an older xr_jax (data repeated without epochs) and cannot "
                             "be restored exactly; restart the run or resume it with the xr_jax that wrote it")
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self._it = iter(self._make(self.epoch, self.stats))
        self._it.set_state(state["pass"])


@dataclasses.dataclass
class Pipeline:
    """Batches, epoch after epoch (`EpochIterator`), and the row counters of the latest iterator."""

    make_epoch: Callable[[int, RowStats], grain.IterDataset]
    num_epochs: Optional[int]
    epoch_batches: Optional[Sequence[int]] = None
    name: str = "data"
    stats: RowStats = dataclasses.field(default_factory=RowStats)

    def __iter__(self) -> EpochIterator:
        self.stats = RowStats()
        return EpochIterator(self.make_epoch, self.num_epochs, self.epoch_batches, self.stats, self.name)


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


def _indices(n_rows: int, process_index: int, process_count: int) -> grain.MapDataset:
    """This host's rows: every `process_count`-th, without the last n_rows % process_count rows, so every
    host has the same number of rows per epoch."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, {process_count})")
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


Overflow = Literal["truncate", "drop", "chunk"]
OVERFLOW_MODES: tuple[str, ...] = typing.get_args(Overflow)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """max_len: tokens per row (paper: 4096). batch_size: GLOBAL rows per step. pack: first-fit packing
    (text only); False pads one example per row. overflow: an example longer than a row (max_len + 1 tokens)
    is cut to it ("truncate", the paper's "truncated to 4096 tokens"), skipped and counted as `too_long`
    ("drop"), or kept whole by concatenating the examples and cutting the stream into full rows ("chunk",
    llama-recipes' ConcatDataset; text only; attention stays within each piece of an example). num_epochs:
    passes over the data, each with its own shuffle (None: forever). epoch_batches: batches to take from each
    epoch (`epoch_batches()` counts them so that every host ends an epoch at the same step); None takes
    every batch of the pass. num_threads: grain reader threads (1 was fastest on 2 shared cores, see
    docs/benchmarks.md; raise it on big hosts)."""

    max_len: int = 4096
    batch_size: int = 128
    pack: bool = True
    overflow: Overflow = "truncate"
    seed: int = 0
    shuffle: bool = True
    num_epochs: Optional[int] = 1
    epoch_batches: Optional[tuple[int, ...]] = None
    drop_remainder: bool = True
    prompt: PromptConfig = PromptConfig()
    image: images_lib.ImageConfig = images_lib.ImageConfig()
    num_threads: int = 1


def fit_length(n_tokens: int, prompt_tokens: int, config: SFTConfig) -> int:
    """How many of an example's `n_tokens` tokens its row(s) keep under `config.overflow`, or `BadRow`."""
    if prompt_tokens >= config.max_len:
        raise BadRow("prompt_too_long", f"prompt has {prompt_tokens} tokens, max_len is {config.max_len}")
    if n_tokens <= config.max_len + 1 or config.overflow == "chunk":
        return n_tokens
    if config.overflow == "drop":
        raise BadRow("too_long", f"{n_tokens} tokens; a row holds {config.max_len + 1} (overflow=drop)")
    return config.max_len + 1


END_MARKERS = {"lost_think": "</think>", "lost_answer": "</answer>"}


def encode_sft(example: Example, tokenizer, config: SFTConfig) -> dict:
    """One example -> {input_ids, targets, loss_mask} (length <= max_len unless overflow="chunk"), its images,
    and the flags `truncated`, `lost_think` / `lost_answer` (its response's `</think>` / `</answer>` was cut).

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
    keep = fit_length(len(tokens), prompt_tokens, config)
    out = {"input_ids": tokens[:keep - 1], "targets": tokens[1:keep], "loss_mask": is_target[1:keep].astype(np.float32),
           "truncated": keep < len(tokens)}
    # A cut example may lose the end of its thinking and its answer (the model then never sees them closed).
    kept = tokenizer.decode(tokens[prompt_tokens:keep]) if out["truncated"] else None
    for flag, marker in END_MARKERS.items():
        out[flag] = kept is not None and marker in example.response and marker not in kept
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


def _pad_empty(pad_id: int) -> Callable[[dict], dict]:
    """The pad id (not grain's 0) on the padding of a chunked row (the last row of a pass)."""

    def fix(row: dict) -> dict:
        empty = row["segment_ids"] == 0
        row["input_ids"][empty] = pad_id
        row["targets"][empty] = pad_id
        return row

    return fix


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


def _epoch_order(rows: grain.MapDataset, shuffle: bool, seed: int, epoch: int) -> grain.MapDataset:
    """The rows of pass `epoch`: grain reshuffles every repetition of a shuffled dataset, so epoch e is the e-th
    repetition (epoch 0 is the plain seeded shuffle)."""
    if not shuffle:
        return rows
    return rows.shuffle(seed=seed).repeat(epoch + 1)[epoch * len(rows):]


def _text_rows(items: grain.IterDataset, config: SFTConfig, local_batch: int, pad_id: int) -> grain.IterDataset:
    """Examples -> rows of max_len: packed first-fit, concatenated and cut ("chunk"), or one padded per row."""
    features = ("input_ids", "targets", "loss_mask")
    if config.overflow == "chunk":
        rows = grain.experimental.ConcatThenSplitIterDataset(items, length_struct={k: config.max_len for k in features})
        return rows.map(_packed_to_batch_row).map(_pad_empty(pad_id))
    if config.pack:
        return grain.experimental.FirstFitPackIterDataset(
            items, length_struct={k: config.max_len for k in features}, num_packing_bins=local_batch,
            shuffle_bins=False, padding_struct={"input_ids": pad_id, "targets": pad_id, "loss_mask": 0.0},
        ).map(_packed_to_batch_row)
    return items.map(_pad_row(config.max_len, pad_id))


def _sft_epochs(n_rows: int, read: Callable[[int], Any], config: SFTConfig, pad_id: int, process_index: int,
                process_count: int, batch_fn: Callable = _stack_rows) -> Callable[[int, RowStats], grain.IterDataset]:
    """`make(epoch, stats)`: the batches of one SFT pass of this host (`read`: row index -> encoded example)."""
    local_batch = _local_batch_size(config.batch_size, process_count)
    rows = _indices(n_rows, process_index, process_count)

    def make(epoch: int, stats: RowStats) -> grain.IterDataset:
        ds = _epoch_order(rows, config.shuffle, config.seed, epoch).map(read)
        skip = _SkipBadRows(ds.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads)), "sft", stats)
        return _text_rows(skip, config, local_batch, pad_id).batch(
            local_batch, drop_remainder=config.drop_remainder, batch_fn=batch_fn)

    return make


def sft_pipeline(
    source: Source, tokenizer, config: SFTConfig = SFTConfig(), *,
    process_index: Optional[int] = None, process_count: Optional[int] = None,
) -> Pipeline:
    """Batches for SFT (format described in the module docstring), this host's share of the global batch."""
    process_index, process_count = _process(process_index, process_count)
    if (config.pack or config.overflow == "chunk") and source.has_images:
        raise ValueError(f"source {source.name!r} has images: packing is text-only (so is overflow=chunk), use pack=False")
    make = _sft_epochs(len(source), _reader(source, lambda ex: encode_sft(ex, tokenizer, config)), config,
                       tokenizer.special.pad, process_index, process_count)
    return Pipeline(make, config.num_epochs, config.epoch_batches, "sft")


# -- RL and evaluation prompts -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptBatchConfig:
    """RL prompts: shuffled (or in order), `num_epochs` passes or forever, remainder dropped per epoch. max_prompt_len: prompts are left-padded to it; longer prompts are dropped and
    counted. epoch_batches: as `SFTConfig.epoch_batches` (`rl_epoch_batches()` counts them)."""

    batch_size: int = 128
    max_prompt_len: int = 1024
    seed: int = 0
    shuffle: bool = True
    num_epochs: Optional[int] = None
    epoch_batches: Optional[tuple[int, ...]] = None
    prompt: PromptConfig = PromptConfig()
    image: images_lib.ImageConfig = images_lib.ImageConfig()
    num_threads: int = 1


def encode_prompt(example: Example, tokenizer, config: PromptBatchConfig) -> dict:
    """One example -> its prompt ids (chat template + generation prompt, image pads expanded) and ground truth."""
    if not (example.answer or "").strip():
        raise BadRow("empty_answer", "no ground-truth answer")
    pixel_values, grid, pads = _images(example, config.image)
    text = tokenizer.apply_chat_template(_messages(example, config.prompt), add_generation_prompt=True)
    ids = tokenizer.encode(templates.expand_image_pads(text, pads))
    if len(ids) > config.max_prompt_len:
        raise BadRow("prompt_too_long", f"prompt has {len(ids)} tokens, the budget is {config.max_prompt_len}")
    out = {"prompt_ids": np.asarray(ids, np.int32), "id": example.id, "answer": example.answer,
           "question": example.question, "choices": example.choices}
    if pixel_values is not None:
        out["pixel_values"], out["image_grid_thw"] = pixel_values, grid
    return out


def _prompt_batch_fn(max_prompt_len: int, pad_id: int) -> Callable:
    """Left-pad prompts into [rows, max_prompt_len], with their ground truth alongside."""

    def batch(rows: Sequence[dict]) -> dict:
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
        _concat_images(rows, out)
        return out

    return batch


def _rl_epochs(n_rows: int, read: Callable[[int], Any], config: PromptBatchConfig, batch_fn: Callable,
               process_index: int, process_count: int) -> Callable[[int, RowStats], grain.IterDataset]:
    """`make(epoch, stats)`: one RL pass of this host: its slice of every global batch of the epoch's order."""
    local_batch = _local_batch_size(config.batch_size, process_count)
    rows = grain.MapDataset.range(n_rows)

    def make(epoch: int, stats: RowStats) -> grain.IterDataset:
        ds = _batch_slice(_epoch_order(rows, config.shuffle, config.seed, epoch), config.batch_size, process_index,
                          process_count).map(read)
        skip = _SkipBadRows(ds.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads)), "rl", stats)
        return skip.batch(local_batch, drop_remainder=True, batch_fn=batch_fn)

    return make


def rl_pipeline(
    source: Source, tokenizer, config: PromptBatchConfig = PromptBatchConfig(), *,
    process_index: Optional[int] = None, process_count: Optional[int] = None,
) -> Pipeline:
    """GRPO prompt batches carrying the ground truth (this host's share of `config.batch_size`)."""
    process_index, process_count = _process(process_index, process_count)
    make = _rl_epochs(len(source), _reader(source, lambda ex: encode_prompt(ex, tokenizer, config)), config,
                      _prompt_batch_fn(config.max_prompt_len, tokenizer.special.pad), process_index, process_count)
    return Pipeline(make, config.num_epochs, config.epoch_batches, "rl")


# -- exact epochs: one counted pass ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowTable:
    """What the encoder makes of every row of a source, from one pass: its length (tokens of `length_key`,
    0 for a skipped row), the skip reason ("" for a used row) and the truncation flags. Epoch lengths and the
    data summary derive from it without encoding again; `save`/`load` cache it (`.npz`)."""

    lengths: np.ndarray  # int64 [rows]
    reasons: np.ndarray  # str [rows]
    flags: dict[str, np.ndarray]  # TRUNCATION_FLAGS -> bool [rows]

    def __len__(self) -> int:
        return len(self.lengths)

    def save(self, path: str) -> None:
        """Atomically (hosts sharing a cache directory write the same bytes)."""
        import os

        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, lengths=self.lengths, reasons=self.reasons, **self.flags)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "RowTable":
        with np.load(path) as z:
            return cls(z["lengths"], z["reasons"], {f: z[f] for f in TRUNCATION_FLAGS})

    def summary(self) -> dict:
        """Counts and fractions over the used rows (a truncated example keeps the start of its response)."""
        used = int((self.reasons == "").sum())
        reasons, counts = np.unique(self.reasons[self.reasons != ""], return_counts=True)
        out = {"rows": len(self), "used": used, "skipped": {str(r): int(c) for r, c in zip(reasons, counts)}}
        for flag in TRUNCATION_FLAGS:
            n = int(self.flags[flag].sum())
            out[flag] = n
            out[f"{flag}_frac"] = n / used if used else 0.0
        return out


def measure_rows(source: Source, encode: Callable[[Example], dict], length_key: str) -> RowTable:
    """Encode every row once (the counted first pass): the `RowTable` of `source` under `encode`."""
    read = _reader(source, encode)
    n = len(source)
    lengths, reasons = np.zeros(n, np.int64), np.full(n, "", dtype=object)
    flags = {f: np.zeros(n, bool) for f in TRUNCATION_FLAGS}
    for i in range(n):
        if i and i % 10000 == 0:
            log.info("%s: measured %d of %d rows", source.name, i, n)
        item = read(i)
        if isinstance(item, Skipped):
            reasons[i] = item.reason
            continue
        lengths[i] = len(item[length_key])
        for f in TRUNCATION_FLAGS:
            flags[f][i] = bool(item.get(f, False))
    return RowTable(lengths, reasons.astype(str), flags)


def _table_reader(table: RowTable, keys: dict[str, Any]) -> Callable[[int], Any]:
    """Row index -> zeros of the row's length under each key of `keys` (-> dtype), or its `Skipped` marker."""

    def read(index: int):
        index = int(index)
        if table.reasons[index]:
            return Skipped(str(index), str(table.reasons[index]), "")
        return {k: np.zeros(table.lengths[index], dtype) for k, dtype in keys.items()}

    return read


def _count_epochs(makers: Sequence[Callable[[int, RowStats], grain.IterDataset]], num_epochs: int) -> tuple[int, ...]:
    """Batches per epoch that every host can give (the fewest over hosts), by running each host's pass."""
    return tuple(min(sum(1 for _ in make(e, RowStats(quiet=True))) for make in makers) for e in range(num_epochs))


def sft_epoch_batches(table: RowTable, config: SFTConfig, num_epochs: int, process_count: int = 1) -> tuple[int, ...]:
    """Exact SFT batches per epoch: each host's pass is run as training runs it (shuffle, packing or chunking,
    dropped remainder) on rows of the measured lengths, without encoding anything again."""
    read = _table_reader(table, {"input_ids": np.int32, "targets": np.int32, "loss_mask": np.float32})
    return _count_epochs([_sft_epochs(len(table), read, config, 0, i, process_count, batch_fn=len)
                          for i in range(process_count)], num_epochs)


def rl_epoch_batches(table: RowTable, config: PromptBatchConfig, num_epochs: int, process_count: int = 1) -> tuple[int, ...]:
    """Exact GRPO prompt batches per epoch (usable prompts of each host's slice of every global batch)."""
    read = _table_reader(table, {"prompt_ids": np.int32})
    return _count_epochs([_rl_epochs(len(table), read, config, len, i, process_count) for i in range(process_count)],
                         num_epochs)
