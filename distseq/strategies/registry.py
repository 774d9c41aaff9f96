"""A name -> strategy table: one per family (softmax attention, linear attention)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class _Named(Protocol):
    name: str
    layouts: tuple[str, ...]


Strategy = TypeVar("Strategy", bound=_Named)


def check_layout_supported(strategy: _Named, layout: str) -> None:
    """Raise ``ValueError`` unless ``strategy`` handles shard ``layout``."""
    if layout not in strategy.layouts:
        allowed = " or ".join(repr(name) for name in strategy.layouts)
        raise ValueError(f"{strategy.name} needs layout={allowed} (got {layout!r})")


class Registry(Generic[Strategy]):
    """Strategies of one family by name; ``register`` is the class decorator of a plug-in."""

    def __init__(self, family: str, default: str) -> None:
        self.family = family
        self.default = default  # what the family's entry point runs when not told
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

    def check(self, name: str, *args, **kwargs) -> Strategy:
        """The strategy ``name`` after its ``check_group(*args, **kwargs)``; its
        ``ValueError`` names the strategies of the family that could run instead."""
        strategy = self.get(name)
        try:
            strategy.check_group(*args, **kwargs)
        except ValueError as exc:
            others = self.supporting(*args, **kwargs)
            hint = f"; strategies that can: {others}" if others else ""
            raise ValueError(f"{exc}{hint}") from None
        return strategy

    def supporting(self, *args, **kwargs) -> list[str]:
        """Names (sorted) of the strategies whose ``check_group(*args, **kwargs)`` passes."""
        names = []
        for name in sorted(self._table):
            try:
                self._table[name].check_group(*args, **kwargs)
            except ValueError:
                continue
            names.append(name)
        return names

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table
