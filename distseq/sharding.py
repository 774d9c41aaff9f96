"""Moving whole sequences to per-rank shards and back, in any layout."""

from __future__ import annotations

import torch

from distseq.comm import GroupInfo, ProcessGroup, all_gather_async, reduce_scatter, resolve_group
from distseq.layout import ShardLayout, check_divisible, doc_lengths, shard_layout
from distseq.validation import check_cu_seqlens


def _normalize_dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def _layout_for(info: GroupInfo, layout: str, cu_seqlens, total: int) -> ShardLayout:
    if cu_seqlens is None:
        check_divisible([total], info.world_size, layout, "sequence")
    else:
        if total % info.world_size:
            raise ValueError(
                f"sequence length {total} is not divisible by the group size {info.world_size}"
            )
        check_cu_seqlens(cu_seqlens, 1, total // info.world_size, info.world_size, layout)
    return shard_layout(doc_lengths(cu_seqlens, total), info.world_size, info.rank, layout)


def shard_sequence(
    x: torch.Tensor,
    *,
    group: ProcessGroup | None = None,
    dim: int = 1,
    layout: str = "zigzag",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's shard of the full tensor ``x`` along ``dim`` (no communication).

    ``x`` ``[..., S, ...]`` with ``S`` at ``dim``; returns ``[..., S / P, ...]`` holding the
    positions :class:`distseq.layout.ShardLayout` assigns to this rank, in local order.
    """
    info = resolve_group(group)
    dim = _normalize_dim(x, dim)
    shard = _layout_for(info, layout, cu_seqlens, x.shape[dim])
    if layout == "contiguous" and cu_seqlens is None:
        return x.narrow(dim, info.rank * shard.local_length, shard.local_length)
    return x.index_select(dim, shard.positions.to(x.device))


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(fctx, x, dim: int, info: GroupInfo, shard: ShardLayout):
        fctx.dim, fctx.info, fctx.shard = dim, info, shard
        gathered, work = all_gather_async(x.movedim(dim, 0), info)
        if work is not None:
            work.wait()
        rank_major = gathered.flatten(0, 1)  # every rank's shard, in rank order
        full = torch.empty_like(rank_major)
        full.index_copy_(0, shard.all_positions.to(x.device), rank_major)
        return full.movedim(0, dim)

    @staticmethod
    def backward(fctx, grad):
        positions = fctx.shard.all_positions.to(grad.device)
        rank_major = grad.movedim(fctx.dim, 0).index_select(0, positions)
        stacked = rank_major.unflatten(0, (fctx.info.world_size, -1))
        return reduce_scatter(stacked, fctx.info).movedim(0, fctx.dim), None, None, None


def gather_sequence(
    x: torch.Tensor,
    *,
    group: ProcessGroup | None = None,
    dim: int = 1,
    layout: str = "zigzag",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: every rank gets the full tensor ``[..., S, ...]``.

    Differentiable; like ``torch.distributed.nn.functional.all_gather`` the backward sums the
    gradient over ranks (reduce-scatter), which is right when the total loss is the sum of the
    ranks' losses. If every rank computes the same loss from the gathered tensor, divide by
    the group size.
    """
    info = resolve_group(group)
    dim = _normalize_dim(x, dim)
    shard = _layout_for(info, layout, cu_seqlens, x.shape[dim] * info.world_size)
    return _GatherSequence.apply(x, dim, info, shard)
