"""Verifiable rewards: answer extraction, the built-in reward functions, and the worker pool that runs them.

Built-in rewards (`get(name)`): `math`, `multiple_choice` (strict extraction: the answer must be inside
`<answer>` tags, as the X-Reasoner templates ask), `math_lenient`, `multiple_choice_lenient` (also the last
`\\boxed{}` without tags: for tagless templates), `format`. Register more with `@register(name)`
on a module-level `(response: str, ground_truth: str) -> float` function. Score batches with
`RewardPool.score_batch`, never by calling a reward on model output in the training process: the pool
bounds each item's time and memory.
"""

from xr_jax.rewards.choice import (
    extract_choice,
    mc_ground_truth,
    multiple_choice_reward,
    parse_mc_ground_truth,
    reward_ground_truth,
)
from xr_jax.rewards.extract import EXTRACTION_MODES, extract_answer, last_boxed, normalize_answer
from xr_jax.rewards.formatting import format_reward
from xr_jax.rewards.math_equiv import answers_match, math_reward
from xr_jax.rewards.pool import RewardPool, ScoreStats
from xr_jax.rewards.registry import get, names, register

__all__ = [
    "EXTRACTION_MODES",
    "RewardPool",
    "ScoreStats",
    "answers_match",
    "extract_answer",
    "extract_choice",
    "format_reward",
    "get",
    "last_boxed",
    "math_reward",
    "mc_ground_truth",
    "multiple_choice_reward",
    "names",
    "normalize_answer",
    "parse_mc_ground_truth",
    "register",
    "reward_ground_truth",
]
