"""Dominated group kinds: the exact check, and that the planner's kinds drop only those."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from distseq.planner import Cluster, CostModel, load_model, load_profile, parse_bytes
from distseq.planner.cost import GroupCost
from distseq.planner.dominance import dominates, undominated

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_7B = load_model(os.path.join(ROOT, "configs", "planner_7b.yaml"))
HYBRID = load_model(os.path.join(ROOT, "configs", "planner_1b_hybrid.yaml"))
H100 = load_profile("h100_nvlink_ib400")


def _kind(phases, static=1.0, per_token=1.0, degree=2) -> GroupCost:
    width = max(len(p) for p in phases)
    packed = np.array([[*p, *[p[-1]] * (width - len(p))] for p in phases], dtype=np.float64)
    return GroupCost(degree, (), packed, static, per_token)


def _loads(seed: int, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Random ``(A, Q)`` over many scales, both axes and the origin's neighbourhood."""
    rng = np.random.default_rng(seed)
    a = 10.0 ** rng.uniform(-3, 9, n)
    q = 10.0 ** rng.uniform(-3, 15, n)
    a[: n // 10], q[n // 10 : n // 5] = 0.0, 0.0
    return a, q


def test_a_crossing_inside_the_simplex_is_checked():
    """``b = max(2A, 2Q)`` is below ``1.2(A + Q)`` at ``A = Q`` though above it on both axes:
    checking the corners alone would call ``b`` dominated."""
    b = _kind([[(2.0, 0.0, 0.0), (0.0, 2.0, 0.0)]])
    assert not dominates(_kind([[(1.2, 1.2, 0.0)]]), b)
    assert dominates(_kind([[(0.9, 0.9, 0.0)]]), b)
    # Memory counts too, and phases are summed: two phases of A and Q equal one of both.
    assert not dominates(_kind([[(0.9, 0.9, 0.0)]], per_token=2.0), b)
    assert dominates(_kind([[(1.0, 0.0, 0.0)], [(0.0, 1.0, 0.0)]]), _kind([[(1.0, 1.0, 0.0)]]))
    with pytest.raises(ValueError, match="degrees"):
        dominates(b, _kind([[(1.0, 0.0, 0.0)]], degree=4))


def _lp_slack(a: GroupCost, b: GroupCost) -> float:
    """An independent oracle: ``min over y in the simplex of f_b(y) - f_a(y)``, by one LP per
    choice of one piece per phase of ``a`` (``f_a`` is their maximum)."""
    from scipy.optimize import linprog

    n_p = b.phases.shape[0]
    worst = np.inf
    for choice in itertools.product(*[np.unique(p, axis=0) for p in a.phases]):
        linear = np.sum(choice, axis=0)
        # Variables y (3) and w (one per phase of b): min Σ w - linear·y, w_p >= piece·y.
        c = np.concatenate([-linear, np.ones(n_p)])
        rows = [[*piece, *(-np.eye(n_p)[p])] for p in range(n_p) for piece in b.phases[p]]
        res = linprog(
            c,
            A_ub=np.array(rows),
            b_ub=np.zeros(len(rows)),
            A_eq=[[1, 1, 1, *np.zeros(n_p)]],
            b_eq=[1],
            bounds=[(0, None)] * 3 + [(None, None)] * n_p,
            method="highs",
        )
        worst = min(worst, res.fun)
    return worst


def test_dominance_agrees_with_an_lp_and_holds_on_random_loads():
    rng = np.random.default_rng(0)
    a_load, q_load = _loads(1)
    found = 0
    for _ in range(200):
        pieces = rng.integers(1, 3, size=3)
        ka, kb = (
            _kind([rng.uniform(0, 1, (n, 3)) * [1, 1e-3, 1] for n in pieces]) for _ in range(2)
        )
        slack = _lp_slack(ka, kb)
        if dominates(ka, kb):
            found += 1
            assert slack >= -1e-9
            assert np.all(ka.time(a_load, q_load) <= kb.time(a_load, q_load) * (1 + 1e-9))
        else:
            assert slack < 1e-9
    assert found > 10


@pytest.mark.parametrize("model,world", [(MODEL_7B, 64), (HYBRID, 64), (MODEL_7B, 1024)])
def test_planned_kinds_drop_only_dominated_ones(model, world):
    cost = CostModel(model, H100, Cluster(world, 8, parse_bytes("80GiB")))
    a_load, q_load = _loads(2)
    dropped = 0
    for d in cost.cluster.degrees():
        every = [cost.group_cost(d, c) for c in cost.combos(d)]
        kept = cost.kinds(d)
        assert kept == undominated(every) and kept
        for kind in every:
            if kind in kept:
                continue
            dropped += 1
            assert any(dominates(k, kind) for k in kept)
            best = np.min([k.time(a_load, q_load) for k in kept], axis=0)
            assert np.all(best <= kind.time(a_load, q_load) * (1 + 1e-9))
        for i, k in enumerate(kept):  # none of the kept is dominated by another kept one
            assert not any(dominates(o, k) for j, o in enumerate(kept) if j != i)
    if model is MODEL_7B:
        assert dropped > 0
