"""The `multiple_choice` reward: 1 if the response picks the ground-truth option, else 0.

The ground truth is an option letter (`"D"`), or, when the option texts are known, the JSON made by
`mc_ground_truth("D", {"A": ..., "D": ...})`. Carrying the choices inside the ground-truth string keeps the
one reward signature `(response, ground_truth) -> float`; with them, an answer that gives the option text
instead of its letter is also recognised.

The paper's multiple-choice template asks for "just one of the options" in `<answer>` tags, with the
example `<answer>B: No</answer>`; its own outputs include `<answer>A</answer>` and
`<answer>D. Herpes Simplex encephalitis</answer>`. `extract_choice` accepts, in this order:
1. a lone capital letter, optionally as `(B)`, `B.`, `B:`, `B)`;
2. the exact text of one option (case-insensitive, normalised);
3. a capital letter followed by `.`, `:` or `)` and then text (`B: No`, `(B) No`);
4. a lone lowercase letter (`b`).
Step 2 comes before 4 so that options whose texts are themselves letters (GPQA has `{"A": "d", ...}`)
resolve by text. Anything else, e.g. "The answer is B", picks no option.
"""

from __future__ import annotations

import json
import re

from xr_jax.rewards.extract import extract_answer, normalize_answer
from xr_jax.rewards.registry import register

LETTERS = "ABCDEFGHIJ"  # MMLU-Pro has 10 options
_LONE_LETTER = re.compile(rf"\(?([{LETTERS}])\)?[.:)]?")
_LETTER_THEN_TEXT = re.compile(rf"(?:\(([{LETTERS}])\)|([{LETTERS}])[.:)])\s*\S.*", re.DOTALL)
_LONE_LOWER = re.compile(rf"\(?([{LETTERS.lower()}])\)?[.:)]?")


def mc_ground_truth(letter: str, choices: dict[str, str] | None = None) -> str:
    """The ground-truth string for `multiple_choice`: the bare letter, or JSON with the choices."""
    _check_letter(letter, "letter")
    if choices is None:
        return letter
    for key in choices:
        _check_letter(key, "choices key")
    if letter not in choices:
        raise ValueError(f"answer letter {letter!r} is not among the choices {sorted(choices)}")
    return json.dumps({"answer": letter, "choices": choices}, ensure_ascii=False)


def parse_mc_ground_truth(ground_truth: str) -> tuple[str, dict[str, str] | None]:
    """Inverse of `mc_ground_truth`: (letter, choices or None)."""
    if ground_truth.lstrip().startswith("{"):
        data = json.loads(ground_truth)
        return data["answer"], data["choices"]
    letter = ground_truth.strip()
    _check_letter(letter, "ground_truth")
    return letter, None


def extract_choice(answer: str, choices: dict[str, str] | None = None) -> str | None:
    """The option letter an extracted answer picks (rules in the module doc), or None."""
    text = normalize_answer(answer).replace("*", "").strip()
    if m := _LONE_LETTER.fullmatch(text):
        return m.group(1)
    if choices:
        wanted = text.casefold()
        for letter, option in choices.items():
            if normalize_answer(option).casefold() == wanted:
                return letter
    if m := _LETTER_THEN_TEXT.fullmatch(text):
        return m.group(1) or m.group(2)
    if m := _LONE_LOWER.fullmatch(text):
        return m.group(1).upper()
    return None


@register("multiple_choice")
def multiple_choice_reward(response: str, ground_truth: str) -> float:
    """1.0 if the final answer (`extract_answer`) picks the ground-truth option, else 0.0."""
    letter, choices = parse_mc_ground_truth(ground_truth)
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    return 1.0 if extract_choice(answer, choices) == letter else 0.0


def _check_letter(letter: str, what: str) -> None:
    if not (isinstance(letter, str) and len(letter) == 1 and letter in LETTERS):
        raise ValueError(f"multiple-choice {what} must be one of {LETTERS}, got {letter!r}")
