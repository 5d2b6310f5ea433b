"""Rewards used by the GRPO tests: module-level so the reward workers can import them."""

from xr_jax import rewards


@rewards.register("test_even_length")
def even_length(response: str, ground_truth: str) -> float:
    """1 for an even number of characters: random policies get a mix of 0 and 1 (non-zero advantages)."""
    return float(len(response) % 2 == 0)


@rewards.register("test_odd_length")
def odd_length(response: str, ground_truth: str) -> float:
    """1 - `test_even_length`: a second term whose weighted sum with the first the tests can predict."""
    return float(len(response) % 2 == 1)
