"""``ring``: pass-KV ring attention with log-sum-exp merging (zigzag balances causal work).

Forward: at each of the ``P`` steps the rank posts the send of the K/V it holds to the next
rank and the receive of the previous rank's, computes its block against the K/V in hand while
they travel, and merges the block into float32 accumulators.
Backward: K/V rotate again (blocks are recomputed from the saved ``out``/``lse``), and float32
dK/dV accumulators travel one step behind the K/V they belong to: each starts on the first rank
after its home (the home rank keeps its own block's gradient) and arrives home after ``P - 1``
hops, the byte minimum (a ring of ``P`` ranks cannot bring ``P - 1`` partial sums home in fewer).
Bytes: :meth:`RingAttention.traffic`.
"""

from __future__ import annotations

import torch

from distseq.comm import RingExchange
from distseq.strategies.base import AttentionContext, AttentionStrategy, register_attention_strategy
from distseq.strategies.blocks import BlockPlanner, block_backward, block_forward, new_accumulators
from distseq.traffic import Traffic


@register_attention_strategy
class RingAttention(AttentionStrategy):
    name = "ring"

    def traffic(self, p, s_local, q_heads, kv_heads, head_dim, elem) -> Traffic:
        """Forward ``(P-1)·2n·e``; backward ``(P-1)·2n·(e+4)`` (K/V again, and float32 dK/dV
        that travel ``P-1`` hops home), ``n = S_local·Hkv·D``."""
        kv = 2 * s_local * kv_heads * head_dim
        return Traffic((p - 1) * kv * elem, (p - 1) * kv * (elem + 4))

    def forward(self, q, k, v, ctx: AttentionContext):
        info = ctx.info
        planner = BlockPlanner(ctx, q.shape[1], q.device)
        ring = RingExchange(info)
        out, lse = new_accumulators(q)
        kv = [k, v]
        for step in range(info.world_size):
            last = step == info.world_size - 1
            if not last:
                ring.post(kv)
            block = planner.block((info.rank - step) % info.world_size)
            if block is not None:
                block_forward(ctx, block, q, *kv, out, lse)
            if not last:
                kv = ring.wait()
        out = out.to(q.dtype)
        return out, (q, k, v, out, lse)

    def backward(self, dout, saved, ctx: AttentionContext):
        q, k, v, out, lse = saved
        info = ctx.info
        planner = BlockPlanner(ctx, q.shape[1], q.device)
        kv_ring, grad_ring = RingExchange(info, tag=0), RingExchange(info, tag=1)
        dq = torch.zeros_like(q, dtype=lse.dtype)
        kv = [k, v]
        for step in range(info.world_size):
            last = step == info.world_size - 1
            if not last:
                kv_ring.post(kv)
            block_dkv = [torch.zeros_like(k, dtype=lse.dtype), torch.zeros_like(v, dtype=lse.dtype)]
            block = planner.block((info.rank - step) % info.world_size)
            if block is not None:
                block_backward(ctx, block, dout, q, *kv, out, lse, dq, *block_dkv)
            if step == 0:
                own = block_dkv  # stays home until the others' sums arrive
            else:
                dkv = block_dkv
                if step > 1:
                    # The previous rank's sum for the K/V in hand travelled here meanwhile.
                    dkv = grad_ring.wait()
                    dkv[0] += block_dkv[0]
                    dkv[1] += block_dkv[1]
                grad_ring.post(dkv)  # after the last step this hop brings it home
            if not last:
                kv = kv_ring.wait()
        if info.world_size > 1:
            others = grad_ring.wait()
            own = [own[0] + others[0], own[1] + others[1]]
        return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype)
