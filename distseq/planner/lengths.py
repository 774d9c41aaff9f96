"""Sequence-length inputs: a ``length,count`` CSV histogram or raw lengths (one per line, JSONL,
``.npy``), and seeded sampling of batches of a token budget from them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

_JSON_KEYS = ("length", "len", "num_tokens", "n_tokens", "tokens")


@dataclass(frozen=True)
class LengthDistribution:
    """Distinct ``lengths`` (ascending) and how often each occurs."""

    lengths: np.ndarray
    counts: np.ndarray

    @property
    def documents(self) -> int:
        return int(self.counts.sum())

    def sample(self, tokens: int, rng: np.random.Generator) -> np.ndarray:
        """Draw documents i.i.d. (weighted by count) until they hold at least ``tokens``."""
        p = self.counts / self.counts.sum()
        mean = float((self.lengths * p).sum())
        out: list[np.ndarray] = []
        total = 0
        while total < tokens:
            draw = rng.choice(self.lengths, size=max(16, int(2 * (tokens - total) / mean)), p=p)
            cut = int(np.searchsorted(np.cumsum(draw), tokens - total)) + 1
            out.append(draw[:cut])
            total += int(draw[:cut].sum())
        return np.concatenate(out).astype(np.int64)


def _fail(path: str, line: int, text: str, why: str) -> ValueError:
    return ValueError(
        f"{path}, line {line}: {text!r} {why}; write 'length,count' rows (a histogram) or one "
        "positive integer length per line"
    )


def _positive_int(text: str, path: str, line: int, allow_zero: bool = False) -> int:
    try:
        value = float(text)
    except ValueError:
        raise _fail(path, line, text, "is not a number") from None
    if value != int(value) or value < (0 if allow_zero else 1):
        raise _fail(path, line, text, "is not a positive integer")
    return int(value)


def _from_text(path: str) -> tuple[list[int], list[int]]:
    lengths, counts = [], []
    with open(path) as f:
        rows = [(n, raw.strip()) for n, raw in enumerate(f, 1) if raw.strip()]
    if rows and not rows[0][1].replace(",", "").replace(".", "").strip().isdigit():
        header = [h.strip().lower() for h in rows[0][1].split(",")]
        if header[:2] != ["length", "count"] and header != ["length"]:
            raise _fail(path, rows[0][0], rows[0][1], "is not a header 'length,count'")
        rows = rows[1:]
    for n, text in rows:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) > 2:
            raise _fail(path, n, text, "has more than two columns")
        lengths.append(_positive_int(parts[0], path, n))
        counts.append(_positive_int(parts[1], path, n, allow_zero=True) if len(parts) == 2 else 1)
    return lengths, counts


def _from_jsonl(path: str) -> list[int]:
    lengths = []
    with open(path) as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                raise _fail(path, n, raw.strip()[:60], "is not JSON") from None
            if isinstance(obj, dict):
                key = next((k for k in _JSON_KEYS if k in obj), None)
                if key is None:
                    raise _fail(path, n, raw.strip()[:60], f"has none of the keys {_JSON_KEYS}")
                obj = obj[key]
            lengths.append(_positive_int(str(obj), path, n))
    return lengths


def load_lengths(path: str) -> LengthDistribution:
    """Read a histogram or raw lengths; raises ``ValueError`` naming the bad line and value."""
    if not os.path.isfile(path):
        raise ValueError(f"lengths file {path!r} does not exist; pass a CSV/JSONL/.npy/text file")
    counts: list[int] | np.ndarray
    if path.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"{path}: expected a non-empty 1-D integer array of lengths, got shape "
                f"{arr.shape} dtype {arr.dtype}"
            )
        if (arr <= 0).any():
            bad = int(np.flatnonzero(arr <= 0)[0])
            raise ValueError(f"{path}: entry {bad} is {arr[bad]}; lengths must be >= 1")
        lengths, counts = arr.tolist(), [1] * arr.size
    elif path.endswith((".jsonl", ".json")):
        lengths = _from_jsonl(path)
        counts = [1] * len(lengths)
    else:
        lengths, counts = _from_text(path)
    if not lengths or sum(counts) == 0:
        raise ValueError(f"{path} holds no lengths (or only zero counts); add at least one")
    values, inverse = np.unique(np.asarray(lengths, dtype=np.int64), return_inverse=True)
    totals = np.bincount(inverse, weights=np.asarray(counts, dtype=np.float64))
    return LengthDistribution(values, totals.astype(np.int64))
