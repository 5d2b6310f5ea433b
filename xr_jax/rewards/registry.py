"""Reward functions registered by name, so configs can say `reward: math`.

A reward function has the signature `(response: str, ground_truth: str) -> float`. It must be a
module-level function: `RewardPool` sends it to worker processes by reference (module + name), and the
workers import that module to run it.
"""

from __future__ import annotations

from typing import Callable

RewardFn = Callable[[str, str], float]

_REGISTRY: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register `fn` under `name`. Re-registering the same function (a re-import) is allowed."""

    def decorator(fn: RewardFn) -> RewardFn:
        old = _REGISTRY.get(name)
        if old is not None and _origin(old) != _origin(fn):
            raise ValueError(f"reward {name!r} is already registered to {_origin(old)}")
        _REGISTRY[name] = fn
        return fn

    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    return decorator


def get(name: str) -> RewardFn:
    """The reward function registered under `name`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(_REGISTRY)}") from None


def names() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(_REGISTRY)


def _origin(fn: RewardFn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
