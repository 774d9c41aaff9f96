"""``allgather``: gather every rank's K/V once, then attend locally (as in LASP-2H / Llama 3).

Forward posts one all-gather of the packed K/V and computes the block against the local K/V
while it is in flight; then the blocks against the other ranks' K/V (the same causal plan as
the ring, so masked blocks are skipped). Backward gathers K/V again rather than keeping ``P``
shards alive between forward and backward, and reduce-scatters the float32 dK/dV.
Bytes: :meth:`AllGatherAttention.traffic`.
"""

from __future__ import annotations

import torch

from distseq.comm import all_gather_async, reduce_scatter
from distseq.strategies.base import AttentionContext, AttentionStrategy, register_attention_strategy
from distseq.strategies.blocks import BlockPlanner, block_backward, block_forward, new_accumulators
from distseq.traffic import Traffic


def _other_ranks(ctx: AttentionContext) -> list[int]:
    return [r for r in range(ctx.info.world_size) if r != ctx.info.rank]


@register_attention_strategy
class AllGatherAttention(AttentionStrategy):
    name = "allgather"

    def traffic(self, p, s_local, q_heads, kv_heads, head_dim, elem) -> Traffic:
        """Forward ``(P-1)·2n·e``; backward ``(P-1)·2n·(e+4)`` (K/V gathered again, float32
        dK/dV reduce-scattered), ``n = S_local·Hkv·D``."""
        kv = 2 * s_local * kv_heads * head_dim
        return Traffic((p - 1) * kv * elem, (p - 1) * kv * (elem + 4))

    def forward(self, q, k, v, ctx: AttentionContext):
        planner = BlockPlanner(ctx, q.shape[1], q.device)
        gathered, work = all_gather_async(torch.stack([k, v]), ctx.info)
        out, lse = new_accumulators(q)
        block_forward(ctx, planner.block(ctx.info.rank), q, k, v, out, lse)
        if work is not None:
            work.wait()
        for source in _other_ranks(ctx):
            block = planner.block(source)
            if block is not None:
                block_forward(ctx, block, q, *gathered[source], out, lse)
        out = out.to(q.dtype)
        return out, (q, k, v, out, lse)

    def backward(self, dout, saved, ctx: AttentionContext):
        q, k, v, out, lse = saved
        planner = BlockPlanner(ctx, q.shape[1], q.device)
        gathered, work = all_gather_async(torch.stack([k, v]), ctx.info)
        dq = torch.zeros_like(q, dtype=lse.dtype)
        dkv = torch.zeros(gathered.shape, dtype=lse.dtype, device=q.device)
        rank = ctx.info.rank
        block_backward(ctx, planner.block(rank), dout, q, k, v, out, lse, dq, *dkv[rank])
        if work is not None:
            work.wait()
        for source in _other_ranks(ctx):
            block = planner.block(source)
            if block is not None:
                block_backward(ctx, block, dout, q, *gathered[source], out, lse, dq, *dkv[source])
        dk, dv = reduce_scatter(dkv, ctx.info)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
