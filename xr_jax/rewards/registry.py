"""Reward functions registered by name, so configs can say `rewards: [{name: math, weight: 1.0}]`.

A reward function has the signature `(response: str, ground_truth: str) -> float`. It must be a
module-level function: `RewardPool` sends it to worker processes by reference (module + name), and the
workers import that module to run it.
"""

from __future__ import annotations

from typing import Callable

from xr_jax.registry import Registry

RewardFn = Callable[[str, str], float]

REWARDS: Registry[RewardFn] = Registry("reward")
register = REWARDS.register
get = REWARDS.get
names = REWARDS.names
