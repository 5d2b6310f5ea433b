"""The `</think>` matcher: exact on any split of the pattern across tokens (vs Python `in` on the bytes)."""

import numpy as np
import pytest

from xr_jax.sampling.byte_match import ByteMatcher, kmp_automaton

PATTERN = b"</think>"
# Qwen2.5 splits seen in practice (reference/x_reasoner_recipe.md §5.2) plus adversarial pieces.
PIECES = [b"</", b"think", b">", b".</", b" </", b">\n\n", b"<", b"/", b"t", b"hink", b"th", b"ink>", b"x",
          b"</think>", b"a</think>b", b"<</", b"</thin", b"k", b"", b"\xe2\x80", b"\x94", b"<|im_end|>"]


def _found_at(pieces_ids, token_bytes):
    """Reference: first token index after which the decoded text contains the pattern (or None)."""
    text = b""
    for i, t in enumerate(pieces_ids):
        text += token_bytes[t]
        if PATTERN in text:
            return i
    return None


def test_kmp_automaton_finds_pattern_byte_by_byte():
    dfa = kmp_automaton(b"abab")
    state = 0
    for i, ch in enumerate(b"aabaabab"):
        state = dfa[state, ch]
        assert (state == 4) == (i == 7)
    assert (dfa[4] == 4).all()  # found is absorbing


@pytest.mark.parametrize(
    "split",
    [[b"</", b"think", b">"], [b".</", b"think", b">"], [b"</", b"think", b">\n\n"], [b" </", b"think", b">"],
     [b"<", b"/", b"t", b"hink", b">"], [b"</thin", b"k", b">"], [b"a</think>b"], [b"<</", b"think", b">"]],
)
def test_known_splits_are_found_at_their_last_token(split):
    m = ByteMatcher.build(PATTERN, PIECES, vocab_size=len(PIECES) + 3)
    ids = [PIECES.index(p) for p in split]
    states = [m.run(ids[: i + 1]) for i in range(len(ids))]
    assert states[-1] == m.found and all(s != m.found for s in states[:-1])


def test_random_token_streams_match_python_reference():
    m = ByteMatcher.build(PATTERN, PIECES, vocab_size=len(PIECES) + 3)  # ids past the table decode to b""
    rng = np.random.RandomState(0)
    found = 0
    for _ in range(3000):
        ids = rng.choice(len(PIECES) + 3, size=rng.randint(1, 12), p=None).tolist()
        want = _found_at(ids, PIECES + [b""] * 3)
        state, got = 0, None
        for i, t in enumerate(ids):
            state = m.transitions[t, state]
            if state == m.found and got is None:
                got = i
        assert got == want, (ids, got, want)
        found += want is not None
    assert found > 300  # the stream really exercises matches


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="non-empty"):
        kmp_automaton(b"")
    with pytest.raises(ValueError, match="vocabulary is 3"):
        ByteMatcher.build(PATTERN, PIECES, vocab_size=3)


def test_forced_exit_from_tokenizer_matches_the_text_the_tokenizer_writes():
    """`ForcedExit.from_tokenizer`, the one way every caller builds it: the exit ids are the tokenizer's
    `</think>`, ids past the tokenizer's vocabulary have no bytes, and the matcher finds `</think>` inside
    tokenised text whatever it is glued to."""
    from xr_jax.data.tokenizer import load_tokenizer
    from xr_jax.sampling.byte_match import token_byte_table
    from xr_jax.sampling.sampler import ForcedExit

    tok = load_tokenizer("tiny")
    vocab = tok.vocab_size + 5
    table = token_byte_table(tok, vocab)
    assert len(table) == vocab and table[tok.vocab_size:] == [b""] * 5
    assert b"".join(table[i] for i in tok.encode("a</think>b")) == b"a</think>b"
    fe = ForcedExit.from_tokenizer(tok, vocab)
    assert fe.ids == tuple(tok.encode("</think>"))
    assert fe.matcher.run(tok.encode("x.</think>\n\nanswer")) == fe.matcher.found
    assert fe.matcher.run(tok.encode("x.</thin k>")) != fe.matcher.found
