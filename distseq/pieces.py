"""Where the pieces of every document live, for ops whose state flows along the sequence.

A *piece* is one layout chunk of one document (or batch row): ``P`` per document under
``contiguous``, ``2P`` under ``zigzag``. Locally, segment ``n * slots + slot`` is slot ``slot``
(``0``, or ``1`` for zigzag's second chunk) of document ``n``; the *kernel view* of a shard
makes each local piece its own batch row (or ``cu_seqlens`` segment), so local kernels never
see two pieces as one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from distseq.comm import GroupInfo
from distseq.layout import ShardLayout, chunks_per_rank, shard_tensor


@dataclass(frozen=True)
class Pieces:
    info: GroupInfo
    shard: ShardLayout
    varlen: bool
    batch: int

    @property
    def slots(self) -> int:
        return chunks_per_rank(self.shard.layout)

    @property
    def docs(self) -> int:
        return len(self.shard.doc_lengths) if self.varlen else self.batch

    def order(self, reverse: bool = False) -> list[tuple[int, int]]:
        """``(rank, slot)`` holding each piece of a document, in sequence (or reverse) order."""
        p = self.info.world_size
        pieces = [(r, 0) for r in range(p)]
        if self.slots == 2:
            pieces += [(r, 1) for r in reversed(range(p))]
        return pieces[::-1] if reverse else pieces

    def to_kernel(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """``[B, S_local, ...]`` -> the kernel view: zigzag rows split into their two chunks."""
        if x is None or self.varlen or self.slots == 1:
            return x
        return x.reshape(x.shape[0] * 2, x.shape[1] // 2, *x.shape[2:])

    def from_kernel(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Inverse of :meth:`to_kernel`."""
        if x is None or self.varlen or self.slots == 1:
            return x
        return x.reshape(self.batch, -1, *x.shape[2:])

    def kernel_bounds(self) -> tuple[int, ...] | None:
        """Host-side boundaries of the local segments in the kernel view (``None``: whole rows),
        :meth:`kernel_cu_seqlens` without reading the device."""
        if not self.varlen:
            return None
        lengths = [c for c in self.shard.chunk_lengths for _ in range(self.slots)]
        return tuple(itertools.accumulate(lengths, initial=0))

    def kernel_cu_seqlens(self, device: torch.device) -> torch.Tensor | None:
        """:meth:`kernel_bounds` as an int32 tensor on ``device`` (copied once per shard)."""
        return shard_tensor(self.shard, "piece_cu_seqlens", device) if self.varlen else None
