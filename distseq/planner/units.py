"""Human-readable sizes on the command line and in files: ``80GiB``, ``1M`` tokens, ``2e6``."""

from __future__ import annotations

import re

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def _parse(text: str | float, units: dict[str, int], what: str, example: str) -> int:
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = _NUMBER.match(str(text))
        if match is None:
            raise ValueError(
                f"cannot read {what} {text!r}; write a number with a unit, e.g. {example}"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    if unit not in units:
        raise ValueError(
            f"unknown unit {unit!r} in {what} {text!r}; use one of "
            f"{sorted(u for u in units if u)} (e.g. {example})"
        )
    result = round(value * units[unit])
    if result <= 0:
        raise ValueError(f"{what} {text!r} must be positive, e.g. {example}")
    return result


def parse_bytes(text: str | float) -> int:
    """``"80GiB"`` -> 85899345920; bare numbers are bytes. Raises ``ValueError`` on bad input."""
    return _parse(text, _BYTE_UNITS, "memory size", "80GiB or 40GB")


def parse_count(text: str | float) -> int:
    """``"1M"`` -> 1000000 (k, M, G/B = 10^3, 10^6, 10^9). Raises ``ValueError`` on bad input."""
    return _parse(text, _COUNT_UNITS, "count", "1M or 262144")


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
