"""The MILP at real batch sizes: which groups to open, solved for a target makespan ``T``.

At hundreds of ranks and thousands of sequences the slot model of :mod:`distseq.planner.milp`
(one binary per sequence and group) is far too large, but what it decides that the greedy
cannot is the *split*: how many groups of each degree and strategy. Here the groups of one kind
``k`` are counted, not named (integer ``n_k``); the longest sequences are placed one by one
(binary ``x_ik``, allowed only where the sequence alone finishes within ``T``); the rest, in
length buckets, are fluid (``f_bk``: the share of bucket ``b`` on kind ``k``, with the bucket's
exact padded sums). With ``T`` fixed, "every group of kind ``k`` finishes within ``T``" pools
to ``Σ_p max_j (a·A_k + q·Q_k + c·n_k) <= n_k·T``, which is linear, as are memory
(``A_k <= n_k·capacity_k``) and the ranks (``Σ d_k·n_k <= W``). The objective is the
rank-time used. The solver bisects ``T`` and realizes each split with the greedy fill on the
true lengths, so the MILP proposes and the cost model decides.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy.optimize import Bounds, milp

from distseq.planner.cost import CostModel, GroupCost, padded
from distseq.planner.heuristic import Split, fill_leftover
from distseq.planner.milp import Rows

LONG = 16  # longest sequences placed one by one
BUCKETS = 16  # length buckets of the others (equal counts, by length)


def _kinds(cost: CostModel) -> list[GroupCost]:
    key = ("split-milp-kinds",)
    if key not in cost.memo:
        cost.memo[key] = [k for d in cost.cluster.degrees() for k in cost.kinds(d)]
    return cost.memo[key]


class SplitModel:
    """The split MILP of one micro-step's ``lengths`` (1-D ints), re-solved per target."""

    def __init__(self, lengths: np.ndarray, cost: CostModel) -> None:
        self.cost = cost
        order = np.argsort(-lengths, kind="stable")
        self.long = lengths[order[:LONG]]
        tail = lengths[order[LONG:]]
        parts = np.array_split(tail, min(BUCKETS, tail.size)) if tail.size else []
        self.kinds = _kinds(cost)
        mem = cost.cluster.memory_bytes
        # Per kind: padded sums of each long sequence and each bucket, what fits, times alone.
        self.per_kind = []
        for kind in self.kinds:
            p_long = padded(self.long, kind.degree).astype(np.float64)
            a_b = np.array([padded(b, kind.degree).sum() for b in parts], dtype=np.float64)
            q_b = np.array([(padded(b, kind.degree) ** 2).sum() for b in parts], dtype=np.float64)
            big_b = np.array([padded(b, kind.degree).max() for b in parts], dtype=np.float64)
            fits_long = kind.memory(p_long) <= mem
            alone = np.where(fits_long, kind.time(p_long, p_long**2), np.inf)
            fits_b = kind.memory(big_b) <= mem if parts else np.zeros(0, bool)
            alone_b = np.where(fits_b, kind.time(big_b, big_b**2), np.inf)
            self.per_kind.append((p_long, alone, a_b, q_b, alone_b, kind.capacity(mem)))
        self.n_buckets = len(parts)

    def solve(self, target: float, time_limit: float) -> tuple[Split | None, str]:
        """The split of least rank-time whose pooled groups finish within ``target`` seconds
        and HiGHS' status (the split is ``None`` when infeasible, or none was found within
        ``time_limit``)."""
        n_k, n_l, n_b = len(self.kinds), self.long.size, self.n_buckets
        n_p = [k.phases.shape[0] for k in self.kinds]
        # Columns: n (n_k) | x (kind-major, n_l) | f (kind-major, n_b) | w (per kind, phases)
        x0 = n_k
        f0 = x0 + n_k * n_l
        w0 = f0 + n_k * n_b
        w_start = w0 + np.concatenate([[0], np.cumsum(n_p)])[:-1]
        n_var = w0 + sum(n_p)
        lo, hi = np.zeros(n_var), np.full(n_var, np.inf)
        integrality = np.zeros(n_var)
        integrality[: x0 + n_k * n_l] = 1
        world = self.cost.cluster.world_size
        rows = Rows()
        objective = np.zeros(n_var)
        for k, (kind, row) in enumerate(zip(self.kinds, self.per_kind)):
            p_long, alone, a_b, q_b, alone_b, cap = row
            d = kind.degree
            hi[k] = world // d
            xs = x0 + k * n_l + np.arange(n_l)
            fs = f0 + k * n_b + np.arange(n_b)
            hi[xs] = (alone <= target).astype(np.float64)
            hi[fs] = (alone_b <= target).astype(np.float64)  # its longest member, alone
            # A long sequence on kind k needs a group of it.
            for col in xs[alone <= target]:
                rows.add([col, k], [1.0, -1.0], -np.inf, 0.0)
            tokens = [*p_long, *a_b]
            cols = [*xs, *fs]
            if cap > 0:
                rows.add([*cols, k], [*tokens, -cap], -np.inf, 0.0)
            ws = []
            for ph in range(n_p[k]):
                w = int(w_start[k] + ph)
                ws.append(w)
                squares = [*(p_long**2), *q_b]
                for a, q, c in {tuple(piece) for piece in kind.phases[ph].tolist()}:
                    coef = [a * t + q * s for t, s in zip(tokens, squares)]
                    rows.add([*cols, k, w], [*coef, c, -1.0], -np.inf, 0.0)
                objective[w] = d
            rows.add([*ws, k], [1.0] * len(ws) + [-target], -np.inf, 0.0)
        rows.add(list(range(n_k)), [float(k.degree) for k in self.kinds], -np.inf, world)
        for i in range(n_l):
            rows.add(list(x0 + np.arange(n_k) * n_l + i), [1.0] * n_k, 1.0, 1.0)
        for b in range(n_b):
            rows.add(list(f0 + np.arange(n_k) * n_b + b), [1.0] * n_k, 1.0, 1.0)
        res = milp(
            objective,
            constraints=[rows.constraint(n_var)],
            integrality=integrality,
            bounds=Bounds(lo, hi),
            # Any split within the target will do; its rank-time only needs to be near least.
            options={"time_limit": time_limit, "presolve": True, "mip_rel_gap": 0.02},
        )
        status = {0: "optimal", 1: "limit", 2: "infeasible"}.get(res.status, str(res.status))
        if res.x is None:
            return None, status
        counts: Counter = Counter()
        for k, kind in enumerate(self.kinds):
            counts[kind.degree] += int(round(res.x[k]))
        used = sum(d * n for d, n in counts.items())
        return fill_leftover(counts, world - used), status


def one_step_bound(
    model: SplitModel, lower: float, upper: float, rounds: int, time_limit: float
) -> float:
    """The largest target in ``[lower, upper]`` the split MILP proves infeasible, by ``rounds``
    of bisection: no plan running ``model``'s sequences in one micro-step is faster (the
    split MILP relaxes one micro-step). ``lower`` must itself be such a bound."""
    lo, hi = lower, upper
    for _ in range(rounds):
        target = 0.5 * (lo + hi)
        split, status = model.solve(target, time_limit)
        if split is None and status == "infeasible":
            lo = target
        else:
            hi = target
    return lo
