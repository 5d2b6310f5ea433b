"""Run reward functions in killable worker processes, with a deadline per item.

Why processes: math verification calls sympy, which can hang in C code or eat all memory on hostile
model output; only a separate process can be stopped reliably. Workers come from a `forkserver` (forking
the caller, which may have initialised JAX, is unsafe), are CPU-only, run under an address-space limit,
start with math-verify already imported, and are recycled after `max_items_per_worker` items to bound
sympy's cache growth.

How a batch runs: items are cut into chunks (several per worker, so the common case costs one pipe
round trip per chunk plus one small message per item). A worker reports each item as it finishes, so the
pool knows which item is running and since when. An item that overruns `timeout` scores 0 and costs only
its own timeout: its worker is killed and replaced, and the rest of its chunk is re-queued. A worker that
dies mid-item (segfault, `os._exit`) scores that item 0 the same way; an exception in the reward function
scores 0 without losing the worker. Model output is never evaluated in the calling process.

Not thread-safe: one `score_batch` call at a time per pool.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import time
import weakref
from collections import deque
from multiprocessing.process import BaseProcess
from typing import Literal, Sequence

from xr_jax.rewards import registry

Status = Literal["ok", "error", "timeout", "crash"]

# forkserver: workers fork from a clean server process (never from the caller, which may have initialised
# JAX). The server imports the main module (as Python's default preload does; otherwise every worker would
# re-import it) and warms math-verify once, so a replacement worker starts in milliseconds.
_CTX = multiprocessing.get_context("forkserver")
_PRELOAD = ["__main__", "xr_jax.rewards.preload"]
_READY = "ready"


@dataclasses.dataclass(frozen=True)
class ScoreStats:
    """What happened to a batch. Every item that is not "ok" scored 0."""

    n: int
    ok: int
    errors: int  # the reward function raised or returned a non-finite value
    timeouts: int  # the item ran past its timeout; its worker was killed
    crashes: int  # the worker process died on the item
    workers_replaced: int  # killed or dead workers replaced during this batch (recycling not counted)
    wall_s: float
    status: tuple[Status, ...]  # per item, in input order
    item_s: tuple[float, ...]  # per item: seconds from its start in a worker to its answer (or kill)


@dataclasses.dataclass
class _Worker:
    proc: BaseProcess
    conn: multiprocessing.connection.Connection
    started_at: float
    ready: bool = False
    items: deque[int] = dataclasses.field(default_factory=deque)  # sent, not yet answered, in order
    item_started: float = 0.0  # when items[0] began (the previous answer's arrival, or the send)
    scored: int = 0  # items answered over the worker's life, for recycling


@dataclasses.dataclass
class _Batch:
    """One `score_batch` call's inputs and results."""

    fn: registry.RewardFn
    responses: list[str]
    ground_truths: list[str]
    timeout: float
    pending: deque[list[int]] = dataclasses.field(default_factory=deque)  # chunks not yet sent
    replaced: int = 0

    def __post_init__(self):
        n = len(self.responses)
        self.scores: list[float] = [0.0] * n
        self.status: list[Status | None] = [None] * n
        self.item_s: list[float] = [0.0] * n
        self.remaining = n

    def finish(self, index: int, score: float, status: Status, started: float) -> None:
        self.scores[index], self.status[index] = score, status
        self.item_s[index] = time.monotonic() - started
        self.remaining -= 1


