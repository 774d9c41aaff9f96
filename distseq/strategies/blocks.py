"""Which part of the local queries attends to which part of another rank's K/V, and how.

Ring and all-gather both compute attention as one block per (query rank, K/V rank) pair and
merge the blocks by log-sum-exp; this module decides each block's rows and mask, so both
strategies skip exactly the blocks causality rules out.

For a zigzag shard (rank ``r`` holds chunks ``r`` and ``2P-1-r`` of every document), against
K/V of rank ``j``: ``j == r`` is causal over the whole shard; ``j < r`` lets every query see
the front chunk of ``j`` (chunk ``j`` precedes both local chunks, chunk ``2P-1-j`` follows
both); ``j > r`` lets only the back chunk of the queries see all of ``j``. Both off-diagonal
cases are half a shard-by-shard block, so every rank does the same work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distseq.kernels.common import accumulator_dtype, no_key_result
from distseq.kernels.merge import merge_into
from distseq.layout import chunks_per_rank, shard_tensor
from distseq.strategies.base import AttentionContext

Rows = slice | torch.Tensor


@dataclass(frozen=True)
class Block:
    """Local query rows ``q_rows`` attend to K/V rows ``k_rows`` of the source rank."""

    q_rows: Rows
    k_rows: Rows
    causal: bool
    cu_seqlens_q: torch.Tensor | None
    cu_seqlens_k: torch.Tensor | None
    # The longest q / k segment, known on the host (kernels need them; reading them from the
    # device tensors would be a host sync per block).
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None


class BlockPlanner:
    """Plans the block of (this rank's queries, rank ``source``'s K/V)."""

    def __init__(self, ctx: AttentionContext, seq_local: int, device: torch.device) -> None:
        self.ctx = ctx
        shard = ctx.shard
        self.all = slice(0, seq_local)
        self.cu_all = shard_tensor(shard, "local_cu_seqlens", device) if ctx.varlen else None
        # The longest local chunk and document (host ints, so the kernels need no sync).
        self.max_half = max(shard.chunk_lengths) if ctx.varlen else None
        self.max_all = self.max_half * chunks_per_rank(shard.layout) if ctx.varlen else None
        if shard.layout == "zigzag":
            if ctx.varlen:
                self.front = shard_tensor(shard, "front_index", device)
                self.back = shard_tensor(shard, "back_index", device)
                self.cu_half = shard_tensor(shard, "half_cu_seqlens", device)
            else:
                half = seq_local // 2
                self.front, self.back, self.cu_half = slice(0, half), slice(half, None), None

    def block(self, source: int) -> Block | None:
        rank, ctx = self.ctx.info.rank, self.ctx
        whole, half = self.max_all, self.max_half
        if not ctx.causal or source == rank:
            return Block(self.all, self.all, ctx.causal, self.cu_all, self.cu_all, whole, whole)
        if ctx.shard.layout == "contiguous":
            if source > rank:  # a later rank's keys are all in the future
                return None
            return Block(self.all, self.all, False, self.cu_all, self.cu_all, whole, whole)
        if source < rank:
            return Block(self.all, self.front, False, self.cu_all, self.cu_half, whole, half)
        return Block(self.back, self.all, False, self.cu_half, self.cu_all, half, whole)


def take(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Rows of ``x`` ``[B, S, ...]`` along the sequence dim."""
    return x[:, rows] if isinstance(rows, slice) else x.index_select(1, rows)


def take_lse(lse: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Rows of ``lse`` ``[B, H, S]``."""
    return lse[:, :, rows] if isinstance(rows, slice) else lse.index_select(2, rows)


def merge_rows(
    out: torch.Tensor,
    lse: torch.Tensor,
    rows: Rows,
    block_out: torch.Tensor,
    block_lse: torch.Tensor,
) -> None:
    """Merge a block's result for ``rows`` into the accumulators ``out``/``lse`` in place."""
    if isinstance(rows, slice):
        merge_into(out[:, rows], lse[:, :, rows], block_out, block_lse)
        return
    part_out, part_lse = take(out, rows), take_lse(lse, rows)
    merge_into(part_out, part_lse, block_out, block_lse)
    out.index_copy_(1, rows, part_out)
    lse.index_copy_(2, rows, part_lse)


def add_rows(acc: torch.Tensor, rows: Rows, grad: torch.Tensor) -> None:
    """``acc[:, rows] += grad`` for a slice or an index tensor."""
    if isinstance(rows, slice):
        acc[:, rows] += grad
    else:
        acc.index_add_(1, rows, grad.to(acc.dtype))


def block_forward(
    ctx: AttentionContext,
    block: Block,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """Compute ``block`` of ``q`` against this K/V and merge it into ``out``/``lse``."""
    block_out, block_lse = ctx.kernel.forward(
        take(q, block.q_rows),
        take(k, block.k_rows),
        take(v, block.k_rows),
        scale=ctx.scale,
        causal=block.causal,
        cu_seqlens_q=block.cu_seqlens_q,
        cu_seqlens_k=block.cu_seqlens_k,
        max_seqlen_q=block.max_seqlen_q,
        max_seqlen_k=block.max_seqlen_k,
    )
    merge_rows(out, lse, block.q_rows, block_out, block_lse)


def block_backward(
    ctx: AttentionContext,
    block: Block,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """Accumulate ``block``'s gradients into ``dq`` (local rows) and ``dk``/``dv`` (source rows)."""
    rows = block.q_rows
    block_dq, block_dk, block_dv = ctx.kernel.backward(
        take(dout, rows),
        take(q, rows),
        take(k, block.k_rows),
        take(v, block.k_rows),
        take(out, rows),
        take_lse(lse, rows),
        scale=ctx.scale,
        causal=block.causal,
        cu_seqlens_q=block.cu_seqlens_q,
        cu_seqlens_k=block.cu_seqlens_k,
        max_seqlen_q=block.max_seqlen_q,
        max_seqlen_k=block.max_seqlen_k,
    )
    add_rows(dq, rows, block_dq)
    add_rows(dk, block.k_rows, block_dk)
    add_rows(dv, block.k_rows, block_dv)


def new_accumulators(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty merge accumulators for ``q`` ``[B, S, H, D]``: ``out`` zeros, ``lse`` ``-inf``.

    Float32 (float64 for float64 inputs), so merge errors don't grow with the block count.
    """
    return no_key_result(q, out_dtype=accumulator_dtype(q.dtype))
