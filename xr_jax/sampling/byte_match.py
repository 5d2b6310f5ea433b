"""Find a byte string in generated text one token at a time, with one gather per decode step.

Qwen2.5 has no `</think>` token: the string spans three or more BPE tokens whose split depends on the
neighbouring characters (`'.</' 'think' '>'`, `'</' 'think' '>\\n\\n'`, ...). Matching fixed ids would
miss most occurrences, so the match runs on the bytes the tokens decode to.

The matcher is a KMP automaton over bytes (state = length of the longest prefix of the pattern that
ends the text so far; the last state, "found", absorbs). Running it over each token's bytes on the
host gives a table `transitions[token, state] -> state`, so inside a jitted loop the whole match is
`state = transitions[token, state]` — exact for any split of the pattern across tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


def kmp_automaton(pattern: bytes) -> np.ndarray:
    """[len+1, 256] next-state table over bytes; state len(pattern) ("found") is absorbing."""
    if not pattern:
        raise ValueError("the pattern to match must be a non-empty byte string")
    n = len(pattern)
    dfa = np.zeros((n + 1, 256), np.int32)
    dfa[0, pattern[0]] = 1
    fallback = 0  # state the automaton would be in on pattern[1:j]
    for j in range(1, n):
        dfa[j] = dfa[fallback]
        dfa[j, pattern[j]] = j + 1
        fallback = dfa[fallback, pattern[j]]
    dfa[n] = n
    return dfa


def token_byte_table(tokenizer, vocab_size: int) -> list[bytes]:
    """Each model-vocabulary id's bytes (b"" for padded ids the tokenizer does not have)."""
    table = []
    for i in range(vocab_size):
        try:
            table.append(tokenizer.token_bytes(i))
        except (KeyError, ValueError, IndexError):
            table.append(b"")
    return table


def _padded(token_bytes: Sequence[bytes], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Padded [vocab_size, max_len] uint8 byte table and lengths; ids past the tokenizer decode to b""."""
    if len(token_bytes) > vocab_size:
        raise ValueError(f"token_bytes has {len(token_bytes)} entries but the model vocabulary is {vocab_size}")
    lengths = np.zeros((vocab_size,), np.int32)
    lengths[: len(token_bytes)] = [len(b) for b in token_bytes]
    table = np.zeros((vocab_size, max(1, int(lengths.max()))), np.uint8)
    for i, b in enumerate(token_bytes):
        table[i, : len(b)] = np.frombuffer(bytes(b), np.uint8)
    return table, lengths


@dataclasses.dataclass(frozen=True)
class ByteMatcher:
    """`transitions[token, state]` for `pattern`; a row has produced the pattern iff its state == `found`."""

    pattern: bytes
    transitions: np.ndarray  # [vocab, len(pattern) + 1] int32

    @property
    def found(self) -> int:
        return len(self.pattern)

    @classmethod
    def build(cls, pattern: bytes, token_bytes: Sequence[bytes], vocab_size: int) -> "ByteMatcher":
        dfa = kmp_automaton(pattern)
        table, lengths = _padded(token_bytes, vocab_size)
        states = np.broadcast_to(np.arange(len(pattern) + 1, dtype=np.int32), (vocab_size, len(pattern) + 1)).copy()
        for j in range(table.shape[1]):  # feed byte j of every token at once
            live = (lengths > j)[:, None]
            states = np.where(live, dfa[states, table[:, j : j + 1]], states)
        return cls(bytes(pattern), states)

    def run(self, token_ids: Sequence[int], state: int = 0) -> int:
        """Host-side: the state after `token_ids` (for tests and for resuming from a prefix)."""
        for t in token_ids:
            state = int(self.transitions[t, state])
        return state
