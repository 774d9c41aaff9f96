"""The MILP: assign sequences (single, or bucketed by length with integer counts) to candidate
groups of aligned power-of-two degrees, minimizing the makespan, tie-broken by total time.

Variables per candidate group ``c`` (degree ``d_c``, strategy ``combo_c``): ``u_c`` (open),
``x_ic`` (sequence ``i`` on ``c``), ``y_bc`` (how many of bucket ``b``), ``w_cp`` (time of phase
``p``) and the makespan ``M``. Phase times are epigraphs of the cost model's pieces, so the
model's ``max`` (overlap) is exact. Any multiset of power-of-two degrees with ``Σ d_c ≤ W``
lays out on aligned rank ranges (largest first), and groups up to a node never span nodes, so
topology needs no further constraint. Solved with HiGHS through ``scipy.optimize.milp``; the
warm start enters as an upper bound on ``M`` (scipy takes no initial solution).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from distseq.planner.cost import CostModel, GroupCost, padded
from distseq.planner.schedule import Schedule


@dataclass(frozen=True)
class Candidate:
    kind: GroupCost
    slot: int  # index among candidates of the same kind (for symmetry breaking)


@dataclass(frozen=True)
class MilpResult:
    schedule: Schedule | None
    status: str
    objective: float | None
    dual_bound: float | None
    gap: float | None


class Rows:
    """Sparse constraint rows ``lb <= Σ coef·x <= ub`` collected as COO triplets (shared by
    the planner's MILPs and the LP bound)."""

    def __init__(self) -> None:
        self.r: list[np.ndarray] = []
        self.c: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.lb: list[float] = []
        self.ub: list[float] = []

    def add(self, cols, vals, lb: float, ub: float) -> None:
        cols = np.asarray(cols, dtype=np.int64)
        self.r.append(np.full(cols.size, len(self.lb), dtype=np.int64))
        self.c.append(cols)
        self.v.append(np.asarray(vals, dtype=np.float64))
        self.lb.append(lb)
        self.ub.append(ub)

    def constraint(self, n: int) -> LinearConstraint:
        r, c, v = (np.concatenate(x) for x in (self.r, self.c, self.v))
        a = coo_matrix((v, (r, c)), shape=(len(self.lb), n)).tocsr()
        return LinearConstraint(a, self.lb, self.ub)


def solve_milp(
    lengths: np.ndarray,
    singles: list[int],
    buckets: list[list[int]],
    candidates: list[Candidate],
    cost: CostModel,
    *,
    upper_bound: float | None,
    lower_bound: float = 0.0,
    time_limit: float,
    node_limit: int | None,
) -> MilpResult:
    """Solve; ``singles`` are sequence indices placed one by one, ``buckets`` groups of indices
    placed by count (at their mean padded length and mean squared length)."""
    mem = cost.cluster.memory_bytes
    n_c, n_s, n_b = len(candidates), len(singles), len(buckets)
    n_p = [c.kind.phases.shape[0] for c in candidates]
    # Column layout: u | x (c-major) | y (c-major) | w (per candidate, its phases) | M
    u0 = 0
    x0 = u0 + n_c
    y0 = x0 + n_c * n_s
    w0 = y0 + n_c * n_b
    w_start = np.concatenate([[0], np.cumsum(n_p)])[:-1] + w0
    m_col = w0 + sum(n_p)
    n = m_col + 1
    counts = np.array([len(b) for b in buckets], dtype=np.float64)

    lo, hi = np.zeros(n), np.ones(n)
    integrality = np.zeros(n)
    integrality[:w0] = 1
    hi[y0:w0] = np.tile(counts, n_c) if n_b else hi[y0:w0]
    hi[w0:] = np.inf
    if upper_bound is not None:
        hi[m_col] = upper_bound

    rows = Rows()
    tok_s, sq_s, tok_b, sq_b = {}, {}, {}, {}
    for d in {c.kind.degree for c in candidates}:
        p = padded(lengths, d).astype(np.float64)
        tok_s[d], sq_s[d] = p[singles], p[singles] ** 2
        tok_b[d] = np.array([p[b].mean() for b in buckets])
        sq_b[d] = np.array([(p[b] ** 2).mean() for b in buckets])
    for i in range(n_s):
        rows.add([x0 + c * n_s + i for c in range(n_c)], [1.0] * n_c, 1, 1)
    for b in range(n_b):
        rows.add([y0 + c * n_b + b for c in range(n_c)], [1.0] * n_c, counts[b], counts[b])
    rows.add(
        list(range(n_c)), [float(c.kind.degree) for c in candidates], 0, cost.cluster.world_size
    )

    for ci, cand in enumerate(candidates):
        kind, d = cand.kind, cand.kind.degree
        xs = [x0 + ci * n_s + i for i in range(n_s)]
        ys = [y0 + ci * n_b + b for b in range(n_b)]
        room = mem - kind.static_bytes
        # A sequence that alone exceeds the group's memory can never go there.
        too_big = kind.bytes_per_token * tok_s[d] > room
        hi[np.array(xs, dtype=np.int64)[too_big]] = 0
        for col in xs:
            rows.add([col, ci], [1.0, -1.0], -np.inf, 0)
        for b, col in enumerate(ys):
            rows.add([col, ci], [1.0, -counts[b]], -np.inf, 0)
        bpt = kind.bytes_per_token
        rows.add(
            xs + ys + [ci],
            list(bpt * tok_s[d]) + list(bpt * tok_b[d]) + [-max(room, 0.0)],
            -np.inf,
            0,
        )
        for p in range(n_p[ci]):
            w = int(w_start[ci] + p)
            for a, q, c in {tuple(piece) for piece in kind.phases[p].tolist()}:
                rows.add(
                    xs + ys + [ci, w],
                    list(a * tok_s[d] + q * sq_s[d]) + list(a * tok_b[d] + q * sq_b[d]) + [c, -1.0],
                    -np.inf,
                    0,
                )
        ws = list(range(int(w_start[ci]), int(w_start[ci]) + n_p[ci]))
        rows.add(ws + [m_col], [1.0] * len(ws) + [-1.0], -np.inf, 0)
        # Valid cuts that tighten the relaxation: a group takes at least as long as any one
        # of its sequences alone.
        alone = kind.time(tok_s[d], sq_s[d])
        for col, t in zip(xs, alone):
            rows.add(ws + [col], [1.0] * len(ws) + [-float(t)], 0, np.inf)
        if cand.slot > 0:  # identical slots: open, and loaded, in order
            prev = ci - 1
            pws = list(range(int(w_start[prev]), int(w_start[prev]) + n_p[prev]))
            rows.add([prev, ci], [1.0, -1.0], 0, np.inf)
            rows.add(pws + ws, [1.0] * len(pws) + [-1.0] * len(ws), 0, np.inf)

    # Busy rank-time never exceeds W·M.
    all_w = [int(w_start[ci]) + p for ci in range(n_c) for p in range(n_p[ci])]
    degree_of = [float(candidates[ci].kind.degree) for ci in range(n_c) for _ in range(n_p[ci])]
    rows.add(all_w + [m_col], degree_of + [-float(cost.cluster.world_size)], -np.inf, 0)
    lo[m_col] = lower_bound

    objective = np.zeros(n)
    objective[m_col] = 1.0
    objective[w0:m_col] = 1e-3 / max(n_c, 1)
    options = {"time_limit": time_limit, "presolve": True}
    if node_limit is not None:
        options["node_limit"] = node_limit
    res = milp(
        objective,
        constraints=[rows.constraint(n)],
        integrality=integrality,
        bounds=Bounds(lo, hi),
        options=options,
    )
    status = {0: "optimal", 1: "limit", 2: "infeasible", 3: "unbounded", 4: "error"}.get(
        res.status, str(res.status)
    )
    if res.x is None:
        return MilpResult(None, status, None, getattr(res, "mip_dual_bound", None), None)
    sol = np.round(res.x).astype(np.int64)
    groups: list[tuple[int, list[int]]] = [(c.kind.degree, []) for c in candidates]
    for i, seq in enumerate(singles):
        c = int(np.argmax([sol[x0 + c * n_s + i] for c in range(n_c)]))
        groups[c][1].append(seq)
    for b, members in enumerate(buckets):
        left = [int(sol[y0 + c * n_b + b]) for c in range(n_c)]
        for seq in sorted(members, key=lambda k: (-int(lengths[k]), k)):
            c = int(np.argmax(left))  # deal the bucket out, largest remaining count first
            left[c] -= 1
            groups[c][1].append(seq)
    schedule = Schedule(tuple((d, tuple(sorted(s))) for d, s in groups if s))
    return MilpResult(
        schedule,
        status,
        float(res.fun),
        getattr(res, "mip_dual_bound", None),
        getattr(res, "mip_gap", None),
    )
