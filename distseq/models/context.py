"""What a decoder needs to know about the sequence sharding of one packed batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distseq.comm import ProcessGroup, resolve_group
from distseq.layout import ShardLayout, cu_seqlens, shard_layout


def document_positions(shard: ShardLayout) -> torch.Tensor:
    """Position of each of the shard's tokens inside its own document, ``[S_local]`` int64."""
    starts = cu_seqlens(shard.doc_lengths).long()  # searchsorted wants positions' dtype
    doc = torch.searchsorted(starts[1:], shard.positions, right=True)
    return shard.positions - starts[doc]


@dataclass(frozen=True)
class SequenceContext:
    """One packed sequence (batch 1) sharded over ``group`` in ``layout``.

    ``cu_seqlens`` are the *global* int32 document boundaries; ``positions`` ``[S_local]``
    are each local token's position inside its own document (RoPE restarts per document),
    derived from :class:`distseq.layout.ShardLayout` so they follow the sharding layout.
    ``attention_backend`` / ``linear_backend`` name the local kernels of the softmax / linear
    layers (``distseq.kernels.BACKENDS`` / ``LINEAR_BACKENDS``, or ``"auto"``).
    ``ulysses_degree``: the Ulysses group size when ``attention_strategy`` is ``"usp"``.
    """

    group: ProcessGroup | None
    layout: str
    shard: ShardLayout
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    attention_strategy: str = "ring"
    linear_strategy: str = "lasp2"
    attention_backend: str = "auto"
    linear_backend: str = "auto"
    ulysses_degree: int | None = None

    @classmethod
    def build(
        cls,
        doc_lengths: Sequence[int],
        *,
        group: ProcessGroup | None = None,
        layout: str = "zigzag",
        attention_strategy: str = "ring",
        linear_strategy: str = "lasp2",
        attention_backend: str = "auto",
        linear_backend: str = "auto",
        ulysses_degree: int | None = None,
    ) -> SequenceContext:
        info = resolve_group(group)
        shard = shard_layout(tuple(int(n) for n in doc_lengths), info.world_size, info.rank, layout)
        return cls(
            group=group,
            layout=layout,
            shard=shard,
            cu_seqlens=cu_seqlens(shard.doc_lengths),
            positions=document_positions(shard),
            attention_strategy=attention_strategy,
            linear_strategy=linear_strategy,
            attention_backend=attention_backend,
            linear_backend=linear_backend,
            ulysses_degree=ulysses_degree,
        )

    def shard_tokens(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard ``[B, S_local, ...]`` of a full packed tensor ``[B, S, ...]``."""
        return full.index_select(1, self.shard.positions.to(full.device))
