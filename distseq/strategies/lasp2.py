"""``lasp2``: one all-gather of every piece's memory state, then a local prefix combine.

As in LASP-2, each rank packs its pieces' memories ``M`` (float32 ``[H, Dk, Dv]``) and
transitions (total decay factors; the delta rule's ``[H, Dk, Dk]`` matrices) into one buffer
and all-gathers it, posted before the local chunked kernel runs so
the gather overlaps the intra-chunk work; every rank then replays the scan over all ``P`` (or
``2P``, zigzag) pieces locally, so it also has the final state without further traffic.
Backward gathers the outputs' state gradients the same way and scans them in reverse. Works
with both layouts.

Bytes (:meth:`Lasp2.traffic`) are independent of the sequence length and grow with ``P``
(plus, with ``output_final_state``, an all-reduce of the final state's gradient).
"""

from __future__ import annotations

import torch

from distseq.comm import all_gather_async
from distseq.layout import chunks_per_rank
from distseq.pieces import Pieces
from distseq.strategies.linear_base import LinearStrategy, register_linear_strategy
from distseq.strategies.transition import combine
from distseq.traffic import Traffic


def gathered_traffic(p: int, docs: int, layout: str, floats_per_piece: int) -> Traffic:
    """Each pass ``(P-1)`` times every local piece's float32 payload (all-gather)."""
    per_pass = (p - 1) * docs * chunks_per_rank(layout) * floats_per_piece * 4
    return Traffic(per_pass, per_pass)


class GatheredScan:
    """The all-gather scan of :meth:`LinearStrategy.scan` (any transition shape)."""

    def __init__(self, states, transitions, start, ctx: Pieces, reverse, need_end):
        self.shape, self.transition_shape, self.ctx = states.shape, transitions.shape, ctx
        self.start, self.reverse, self.need_end = start, reverse, need_end
        payload = torch.cat([states.flatten(1), transitions.flatten(1)], dim=1)
        self.gathered, self.work = all_gather_async(payload, ctx.info)

    def wait(self):
        if self.work is not None:
            self.work.wait()
        ctx = self.ctx
        per_rank = self.gathered.view(ctx.info.world_size, ctx.docs, ctx.slots, -1)
        split = self.shape[1:].numel()
        states = per_rank[..., :split].unflatten(-1, self.shape[1:])
        transitions = per_rank[..., split:].unflatten(-1, self.transition_shape[1:])
        state = self.start
        if state is None:
            state = states.new_zeros(ctx.docs, *self.shape[1:])
        incoming = states.new_empty(ctx.docs, ctx.slots, *self.shape[1:])
        for rank, slot in ctx.order(self.reverse):
            if rank == ctx.info.rank:
                incoming[:, slot] = state
            state = combine(transitions[rank, :, slot], state, states[rank, :, slot])
        return incoming.flatten(0, 1), state if self.need_end else None


@register_linear_strategy
class Lasp2(LinearStrategy):
    name = "lasp2"

    def traffic(self, p, docs, heads, dk, dv, layout) -> Traffic:
        """Each pass ``(P-1)·n·H·(Dk·Dv+1)·4``: every piece's float32 state and log decays,
        ``n`` = documents (twice that with zigzag)."""
        return gathered_traffic(p, docs, layout, heads * (dk * dv + 1))

    def scan(self, states, transitions, start, ctx, *, reverse, need_end):
        return GatheredScan(states, transitions, start, ctx, reverse, need_end)
