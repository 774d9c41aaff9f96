"""A name -> strategy table: one per family (softmax attention, linear attention)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

Strategy = TypeVar("Strategy")


class Registry(Generic[Strategy]):
    """Strategies of one family by name; ``register`` is the class decorator of a plug-in."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._table: dict[str, Strategy] = {}

    def register(self, cls: type[Strategy]) -> type[Strategy]:
        """Class decorator: instantiate ``cls`` and make it selectable as ``cls.name``."""
        if cls.name in self._table:
            raise ValueError(f"{self.family} strategy {cls.name!r} is registered twice")
        self._table[cls.name] = cls()
        return cls

    def get(self, name: str) -> Strategy:
        if name not in self._table:
            raise ValueError(
                f"unknown {self.family} strategy {name!r}; choose one of {sorted(self._table)}"
            )
        return self._table[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table
