"""The unit every strategy states its communication in: :class:`Traffic`.

Each strategy's ``traffic(...)`` method (next to the code that sends) is the one formula for
the bytes it moves; :mod:`distseq.planner.cost`, the benchmarks and the tests all call it.
Bytes are counted as :class:`distseq.comm.CommCounter` counts them: the most any rank sends
(received bytes are the same), a collective counting what a bandwidth-optimal algorithm puts
on the rank's wire.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Traffic:
    """The most bytes a rank sends in the forward, in the backward, and in both together
    (``both``; default ``forward + backward``, less when no rank sends in both passes)."""

    forward: float
    backward: float
    both: float | None = None

    @property
    def total(self) -> float:
        return self.forward + self.backward if self.both is None else self.both
