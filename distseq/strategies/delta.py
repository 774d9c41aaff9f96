"""The delta-rule strategies: ``lasp2``, ``allscan`` and ``ring`` with a matrix transition.

Each is its linear-attention namesake (same exchange, same layouts); the scan carries the
piece's ``A`` ``[H, Dk, Dk]`` instead of a decay factor (see
:mod:`distseq.strategies.delta_base`). Only ``lasp2``'s bytes change: it gathers ``A`` with
every state. The point-to-point chains move states only (each rank applies its own ``A``), so
their bytes are the linear ones.
"""

from __future__ import annotations

from distseq.strategies.allscan import AllScan
from distseq.strategies.delta_base import register_delta_strategy
from distseq.strategies.lasp2 import Lasp2, gathered_traffic
from distseq.strategies.linear_ring import LinearRing
from distseq.traffic import Traffic


@register_delta_strategy
class DeltaLasp2(Lasp2):
    def traffic(self, p, docs, heads, dk, dv, layout) -> Traffic:
        """Each pass ``(P-1)·n·H·(Dk²+Dk·Dv)·4``: every piece's float32 transition ``A`` and
        state, ``n`` = documents (twice that with zigzag)."""
        return gathered_traffic(p, docs, layout, heads * (dk * dk + dk * dv))


@register_delta_strategy
class DeltaAllScan(AllScan):
    """All-Scan of ``(A, M)``: each rank applies its own ``A`` to the arriving Dv blocks."""


@register_delta_strategy
class DeltaRing(LinearRing):
    """LASP-1's sequential state passing with each rank's ``A``: the baseline."""
