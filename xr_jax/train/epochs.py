"""`train.epochs` as passes over the data: the counted first pass, the steps it gives, and the data summary.

A run with `train.epochs` (and no `train.steps_per_epoch`) encodes every row once (`pipeline.measure_rows`:
lengths, skip reasons, truncation flags), caches that table in `data.cache_dir` (default
`<logging.dir>/data_cache`) under a hash of the data, the tokenizer and the encoding settings, and then runs
each host's pass of every epoch on rows of those lengths (shuffle, packing, dropped remainder: the same code as
training, no encoding) to count its batches. The trainer takes its steps per epoch, LR decay points and warmup
from those counts, and the data iterator stops each epoch at the same count, so a resumed run (the iterator
state holds the epoch and the batches taken) derives the identical schedule. `train.steps_per_epoch` overrides
the count (the data then repeats without end, as fixed-step runs do); `train.steps` caps the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Callable, Optional, Sequence, Union

log = logging.getLogger("xr_jax.train")


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """total: steps the loop runs. schedule_steps: the length of the LR schedule (warmup ratio, cosine/linear
    end): every epoch's steps, also when `train.steps` stops the run earlier. epoch_steps: steps per epoch,
    one entry per epoch (counted) or one number for every epoch (`train.steps_per_epoch`); the step_decay
    schedule decays at their ends. epoch_batches / num_epochs: what the data iterator takes (None: every batch
    of a pass / forever)."""

    total: int
    schedule_steps: int
    epoch_steps: Union[Sequence[int], int, None]
    epoch_batches: Optional[tuple[int, ...]] = None
    num_epochs: Optional[int] = None

    def scaled(self, updates_per_step: int) -> "StepPlan":
        """The same plan in optimizer updates (GRPO makes `updates_per_step` updates per rollout step)."""
        if isinstance(self.epoch_steps, int):
            steps = self.epoch_steps * updates_per_step
        else:
            steps = None if self.epoch_steps is None else tuple(n * updates_per_step for n in self.epoch_steps)
        return dataclasses.replace(self, total=self.total * updates_per_step,
                                   schedule_steps=self.schedule_steps * updates_per_step, epoch_steps=steps)


def fixed_plan(config) -> StepPlan:
    """The plan of a run with fixed steps (`train.steps`, or `train.epochs` x `train.steps_per_epoch`)."""
    return StepPlan(config.total_steps, config.total_steps, config.train.steps_per_epoch)


def counts_epochs(config) -> bool:
    """True when the steps per epoch come from the data (`train.epochs` without `train.steps_per_epoch`)."""
    return config.train.epochs is not None and config.train.steps_per_epoch is None


def counted_plan(config, batches: Sequence[int]) -> StepPlan:
    """The plan of `train.epochs` epochs of `batches[e]` steps each (capped by `train.steps` when set)."""
    tr = config.train
    if not sum(batches):
        from xr_jax.data.pipeline import UnusableData

        raise UnusableData(f"the data gives no batch of {tr.batch_size} rows in an epoch (counted: {list(batches)})")
    batches = tuple(int(n) for n in batches)
    return StepPlan(tr.steps if tr.steps is not None else sum(batches), sum(batches), batches, batches, tr.epochs)


def plan_from_data(config, kind: str, make_source: Callable, tokenizer, settings: Any, encode: Callable,
                   length_key: str, count: Callable) -> StepPlan:
    """Fixed steps, or `train.epochs` counted: the cached `RowTable` of the data under `encode`, then
    `count(table, epochs)` -> batches per epoch; the summary is logged and written to the run directory."""
    if not counts_epochs(config):
        return fixed_plan(config)
    table = row_table(config, make_source(), tokenizer, kind, settings, encode, length_key)
    plan = counted_plan(config, count(table, config.train.epochs))
    report(config, kind, table, plan)
    return plan


# ----------------------------------------------------------------------------- the counted pass, cached


def _files_fingerprint(path: Optional[str]) -> list:
    """(name, size, mtime) of a local file or of every file under a directory; a hub id stands for itself."""
    if path is None or not os.path.exists(path):
        return [path]
    if os.path.isfile(path):
        st = os.stat(path)
        return [[os.path.abspath(path), st.st_size, st.st_mtime_ns]]
    out = []
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            out.append([os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns])
    return [os.path.abspath(path), out]


def _tokenizer_fingerprint(tokenizer) -> list:
    """Enough of a tokenizer to tell two apart: its class, size, one encoding and its chat template's rendering."""
    probe = "Probe 12345 </think> naïve\n"
    messages = [{"role": "user", "content": probe}, {"role": "assistant", "content": probe}]
    return [type(tokenizer).__name__, tokenizer.vocab_size, tokenizer.encode(probe),
            tokenizer.apply_chat_template(messages)]


