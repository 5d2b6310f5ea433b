"""The `math` reward: 1 if the extracted answer is equivalent to the ground truth, else 0.

Equivalence, cheapest first:
1. equal normalised strings (`normalize_answer`);
2. both plain numbers (integer, decimal, `a/b`, `\\frac{a}{b}`, optionally followed by a unit word such as
   "18 dollars"): exact rational equality; this decides, so `0.5` == `\\frac{1}{2}` and `17` != `18`;
3. math-verify (LaTeX/symbolic), on the raw strings wrapped as `\\boxed{…}`, gold parsed first.

math-verify calls sympy, which can hang or exhaust memory on hostile input (`9^{9^{9^{9^9}}}`). So this
function must run inside a `RewardPool` worker, whose per-item timeout and memory limit bound it.
math-verify's own `signal.alarm` timeouts are turned off: the pool is the one timeout mechanism.
"""

from __future__ import annotations

import functools
import logging
import re
from fractions import Fraction

from xr_jax.rewards.extract import extract_answer, normalize_answer
from xr_jax.rewards.registry import register

# A final answer longer than this is not a short math answer; it is scored 0 without parsing, which keeps
# megabyte strings and deep nesting away from sympy.
MAX_ANSWER_CHARS = 1000

_NUMBER = r"-?(?:\d+(?:\.\d*)?|\.\d+)"
# "18", "18 dollars", "5 apples each"; a unit is a separate word of 2+ letters, so `5x` and `2 pi` are not
# numbers.
_PLAIN_NUMBER = re.compile(rf"({_NUMBER})(?: (?!pi\b)[A-Za-z]{{2,}}){{0,3}}")
_RATIO = re.compile(r"(-?\d+) ?/ ?(\d+)")
_FRAC = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}")


@register("math")
def math_reward(response: str, ground_truth: str) -> float:
    """1.0 if the response's final answer (`extract_answer`, strict: inside `<answer>` tags) equals
    `ground_truth` (a short LaTeX or plain answer without `\\boxed`, e.g. `\\frac{14}{3}` or `1,000`), else 0.0."""
    return _score(response, ground_truth, "strict")


@register("math_lenient")
def math_lenient_reward(response: str, ground_truth: str) -> float:
    """`math` with lenient extraction (the last `\\boxed{}` when there is no `<answer>` span): for prompt
    templates that do not ask for tags."""
    return _score(response, ground_truth, "lenient")


def _score(response: str, ground_truth: str, mode: str) -> float:
    answer = extract_answer(response, mode)
    if answer is None:
        return 0.0
    return 1.0 if answers_match(answer, ground_truth) else 0.0


def answers_match(answer: str, ground_truth: str) -> bool:
    """Whether `answer` is equivalent to `ground_truth` (see the module doc)."""
    # The length check comes before the cache, so hostile megabyte answers are never cache keys.
    return len(answer) <= MAX_ANSWER_CHARS and _answers_match(answer, ground_truth)


@functools.lru_cache(maxsize=4096)  # the G samples of a group often give the same answer
def _answers_match(answer: str, ground_truth: str) -> bool:
    norm_answer, norm_truth = normalize_answer(answer), normalize_answer(ground_truth)
    if norm_answer.replace(" ", "") == norm_truth.replace(" ", ""):
        return True
    num_answer, num_truth = _as_number(norm_answer), _as_number(norm_truth)
    if num_answer is not None and num_truth is not None:
        return num_answer == num_truth
    return _math_verify_equal(answer, ground_truth)


def _as_number(s: str) -> Fraction | None:
    """The exact value of a plain number (see module doc), else None. Regex-gated: never a parser."""
    if m := _PLAIN_NUMBER.fullmatch(s):
        return Fraction(m.group(1))
    if m := _RATIO.fullmatch(s):
        return Fraction(int(m.group(1)), int(m.group(2))) if int(m.group(2)) else None
    if m := _FRAC.fullmatch(s):
        value = Fraction(int(m.group(2)), int(m.group(3))) if int(m.group(3)) else None
        return -value if (value is not None and m.group(1)) else value
    return None


def _math_verify_equal(answer: str, ground_truth: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold = parse(f"\\boxed{{{ground_truth}}}", extraction_config=config, parsing_timeout=None)
    if not gold:
        return False
    pred = parse(f"\\boxed{{{answer}}}", extraction_config=config, parsing_timeout=None)
    return bool(pred) and verify(gold, pred, timeout_seconds=None)


def warm_up() -> None:
    """Import math-verify/sympy and run one check, so a fresh worker's first item is not charged the
    import time (~0.5 s) against its timeout."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # the "timeout is disabled" warnings
    _math_verify_equal("\\frac{1}{2}", "0.5")
