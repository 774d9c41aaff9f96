"""A lower bound on any plan's step time that includes communication: an LP relaxation of the
planner's own model, solved with HiGHS (``scipy.optimize.milp`` without integer variables).

Valid for every plan of the batch, whatever its micro-steps. Variables, per *kind* ``k``
(a degree ``d_k`` and one strategy per layer type): ``z_ik`` (how many of unit ``i`` run in
groups of kind ``k``), ``n_k`` (how many groups of kind ``k`` the plan opens over all its
micro-steps, continuous), ``w_kp`` (the time of phase ``p`` of all those groups pooled) and
``T`` (the step time). Each row is implied by every plan:

- every unit runs somewhere: ``Σ_k z_ik = m_i`` (only on kinds whose memory holds it alone);
- pooling: the groups of one kind together take ``Σ_p max_j (a·ΣA + q·ΣQ + c·n_k)`` or more,
  because a sum of maxima is at least the maximum of sums (``w_kp >=`` every piece);
- rank-time: each micro-step's groups use at most ``W`` ranks for at most its makespan, so
  ``Σ_k d_k Σ_p w_kp <= W·T`` (communication included: a piece is compute *or* messages);
- memory: a group holds at most ``capacity_k`` padded tokens, so ``n_k >= Σ_i z_ik A_i /
  capacity_k``; and a kind that runs a sequence opens a group: ``n_k >= z_ik``;
- a sequence's group takes at least its time alone: ``T >= Σ_k t_k(i)·z_ik`` (one term is 1
  in a plan).

Units: the ``exact`` longest sequences one by one; the rest grouped by their length rounded
*down* to a geometric grid (ratio ``1 + grid``), with multiplicity ``m_i``. Rounding down only
lowers every cost (all coefficients are non-negative and padding is monotone), and identical
units split evenly at an optimum, so the bound stays valid.

What the relaxation gives away: a long sequence may run partly on a large (fast, costly) group
and partly on a small one, paying the blend of both; and the makespan sees groups only through
their pooled rank-time, not each group's own time (a group of 8 that runs 3 sequences of 1 s
each is 3 s long in any plan; here it spreads over the idle ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, milp

from distseq.planner.cost import CostModel, padded
from distseq.planner.milp import Rows

EXACT_UNITS = 32  # longest sequences kept one by one (their time alone bounds T)
GRID = 0.01  # relative step of the rounded-down length grid for the others


@dataclass(frozen=True)
class Bound:
    """``seconds``: the LP's optimum (a valid lower bound on any plan's step time);
    ``status``: HiGHS' message; ``units``/``kinds``: the LP's size."""

    seconds: float
    status: str
    units: int
    kinds: int


def _units(lengths: np.ndarray, exact: int, grid: float) -> tuple[np.ndarray, np.ndarray, int]:
    """``(lengths, multiplicities, singles)``: the ``exact`` longest one by one, first, then the
    others rounded down to the grid and merged."""
    order = np.sort(lengths)[::-1]
    head, tail = order[:exact], order[exact:]
    if tail.size:
        step = math.log1p(grid)
        rounded = np.floor(np.exp(np.floor(np.log(tail) / step) * step) + 1e-9).astype(np.int64)
        rounded = np.clip(rounded, 1, tail)
        values, counts = np.unique(rounded, return_counts=True)
    else:
        values, counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
    units = np.concatenate([head, values])
    mult = np.concatenate([np.ones(head.size, np.int64), counts])
    return units, mult, head.size


def lp_bound(
    lengths: np.ndarray,
    cost: CostModel,
    *,
    floor: float = 0.0,
    exact: int = EXACT_UNITS,
    grid: float = GRID,
) -> Bound:
    """The LP relaxation's optimum for a batch of ``lengths`` (1-D ints) under ``cost``;
    ``floor`` (another valid bound) is a lower limit on ``T``. Returns ``floor`` itself as
    ``seconds`` if HiGHS fails (status says so), so the result is always valid."""
    units, mult, n_single = _units(np.asarray(lengths, dtype=np.int64), exact, grid)
    mem, world = cost.cluster.memory_bytes, cost.cluster.world_size
    kinds = [k for d in cost.cluster.degrees() for k in cost.kinds(d)]
    n_u, n_k = units.size, len(kinds)
    n_p = [k.phases.shape[0] for k in kinds]
    # Columns: z (kind-major, n_k·n_u) | n (n_k) | w (per kind, its phases) | T
    n0 = n_k * n_u
    w_start = n0 + n_k + np.concatenate([[0], np.cumsum(n_p)])[:-1]
    t_col = n0 + n_k + sum(n_p)
    n_var = t_col + 1
    hi = np.full(n_var, np.inf)
    rows = Rows()
    alone_cols: list[list[int]] = [[] for _ in range(n_single)]
    alone_vals: list[list[float]] = [[] for _ in range(n_single)]
    rank_cols, rank_vals = [t_col], [-float(world)]
    for k, kind in enumerate(kinds):
        p = padded(units, kind.degree).astype(np.float64)
        a_tok, q_tok = p, p * p
        z = k * n_u + np.arange(n_u)
        fits = kind.memory(a_tok) <= mem
        hi[z] = np.where(fits, mult, 0)
        n_col = n0 + k
        # Memory: the kind's tokens fit in n_k groups; a sequence on it opens one.
        cap = kind.capacity(mem)
        if cap > 0:
            rows.add([*z[fits], n_col], [*(a_tok[fits] / cap), -1.0], -np.inf, 0.0)
        for i in np.flatnonzero(fits[:n_single]):
            rows.add([z[i], n_col], [1.0, -1.0], -np.inf, 0.0)
            alone_cols[i].append(int(z[i]))
            alone_vals[i].append(float(kind.time(a_tok[i], q_tok[i])))
        for ph in range(n_p[k]):
            w = int(w_start[k] + ph)
            for a, q, c in {tuple(piece) for piece in kind.phases[ph].tolist()}:
                coef = a * a_tok[fits] + q * q_tok[fits]
                rows.add([*z[fits], n_col, w], [*coef, c, -1.0], -np.inf, 0.0)
            rank_cols.append(w)
            rank_vals.append(float(kind.degree))
    rows.add(rank_cols, rank_vals, -np.inf, 0.0)
    for i in range(n_single):
        rows.add([*alone_cols[i], t_col], [*alone_vals[i], -1.0], -np.inf, 0.0)
    for i in range(n_u):
        rows.add(np.arange(n_k) * n_u + i, np.ones(n_k), float(mult[i]), float(mult[i]))
    objective = np.zeros(n_var)
    objective[t_col] = 1.0
    lo = np.zeros(n_var)
    lo[t_col] = floor
    res = milp(objective, constraints=[rows.constraint(n_var)], bounds=Bounds(lo, hi))
    if res.status != 0:
        return Bound(floor, f"failed: {res.message}", n_u, n_k)
    # HiGHS' dual bound equals the primal optimum up to its tolerances; shave them off so
    # rounding never lifts the bound above a plan that reaches it.
    return Bound(max(floor, float(res.fun) * (1 - 1e-7)), "optimal", n_u, n_k)
