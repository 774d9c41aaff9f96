"""``allscan``: ZeCO's All-Scan — the state travels rank to rank once, pipelined in blocks.

Rank ``r`` receives the state entering its chunk from ``r - 1`` in ``K`` column slices (``Dv``),
combines slice ``j`` with its own memory and forwards it to ``r + 1`` while slice ``j + 1`` is
still arriving, so the chain's latency is about ``P + K - 1`` slice transfers instead of ``P``
whole states, and each rank sends and receives one state's bytes in total, independent of
``P``. Backward runs the reverse scan of the state gradients (``r + 1 → r``). Contiguous
layout only (zigzag would need the chain twice).

Bytes: :func:`~distseq.strategies.state_chain.chain_traffic` (plus, with
``output_final_state``, a broadcast of the final state and an all-reduce of its gradient).
"""

from __future__ import annotations

from distseq.strategies.linear_base import LinearStrategy, register_linear_strategy
from distseq.strategies.state_chain import ChainScan, chain_traffic

BLOCKS = 4  # pipeline depth K (capped at Dv)


@register_linear_strategy
class AllScan(LinearStrategy):
    name = "allscan"
    layouts = ("contiguous",)  # the scan walks ranks 0 -> P-1 once: one segment per rank
    traffic = staticmethod(chain_traffic)

    def scan(self, states, transitions, start, ctx, *, reverse, need_end):
        return ChainScan(states, transitions, start, ctx, reverse, need_end, blocks=BLOCKS)
