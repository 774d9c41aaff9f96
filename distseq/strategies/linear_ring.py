"""``ring`` (linear attention): LASP-1's sequential state passing, the baseline.

Rank ``r`` waits for the whole state entering its pieces from the previous rank of the chain,
adds its memory and sends the whole state on; the ranks run one after the other. Works with
both layouts (zigzag walks the chain ``0 → P-1`` then back ``P-1 → 0``).

Bytes: :func:`~distseq.strategies.state_chain.chain_traffic`.
"""

from __future__ import annotations

from distseq.strategies.linear_base import LinearStrategy, register_linear_strategy
from distseq.strategies.state_chain import ChainScan, chain_traffic


@register_linear_strategy
class LinearRing(LinearStrategy):
    name = "ring"
    traffic = staticmethod(chain_traffic)

    def scan(self, states, transitions, start, ctx, *, reverse, need_end):
        return ChainScan(states, transitions, start, ctx, reverse, need_end, blocks=1)