def cache_key(config, source, tokenizer, kind: str, settings: Any) -> str:
    """Hash of the data (files, format, split, rows), the tokenizer and the encoding `settings`."""
    from xr_jax.config import to_dict

    d = config.data
    data = {"source": d.source, "split": d.split, "rows": len(source), "files": _files_fingerprint(d.path),
            "synthetic": to_dict(d.synthetic) if d.source == "synthetic" else None}
    blob = json.dumps([kind, data, _tokenizer_fingerprint(tokenizer), settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def row_table(config, source, tokenizer, kind: str, settings: Any, encode: Callable, length_key: str):
    """The `RowTable` of `source` under `encode`, from the cache when this data/tokenizer/settings was measured."""
    from xr_jax.data import pipeline

    directory = config.data.cache_dir or os.path.join(config.logging.dir, "data_cache")
    path = os.path.join(directory, f"{kind}-{cache_key(config, source, tokenizer, kind, settings)}.npz")
    if os.path.isfile(path):
        log.info("%s: row table from %s", kind, path)
        return pipeline.RowTable.load(path)
    log.info("%s: measuring %d rows once (cached in %s)", kind, len(source), path)
    table = pipeline.measure_rows(source, encode, length_key)
    os.makedirs(directory, exist_ok=True)
    table.save(path)
    return table


def report(config, kind: str, table, plan: StepPlan) -> dict:
    """Log the data summary (rows, skips, truncation, steps per epoch) and write it to `<logging.dir>/data_summary.json`."""
    import jax

    summary = {"stage": kind, **table.summary(), "epochs": plan.num_epochs, "steps_per_epoch": plan.epoch_batches,
               "total_steps": plan.total}
    log.warning(  # a warning: shown on stderr even where no logging is configured

        "%s data: %d of %d rows used (skipped: %s); truncated %d (%.1f%%), lost </think> %d (%.1f%%), lost </answer> "
        "%d (%.1f%%); %s epochs of %s steps = %d steps", kind, summary["used"], summary["rows"],
        summary["skipped"] or "none", summary["truncated"], 100 * summary["truncated_frac"], summary["lost_think"],
        100 * summary["lost_think_frac"], summary["lost_answer"], 100 * summary["lost_answer_frac"],
        plan.num_epochs, list(plan.epoch_batches or ()), plan.total)
    if jax.process_index() == 0:
        os.makedirs(config.logging.dir, exist_ok=True)
        with open(os.path.join(config.logging.dir, "data_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def with_data_metrics(step_fn: Callable, batches, truncation: bool = True) -> Callable:
    """`step_fn` whose metrics also carry the data position (`epoch`, 1-based) and, with `truncation`, the
    running fractions of the examples this host has read that were cut (`data_truncated_frac`) or lost their
    `</think>` / `</answer>` (`data_lost_think_frac`, `data_lost_answer_frac`); `batches` must be an
    `EpochIterator` (other iterators, e.g. random tokens, leave `step_fn` as it is)."""
    stats = getattr(batches, "stats", None)
    if stats is None:
        return step_fn

    def step(state, batch):
        state, metrics = step_fn(state, batch)
        extra = {"epoch": batches.epoch + 1}
        if truncation:
            n = max(stats.examples, 1)
            extra.update({f"data_{flag}_frac": getattr(stats, flag) / n for flag in ("truncated", "lost_think", "lost_answer")})
        return state, {**metrics, **extra}

    return step
