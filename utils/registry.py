"""Name -> entry registries with an error that lists the valid names."""
from typing import Any, Callable, Dict, List

from configs.errors import UserError


class Registry:
    """A mapping from names to entries (builders, specs), filled by `register` (a decorator) or `add`.

    Names keep their registration order (`in_order`), which is the order users see them in.
    """

    def __init__(self, kind: str):
        self.kind = kind  # used in error messages, e.g. "architecture"
        self._entries: Dict[str, Any] = {}

    def add(self, name: str, entry: Any) -> Any:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Take an entry out again (tests that register a toy entry for their module only)."""
        self._entries.pop(name, None)

    def register(self, name: str) -> Callable[[Callable], Callable]:
        return lambda fn: self.add(name, fn)

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> List[str]:
        return sorted(self._entries)

    def in_order(self) -> List[str]:
        return list(self._entries)

    def items(self):
        return list(self._entries.items())

    def __contains__(self, name: str) -> bool:
        return name in self._entries
