"""Kinds no plan needs: a group kind is *dominated* when another kind of the same degree is at
least as fast for every load and needs no more memory, so any plan (and any relaxation's
solution) using it can switch to the other at no cost. Dropping dominated kinds therefore keeps
every optimum, the heuristic's choices (it takes the fastest kind) and the LP bound valid, while
the LP and the split MILP shrink with the number of kinds.

The time check is exact, not sampled. A kind's time ``f(A, Q) = Σ_p max_j (a·A + q·Q + c)``
is, in ``y = (A, Q, 1)``, a sum of maxima of linear forms, positively homogeneous in ``y``; so
``f_a <= f_b`` for all ``A, Q >= 0`` iff it holds on the simplex ``y >= 0, Σ y = 1``. ``f_a``
is the maximum of the linear forms ``L_σ`` (one piece per phase), and each ``f_b - L_σ`` is
convex and linear between ``f_b``'s breakpoint lines (where two pieces of one phase are
equal), so its minimum over the simplex lies at a vertex of that arrangement: a corner of the
simplex, a breakpoint line meeting an edge, or two lines crossing. Checking ``f_a <= f_b`` at
those few points is therefore a proof.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # cost.py imports this module
    from distseq.planner.cost import GroupCost

# Relative slack of the time comparison, for floating-point rounding of the vertices: a kind
# kept in place of a dominated one is at most this much slower anywhere (the LP bound already
# shaves 1e-7 off its value).
RTOL = 1e-9


def _pieces(kind: GroupCost) -> list[np.ndarray]:
    """Per phase, its distinct pieces as rows ``(a, q, c)`` (padding repeats a piece)."""
    return [np.unique(phase, axis=0) for phase in kind.phases]


def _time(pieces: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    """``Σ_p max_j piece·y`` for points ``y`` (m, 3)."""
    return sum((y @ p.T).max(axis=1) for p in pieces)


def _vertices(pieces: list[np.ndarray]) -> np.ndarray:
    """Points (m, 3) of the simplex holding every vertex of the arrangement of the breakpoint
    lines of the kind with these ``pieces``."""
    eye = np.eye(3)
    points = [eye]
    normals = [p[j] - p[k] for p in pieces for j, k in itertools.combinations(range(len(p)), 2)]
    for n in normals:
        for i, j in itertools.combinations(range(3), 2):
            if n[i] != n[j] and n[i] * n[j] <= 0:  # the line crosses the edge e_i–e_j
                t = n[j] / (n[j] - n[i])
                points.append((t * eye[i] + (1 - t) * eye[j])[None])
    for n1, n2 in itertools.combinations(normals, 2):
        y = np.cross(n1, n2)
        if y.sum() != 0:
            y = y / y.sum()
            if np.all(y >= 0):
                points.append(y[None])
    return np.concatenate(points)


def dominates(a: GroupCost, b: GroupCost) -> bool:
    """``a`` is at least as fast as ``b`` for every load (up to :data:`RTOL`) and needs no more
    memory (both of one degree, so padded loads agree)."""
    if a.degree != b.degree:
        raise ValueError(f"kinds of degrees {a.degree} and {b.degree}; compare one degree")
    if a.static_bytes > b.static_bytes or a.bytes_per_token > b.bytes_per_token:
        return False
    pa, pb = _pieces(a), _pieces(b)
    y = _vertices(pb)
    ta, tb = _time(pa, y), _time(pb, y)
    return bool(np.all(ta <= tb * (1 + RTOL)))


def undominated(kinds: list[GroupCost]) -> list[GroupCost]:
    """``kinds`` (one degree) without the dominated ones, order kept; of kinds that dominate
    each other (equal), the first stays. Dominance is transitive, so what one dropped kind
    dominates, the kind that dropped it dominates too."""
    n = len(kinds)
    dom = [[i != j and dominates(kinds[i], kinds[j]) for j in range(n)] for i in range(n)]
    return [
        kinds[j]
        for j in range(n)
        if not any(dom[i][j] and (not dom[j][i] or i < j) for i in range(n))
    ]
