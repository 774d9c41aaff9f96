"""The per-piece transition of a state scan: a scalar factor per head, or a matrix.

Scalar-decay linear attention moves a state across a piece as ``S_out = exp(G) S_in + M``;
the delta rule as ``S_out = A S_in + M`` with ``A`` ``[Dk, Dk]``. The scans of
:mod:`~distseq.strategies.lasp2` and :mod:`~distseq.strategies.state_chain` take either, as a
tensor ``[..., H, 1, 1]`` (factors) or ``[..., H, Dk, Dk]`` (matrices). Both act on the left of
``S`` ``[Dk, Dv]``, so the columns of ``S`` (its ``Dv`` axis) never mix: a scan may cut the
state into column blocks and combine each on its own.
"""

from __future__ import annotations

import torch


def combine(transition: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``T x + y`` for states ``x``, ``y`` ``[..., H, Dk, Dv']`` (any column block ``Dv'``).

    ``transition`` ``[..., H, 1, 1]`` scales; ``[..., H, Dk, Dk]`` multiplies (for ``Dk = 1``
    the two agree).
    """
    if transition.shape[-1] == 1:
        return transition * x + y
    return transition @ x + y