class RewardPool:
    """A pool of reward worker processes; use as a context manager or call `close()`.

    Args:
      num_workers: worker processes (default `min(8, os.cpu_count())`).
      max_items_per_worker: a worker is replaced after this many items (bounds sympy cache growth).
      memory_limit_mb: address-space limit per worker (RLIMIT_AS); an allocation past it raises
        MemoryError in the worker, which scores 0. None for no limit.
      start_timeout: seconds a new worker may take to start before the pool raises.
      max_chunk: most items sent to a worker at once.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        *,
        max_items_per_worker: int = 2000,
        memory_limit_mb: int | None = 4096,
        start_timeout: float = 120.0,
        max_chunk: int = 64,
    ):
        num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        for key, value in [
            ("num_workers", num_workers),
            ("max_items_per_worker", max_items_per_worker),
            ("max_chunk", max_chunk),
        ]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RewardPool {key} must be a positive int, got {value!r}")
        if memory_limit_mb is not None and (not isinstance(memory_limit_mb, int) or memory_limit_mb < 256):
            raise ValueError(
                f"RewardPool memory_limit_mb must be None or an int >= 256, got {memory_limit_mb!r}"
            )
        if not start_timeout > 0:
            raise ValueError(f"RewardPool start_timeout must be > 0, got {start_timeout!r}")
        self._max_items = max_items_per_worker
        self._memory_limit_mb = memory_limit_mb
        self._start_timeout = start_timeout
        self._max_chunk = max_chunk
        # Takes effect if this process's fork server is not running yet (it is shared, one per process).
        _CTX.set_forkserver_preload(_PRELOAD)
        self._workers: list[_Worker] = []
        self.workers_started = 0  # over the pool's life, recycled and replaced workers included
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)
        self._workers.extend(self._spawn() for _ in range(num_workers))

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        self._finalizer()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def score_batch(
        self,
        fn_name: str,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        *,
        timeout: float = 5.0,
    ) -> tuple[list[float], ScoreStats]:
        """Score `responses[i]` against `ground_truths[i]` with the reward registered as `fn_name`.

        `timeout` is per item, in seconds. Returns the scores in input order and the batch's `ScoreStats`.
        """
        if not self._finalizer.alive:
            raise RuntimeError("RewardPool is closed")
        fn = registry.get(fn_name)
        try:
            pickle.dumps(fn)
        except Exception as e:
            raise ValueError(
                f"reward {fn_name!r} cannot be sent to worker processes; it must be a module-level function"
            ) from e
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground_truths")
        for name, seq in [("responses", responses), ("ground_truths", ground_truths)]:
            for i, s in enumerate(seq):
                if not isinstance(s, str):
                    raise TypeError(f"{name}[{i}] must be str, got {type(s).__name__}")
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a finite number > 0, got {timeout!r}")

        start = time.monotonic()
        batch = _Batch(fn, list(responses), list(ground_truths), timeout)
        chunk = max(1, min(self._max_chunk, math.ceil(len(batch.scores) / (4 * len(self._workers)))))
        batch.pending.extend(
            list(range(i, min(i + chunk, len(batch.scores)))) for i in range(0, len(batch.scores), chunk)
        )
        try:
            while batch.remaining:
                self._dispatch(batch)
                self._wait(batch)
                for w in list(self._workers):
                    self._collect(w, batch)
        except BaseException:
            # Workers still holding items of this batch would answer into the next one: replace them.
            for w in list(self._workers):
                if w.items:
                    self._replace(w)
            raise
        status = tuple(batch.status)
        return batch.scores, ScoreStats(
            n=len(status),
            ok=status.count("ok"),
            errors=status.count("error"),
            timeouts=status.count("timeout"),
            crashes=status.count("crash"),
            workers_replaced=batch.replaced,
            wall_s=time.monotonic() - start,
            status=status,
            item_s=tuple(batch.item_s),
        )

    def _dispatch(self, batch: _Batch) -> None:
        """Send the next chunk to every idle worker (recycling the worn-out ones)."""
        for w in list(self._workers):
            if w.ready and not w.items and batch.pending:
                if w.scored >= self._max_items:
                    self._replace(w)
                    continue
                ids = batch.pending.popleft()
                w.conn.send((batch.fn, [(i, batch.responses[i], batch.ground_truths[i]) for i in ids]))
                w.items.extend(ids)
                w.item_started = time.monotonic()

    def _wait(self, batch: _Batch) -> None:
        """Sleep until a worker sends or dies, or the earliest running item's deadline."""
        deadlines = [w.item_started + batch.timeout for w in self._workers if w.items]
        wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 1.0
        handles = [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers]
        multiprocessing.connection.wait(handles, timeout=wait_s)

    def _collect(self, w: _Worker, batch: _Batch) -> None:
        """Record `w`'s answers; score its running item 0 and replace it if it overran or died."""
        alive = self._drain(w, batch)
        now = time.monotonic()
        if alive and w.proc.is_alive():
            if w.items and now - w.item_started > batch.timeout:
                batch.finish(w.items.popleft(), 0.0, "timeout", w.item_started)
            elif not w.ready and now - w.started_at > self._start_timeout:
                raise RuntimeError(f"reward worker did not start within {self._start_timeout} s")
            else:
                return
        elif not w.ready:
            raise RuntimeError(f"reward worker exited during start-up (exit code {w.proc.exitcode})")
        elif w.items:
            batch.finish(w.items.popleft(), 0.0, "crash", w.item_started)
        if w.items:
            batch.pending.appendleft(list(w.items))
        self._replace(w)
        batch.replaced += 1

    def _drain(self, w: _Worker, batch: _Batch) -> bool:
        """Read every message `w` has sent; False if its pipe is closed (the process died)."""
        try:
            while w.conn.poll():
                message = w.conn.recv()
                if message == _READY:
                    w.ready = True
                    continue
                index, score, item_status = message
                if not w.items or w.items[0] != index:
                    raise RuntimeError(f"reward worker answered item {index} out of order")
                w.items.popleft()
                w.scored += 1
                batch.finish(index, score, item_status, w.item_started)
                w.item_started = time.monotonic()
        except (EOFError, OSError):
            return False
        return True

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = _CTX.Pipe()
        proc = _CTX.Process(
            target=_worker_main,
            args=(child_conn, self._memory_limit_mb),
            name="xr-jax-reward-worker",
            daemon=True,
        )
        proc.start()
        child_conn.close()
        self.workers_started += 1
        return _Worker(proc=proc, conn=parent_conn, started_at=time.monotonic())

    def _replace(self, w: _Worker) -> None:
        _kill(w)
        self._workers[self._workers.index(w)] = self._spawn()


def _kill(w: _Worker) -> None:
    w.proc.kill()
    w.proc.join(timeout=5)
    w.conn.close()


def _kill_all(workers: list[_Worker]) -> None:
    for w in workers:
        _kill(w)
    workers.clear()


def _worker_main(conn: multiprocessing.connection.Connection, memory_limit_mb: int | None) -> None:
    """Worker loop: receive (fn, [(index, response, ground_truth), ...]), answer (index, score, status)
    per item, in order. The pool ends a worker by killing it; a closed pipe also ends it."""
    # Never touch an accelerator from a reward worker (these take effect before any JAX backend starts).
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and then kills us
    if memory_limit_mb is not None:
        import resource

        limit = memory_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from xr_jax.rewards.math_equiv import warm_up

    warm_up()  # already done in the fork server unless that was started without our preload
    conn.send(_READY)
    while True:
        try:
            fn, items = conn.recv()
        except EOFError:
            return
        for index, response, ground_truth in items:
            try:
                score = float(fn(response, ground_truth))
                item_status = "ok" if math.isfinite(score) else "error"
            except Exception:
                score, item_status = 0.0, "error"
            conn.send((index, score if item_status == "ok" else 0.0, item_status))
