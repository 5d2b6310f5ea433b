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
4. a capital letter, a space and that option's own text (`B No`), when the option texts are known;
5. a lone lowercase letter (`b`).
Step 2 comes before 5 so that options whose texts are themselves letters (GPQA has `{"A": "d", ...}`)
resolve by text. Step 4 needs the text to match, so "B or C" or "A cat" (not an option) pick nothing.
Anything else, e.g. "The answer is B", picks no option.

Evaluation scores multiple choice with these same functions (`evaluation.RewardScorer`), so RL rewards
exactly what evaluation credits; `reward_ground_truth` gives RL the option texts the same way.
"""

from __future__ import annotations

import json
import re

from xr_jax.rewards.extract import extract_answer, normalize_answer
from xr_jax.rewards.registry import register

LETTERS = "ABCDEFGHIJ"  # MMLU-Pro has 10 options
_LONE_LETTER = re.compile(rf"\(?([{LETTERS}])\)?[.:)]?")
_LETTER_THEN_TEXT = re.compile(rf"(?:\(([{LETTERS}])\)|([{LETTERS}])[.:)])\s*\S.*", re.DOTALL)
_LETTER_SPACE_TEXT = re.compile(rf"([{LETTERS}])\s+(\S.*)", re.DOTALL)
_LONE_LOWER = re.compile(rf"\(?([{LETTERS.lower()}])\)?[.:)]?")
MC_REWARDS = ("multiple_choice", "multiple_choice_lenient")


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


def reward_ground_truth(reward: str, answer: str, choices: dict[str, str] | None) -> str:
    """The ground-truth string an RL reward gets for an example: for the multiple-choice rewards, the
    letter with the option texts (so that answering with the text scores, as in evaluation); else `answer`."""
    return mc_ground_truth(answer, choices) if reward in MC_REWARDS and choices else answer


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
    if choices and (m := _LETTER_SPACE_TEXT.fullmatch(text)) and m.group(1) in choices:
        if normalize_answer(choices[m.group(1)]).casefold() == m.group(2).casefold():
            return m.group(1)
    if m := _LONE_LOWER.fullmatch(text):
        return m.group(1).upper()
    return None


@register("multiple_choice")
def multiple_choice_reward(response: str, ground_truth: str) -> float:
    """1.0 if the final answer (`extract_answer`, strict: inside `<answer>` tags) picks the ground-truth
    option, else 0.0."""
    return _score(response, ground_truth, "strict")


@register("multiple_choice_lenient")
def multiple_choice_lenient_reward(response: str, ground_truth: str) -> float:
    """`multiple_choice` with lenient extraction (the last `\\boxed{}` without an `<answer>` span)."""
    return _score(response, ground_truth, "lenient")


def _score(response: str, ground_truth: str, mode: str) -> float:
    letter, choices = parse_mc_ground_truth(ground_truth)
    answer = extract_answer(response, mode)
    if answer is None:
        return 0.0
    return 1.0 if extract_choice(answer, choices) == letter else 0.0


def _check_letter(letter: str, what: str) -> None:
    if not (isinstance(letter, str) and len(letter) == 1 and letter in LETTERS):
        raise ValueError(f"multiple-choice {what} must be one of {LETTERS}, got {letter!r}")
