"""Name -> builder registries with an error that lists the valid names."""
from typing import Callable, Dict, List

from configs.errors import UserError


class Registry:
    """A mapping from names to callables, filled by the ``register`` decorator."""

    def __init__(self, kind: str):
        self.kind = kind  # used in error messages, e.g. "architecture"
        self._entries: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def decorator(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
