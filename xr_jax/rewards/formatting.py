"""The `format` reward: 1 if the response is exactly `<think>…</think><answer>…</answer>`.

Meant as an extra, weighted term next to an accuracy reward (the paper itself uses none: its SFT model
already follows the format). Each tag must occur exactly once, in that order, with only whitespace
outside the two blocks; the check is linear string search, no backtracking regex.
"""

from __future__ import annotations

from xr_jax.rewards.registry import register

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@register("format")
def format_reward(response: str, ground_truth: str) -> float:
    """1.0 if `response` is well formed (module doc), else 0.0; `ground_truth` is ignored."""
    del ground_truth
    if any(response.count(tag) != 1 for tag in _TAGS):
        return 0.0
    think, end_think, answer, end_answer = (response.index(tag) for tag in _TAGS)
    if not think < end_think < answer < end_answer:
        return 0.0
    outside = (
        response[:think],
        response[end_think + len("</think>") : answer],
        response[end_answer + len("</answer>") :],
    )
    return 1.0 if all(not part.strip() for part in outside) else 0.0
