"""Named extension points: small module-level functions registered by name with a decorator.

Rewards, GRPO advantage estimators, loss aggregations and KL estimators are each one `Registry`; a config
names the function, and the config loader checks the name against the registry (a field annotated
`Annotated[str, REGISTRY]`), so the allowed values are whatever is registered, listed in one place.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Functions of one kind (`kind` names it in errors) by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._fns: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: register `fn` under `name`. Re-registering the same function (a re-import) is allowed."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(fn: F) -> F:
            old = self._fns.get(name)
            if old is not None and _origin(old) != _origin(fn):
                raise ValueError(f"{self.kind} {name!r} is already registered to {_origin(old)}")
            self._fns[name] = fn
            return fn

        return decorator

    def get(self, name: str, key: str | None = None) -> F:
        """The function registered under `name`; an unknown name raises ValueError naming `key` (the setting
        that holds the name) and the registered names."""
        if name not in self:
            where = f"{key} is {name!r}" if key else f"unknown {self.kind} {name!r}"
            raise ValueError(f"{where}; registered {self.kind}s: {', '.join(self.names())}")
        return self._fns[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._fns)

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in self._fns


def _origin(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
