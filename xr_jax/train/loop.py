"""The training loop both trainers share: data -> jitted step -> metrics, checkpoints, preemption, NaN guard.

The loop knows nothing about the loss: it takes a step function `(state, global_batch) -> (state,
metrics)`, an iterator of process-local batches with `get_state`/`set_state`, and a checkpointer. It
saves every N steps, at the end, and when SIGTERM/SIGINT arrives (after the current step, so what is
saved is a consistent state); after `nan_patience` skipped (non-finite) steps in a row it saves and stops.

Only a run that reaches `total_steps` returns; every early stop (signal, non-finite steps, data ran out)
saves and raises `RunStopped`, so the trainer writes no export and the CLI exits non-zero with one line
(75 after a signal: rerun the same command to resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from xr_jax.errors import EXIT_RESUMABLE, OutputNotWritable, RunStopped, check_writable_dir

log = logging.getLogger("xr_jax.train")


class NonFiniteError(RunStopped):
    """Raised after too many consecutive non-finite steps (a checkpoint has been saved first)."""


def check_outputs(config) -> None:
    """Fail in the first second, not after hours: checkpoint.dir, logging.dir and the folder that will hold
    train.export_dir must be writable (they are created if missing)."""
    if config.checkpoint.dir is not None:
        check_writable_dir(config.checkpoint.dir, "checkpoint.dir")
    check_writable_dir(config.logging.dir, "logging.dir")
    if config.train.export_dir is not None:
        export = os.path.abspath(config.train.export_dir)
        check_writable_dir(os.path.dirname(export), "the folder of train.export_dir")
        if os.path.exists(export) and not os.path.isdir(export):
            raise OutputNotWritable(f"train.export_dir {export!r} exists and is not a directory")


# ----------------------------------------------------------------------------- metrics sinks


class MetricsLogger:
    """JSONL always (`dir/metrics.jsonl`, appended: a resumed run continues the file); TensorBoard and
    W&B only when asked — their packages are imported then, and only on process 0."""

    def __init__(self, directory: str, *, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "xr-jax", config: Optional[dict] = None):
        self.main = jax.process_index() == 0
        self._file = self._tb = self._wandb = None
        if not self.main:
            return
        os.makedirs(directory, exist_ok=True)
        self._file = open(os.path.join(directory, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:
                raise ImportError("logging.tensorboard=true needs `pip install tensorboardX`") from e
            self._tb = SummaryWriter(directory)
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError as e:
                raise ImportError("logging.wandb=true needs `pip install wandb`") from e
            self._wandb = wandb_lib.init(project=wandb_project, config=config, dir=directory, resume="allow")

    @classmethod
    def from_config(cls, config, config_dict: Optional[dict] = None) -> "MetricsLogger":
        lg = config.logging
        return cls(lg.dir, tensorboard=lg.tensorboard, wandb=lg.wandb, wandb_project=lg.wandb_project, config=config_dict)

    def log(self, record: dict) -> None:
        if not self.main:
            return
        self._file.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Progress:
    """What a person watching sees (process 0 only): a tqdm bar (rate, ETA, latest loss) when `bar` and
    stderr is a terminal; and when stdout is not a terminal (nohup, SLURM, a pipe), a flushed line every
    `print_every` steps on stdout -- step, loss, reward (GRPO), tokens/s, MFU when `mfu` (n/a when the
    device's peak is unknown), ETA -- so a batch job's log shows the run moving. The ETA leaves out the first
    step (compilation)."""

    def __init__(self, total: int, start: int, bar: bool, print_every: int = 0, mfu: bool = False):
        main = jax.process_index() == 0
        self._total, self._mfu = total, mfu
        self._bar = None
        if bar and main and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self._every = print_every if main and print_every > 0 and not sys.stdout.isatty() else 0
        self._first: Optional[tuple[int, float]] = None  # (step, time) when the first step of this run ended

    def update(self, record: dict) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}")
        if self._every:
            now = time.perf_counter()
            if self._first is None:
                self._first = (record["step"], now)
            if record["step"] % self._every == 0 or record["step"] == self._total:
                print(self.line(record, now), flush=True)

    def line(self, record: dict, now: float) -> str:
        step = record["step"]
        parts = [f"step {step}/{self._total}", f"loss {record['loss']:.4f}"]
        if "reward_mean" in record:
            parts.append(f"reward {record['reward_mean']:.4f}")
        parts.append(f"tokens/s {record.get('tokens_per_s', 0.0):.0f}")
        if self._mfu:
            parts.append(f"mfu {record['mfu']:.1%}" if "mfu" in record else "mfu n/a")
        first_step, first_time = self._first
        if step > first_step:
            eta = (now - first_time) / (step - first_step) * (self._total - step)
            parts.append(f"eta {_hms(eta)}")
        return "  ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def report_done(steps: int, export_dir: Optional[str]) -> None:
    """The last line of a completed run, on stdout (flushed), process 0 only."""
    if jax.process_index() == 0:
        print(f"done: {steps} steps" + (f", exported to {export_dir}" if export_dir else ""), flush=True)


# ----------------------------------------------------------------------------- preemption


class Preemption:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (all processes agree on it)."""

    def __init__(self):
        self.signal: Optional[int] = None

    def _handler(self, signum, frame):
        self.signal = signum

    @contextlib.contextmanager
    def installed(self):
        old = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def requested(self) -> bool:
        flag = self.signal is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
        return flag


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class LoopResult:
    """A completed run: the final state, the last step's metrics (None when nothing was left to do) and
    the run's length in steps."""

    state: Any
    last: Optional[dict]
    steps: int


def run_loop(
    state,
    step_fn: Callable[[Any, dict], tuple[Any, dict]],
    batches: Iterator[dict],
    *,
    total_steps: int,
    put_batch: Callable[[dict], dict],
    logger: MetricsLogger,
    checkpointer=None,
    config_dict: Optional[dict] = None,
    nan_patience: int = 5,
    flops_fn: Optional[Callable[[dict], float]] = None,
    peak_flops: Optional[float] = None,
    log_every: int = 1,
    progress: bool = True,
    print_every: int = 0,
) -> LoopResult:
    """Train from `state.step` to `total_steps`; raises `RunStopped` (after saving) on an early stop.

    flops_fn(local_batch) -> FLOPs of the global step, for MFU against `peak_flops` (whole mesh; None: an
    unknown device, MFU left out of the metrics and "n/a" in the progress line).
    progress / print_every: the terminal bar and the batch-job lines (`Progress`).
    """
    start = int(jax.device_get(state.step))
    bar = Progress(total_steps, start, progress, print_every, mfu=flops_fn is not None)
    preempt = Preemption()
    bad_in_a_row, last, reason = 0, None, "done"

    def save(step, force):
        if checkpointer is not None:
            checkpointer.save(step, state, batches.get_state(), config_dict, force=force)

    try:
        with preempt.installed():
            for step in range(start, total_steps):
                try:
                    local = next(batches)
                except StopIteration:
                    reason = "data_exhausted"
                    break
                t0 = time.perf_counter()
                state, metrics = step_fn(state, put_batch(local))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                record = {"step": step + 1, **metrics, "step_time": dt,
                          "tokens_per_s": metrics.get("input_tokens", 0.0) / dt}
                if flops_fn is not None and peak_flops:
                    record["mfu"] = flops_fn(local) / dt / peak_flops
                last = record
                if (step + 1) % log_every == 0 or step + 1 == total_steps:
                    logger.log(record)
                bar.update(record)
                bad_in_a_row = bad_in_a_row + 1 if metrics.get("skipped") else 0
                if bad_in_a_row >= nan_patience:
                    save(step + 1, force=True)
                    raise NonFiniteError(
                        f"stopped at step {step + 1}: {bad_in_a_row} non-finite steps in a row"
                        f"{'; checkpoint saved' if checkpointer is not None else ''}; no export written -- lower "
                        "the learning rate or inspect the data")
                if preempt.requested():
                    save(step + 1, force=True)
                    reason = "preempted"
                    break
                save(step + 1, force=step + 1 == total_steps)
            else:
                save(total_steps, force=True)
        if reason == "data_exhausted":
            save(int(jax.device_get(state.step)), force=True)
    finally:
        if checkpointer is not None:
            checkpointer.wait()
        bar.close()
    if reason != "done":
        raise _stopped(reason, int(jax.device_get(state.step)), total_steps, preempt.signal, checkpointer is not None)
    return LoopResult(state=state, last=last, steps=total_steps)


def _stopped(reason: str, step: int, total_steps: int, signum: Optional[int], saved: bool) -> RunStopped:
    """The one-line message and exit code of an early stop (a signal, or the data ran out)."""
    if reason == "data_exhausted":
        return RunStopped(f"stopped at step {step} of {total_steps}: the data ran out"
                          f"{'; checkpoint saved' if saved else ''}; no export written (lower train.steps "
                          "or give more data)")
    name = signal.Signals(signum).name
    if not saved:
        return RunStopped(f"stopped at step {step} by {name}; no checkpoint.dir, so nothing was saved",
                          128 + signum)
    return RunStopped(f"stopped at step {step} by {name}; checkpoint saved; rerun the same command to resume",
                      EXIT_RESUMABLE)


def resume_or_start(config, abstract_state, batches, fresh: Callable[[], Any]):
    """(state, checkpointer): the newest usable checkpoint of `checkpoint.dir` with its data position
    restored into `batches`, else `fresh()`; the checkpointer is None when checkpoint.dir is unset.

    The directory is locked for this run (`Checkpointer.close` releases it) and the checkpoint's config must
    match this one but for the keys `checkpoints.integrity.SAFE_TO_CHANGE` and `checkpoint.allow_config_change` permit.
    """
    from xr_jax.checkpoints import training as ckpt_lib
    from xr_jax.config import to_dict

    c = config.checkpoint
    if c.dir is None:
        return fresh(), None
    checkpointer = ckpt_lib.Checkpointer(c.dir, keep=c.keep, every=c.every, async_save=c.async_save, lock=True)
    try:
        restored = checkpointer.restore(abstract_state, config=to_dict(config), defaults=to_dict(type(config)()),
                                        allow=c.allow_config_change)
    except BaseException:
        checkpointer.close()  # releases the lock: the error ends this run
        raise
    if restored is None:
        return fresh(), checkpointer
    if restored.data_state:
        batches.set_state(restored.data_state)
    log.info("resumed from %s step %d", checkpointer.directory, restored.step)
    if restored.changed:
        log.info("config changed since the checkpoint (allowed): %s", ckpt_lib.describe_changes(restored.changed))
        o = config.optim
        if {"train.steps", "train.epochs"} & set(restored.changed) and (
                o.schedule in ("cosine", "linear") or (o.warmup_steps == 0 and o.warmup_ratio > 0)):
            log.warning("the run's length changed: the %s schedule is recomputed over %d steps, so the learning "
                        "rate from step %d on differs from the saved run's", o.schedule, config.total_steps,
                        restored.step)
    return restored.state, checkpointer
