"""Deterministic synthetic SFT batches (`data.source: random`) for smoke tests, resume tests and benches.

Batch k is a pure function of (seed, k), so the iterator state is just the next batch index, and a
resumed run sees exactly the batches it would have seen. Each row packs two sequences (segment ids
1 and 2, positions restarting) of a learnable pattern — x[i+1] = x[i] + stride (mod vocab) — with the
first tokens of each sequence as an unmasked "prompt", so loss falls when the model learns.
"""

from __future__ import annotations

import numpy as np


class RandomTokenBatches:
    """Iterator of this process's rows of the global SFT batch, with `get_state`/`set_state` like grain's."""

    def __init__(self, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, prompt_len: int = 4):
        if batch_size % process_count:
            raise ValueError(f"batch size {batch_size} is not divisible by {process_count} processes")
        if seq_len < 2 * (prompt_len + 2):
            raise ValueError(f"seq_len {seq_len} is too short for two packed sequences")
        self.local = batch_size // process_count
        self.offset = process_index * self.local
        self.seq_len, self.vocab, self.seed, self.prompt_len = seq_len, vocab_size, seed, prompt_len
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batch(self.index)
        self.index += 1
        return batch

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])

    def batch(self, k: int) -> dict:
        rows = [self._row(k, self.offset + r) for r in range(self.local)]
        return {key: np.stack([r[key] for r in rows]) for key in rows[0]}

    def _row(self, k: int, r: int) -> dict:
        rng = np.random.default_rng((self.seed, k, r))
        n = self.seq_len
        cut = int(rng.integers(self.prompt_len + 2, n - self.prompt_len - 2))
        lengths = (cut, n - cut - int(rng.integers(0, 3)))  # a little padding at the end
        out = {k_: np.zeros(n, np.int32) for k_ in ("input_ids", "targets", "segment_ids", "positions")}
        out["loss_mask"] = np.zeros(n, np.float32)
        start = 0
        for seg, length in enumerate(lengths, 1):
            stride = int(rng.integers(1, 4))
            seq = (int(rng.integers(0, self.vocab)) + stride * np.arange(length + 1)) % self.vocab
            sl = slice(start, start + length)
            out["input_ids"][sl], out["targets"][sl] = seq[:-1], seq[1:]
            out["segment_ids"][sl], out["positions"][sl] = seg, np.arange(length)
            out["loss_mask"][start + self.prompt_len: start + length] = 1.0
            start += length
        return out
