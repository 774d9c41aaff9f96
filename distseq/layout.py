"""Sequence sharding layouts: which global token positions each rank holds, in which order.

``contiguous``: each document is cut into ``P`` equal chunks; rank ``r`` holds chunk ``r``.
``zigzag``: each document is cut into ``2P`` equal chunks; rank ``r`` holds chunks ``r`` and
``2P - 1 - r``, in that order, which balances causal attention work across ranks.

With ``cu_seqlens`` (the *global* int32 cumulative document boundaries, identical on every
rank, batch 1) every document is sharded on its own and the local shard concatenates, over the
documents, each document's part for this rank. Without it the whole sequence is one document
(per batch row).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

LAYOUTS = ("contiguous", "zigzag")


def cu_seqlens(lengths: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """int32 cumulative boundaries ``[n + 1]`` (``0, l0, l0 + l1, ...``) of ``n`` segments."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    out[1:] = torch.tensor(list(lengths), dtype=torch.int64, device=device).cumsum(0)
    return out


def chunks_per_rank(layout: str) -> int:
    """How many equal chunks of every document a rank holds (1 contiguous, 2 zigzag)."""
    check_layout(layout)
    return 1 if layout == "contiguous" else 2


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}")


def doc_lengths(cu_seqlens: torch.Tensor | Sequence[int] | None, total: int) -> tuple[int, ...]:
    """Global document lengths from ``cu_seqlens`` (or one document of length ``total``)."""
    if cu_seqlens is None:
        return (total,)
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    return tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))


def check_divisible(lengths: Sequence[int], world_size: int, layout: str, what: str) -> None:
    """Raise ``ValueError`` unless every length splits into the layout's equal chunks."""
    parts = world_size * chunks_per_rank(layout)
    for index, length in enumerate(lengths):
        if length % parts:
            doc = f"document {index} of " if len(lengths) > 1 else ""
            padded = -(-length // parts) * parts
            raise ValueError(
                f"{what}: {doc}length {length} is not divisible by {parts} "
                f"({layout} layout over {world_size} ranks needs multiples of {parts}); "
                f"pad it to {padded} or choose another layout/world size"
            )


@dataclass(frozen=True)
class ShardLayout:
    """The token positions of one rank's shard, for one layout and document split.

    ``doc_lengths`` are *global* document lengths (each divisible by the chunk count).
    """

    doc_lengths: tuple[int, ...]
    world_size: int
    rank: int
    layout: str

    @property
    def chunk_lengths(self) -> tuple[int, ...]:
        """Per document, the length of one chunk (``L / P`` or ``L / 2P``)."""
        parts = self.world_size * chunks_per_rank(self.layout)
        return tuple(length // parts for length in self.doc_lengths)

    @property
    def local_length(self) -> int:
        return sum(self.chunk_lengths) * chunks_per_rank(self.layout)

    def chunk_ids(self, rank: int | None = None) -> tuple[int, ...]:
        r = self.rank if rank is None else rank
        return (r,) if self.layout == "contiguous" else (r, 2 * self.world_size - 1 - r)

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """Global positions ``[local_length]`` (int64) of this rank's tokens, in local order."""
        return self.positions_of(self.rank)

    def positions_of(self, rank: int) -> torch.Tensor:
        pieces = []
        start = 0
        for length, chunk in zip(self.doc_lengths, self.chunk_lengths):
            for cid in self.chunk_ids(rank):
                pieces.append(torch.arange(start + cid * chunk, start + (cid + 1) * chunk))
            start += length
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)

    @functools.cached_property
    def all_positions(self) -> torch.Tensor:
        """Global positions of every rank's shard, rank-major: ``[world_size * local_length]``."""
        return torch.cat([self.positions_of(r) for r in range(self.world_size)])

    @functools.cached_property
    def natural_order(self) -> torch.Tensor:
        """Indices into :attr:`all_positions` that sort it: every rank's shard concatenated
        rank-major -> natural token order (``all_positions`` itself maps back)."""
        return torch.argsort(self.all_positions)

    def global_cu_seqlens(self) -> torch.Tensor:
        """int32 cumulative boundaries of the global documents."""
        return cu_seqlens(self.doc_lengths)

    def local_cu_seqlens(self) -> torch.Tensor:
        """int32 cumulative boundaries of the documents inside the local shard."""
        lengths = [c * chunks_per_rank(self.layout) for c in self.chunk_lengths]
        return cu_seqlens(lengths)

    def half_cu_seqlens(self) -> torch.Tensor:
        """int32 cumulative boundaries of one chunk per document (a zigzag half shard)."""
        return cu_seqlens(self.chunk_lengths)

    def piece_cu_seqlens(self) -> torch.Tensor:
        """int32 cumulative boundaries of every local chunk (a piece) of every document."""
        return cu_seqlens([c for c in self.chunk_lengths for _ in self.chunk_ids()])

    @functools.cached_property
    def front_index(self) -> torch.Tensor:
        """Local indices of the first chunk of every document (zigzag: chunk ``r``)."""
        return self._half_index(0)

    @functools.cached_property
    def back_index(self) -> torch.Tensor:
        """Local indices of the second chunk of every document (zigzag: chunk ``2P-1-r``)."""
        return self._half_index(1)

    def _half_index(self, which: int) -> torch.Tensor:
        pieces, start = [], 0
        for chunk in self.chunk_lengths:
            pieces.append(torch.arange(start + which * chunk, start + (which + 1) * chunk))
            start += 2 * chunk
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


@functools.lru_cache(maxsize=1024)
def shard_tensor(shard: ShardLayout, name: str, device: torch.device) -> torch.Tensor:
    """``shard``'s index or boundary tensor ``name`` (a property, or a method without
    arguments) on ``device``, copied once per shard and device: a host-to-device copy per
    layer would stall a GPU's stream once per layer. Shared: never modify it in place."""
    value = getattr(shard, name)
    return (value() if callable(value) else value).to(device)


@functools.lru_cache(maxsize=256)
def shard_layout(
    doc_lengths: tuple[int, ...], world_size: int, rank: int, layout: str
) -> ShardLayout:
    """Cached :class:`ShardLayout` (index tensors are built once per shape)."""
    check_layout(layout)
    return ShardLayout(doc_lengths, world_size, rank, layout)
