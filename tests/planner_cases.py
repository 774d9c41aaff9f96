"""Per-rank bodies of the planner's distributed test (run through ``pools(P).run``)."""

from __future__ import annotations

import os

from distseq.planner import Cluster, broadcast_plan, load_model, load_profile, plan_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def broadcast_case(rank: int, world: int, lengths: list[int]) -> dict:
    model = load_model(os.path.join(ROOT, "configs", "planner_1b_hybrid.yaml"))
    cluster = Cluster(world, world, 80 * 2**30)
    calls = []

    def solve():
        calls.append(rank)
        return plan_batch(lengths, cluster, model, load_profile("h100_nvlink_ib400"))

    plan = broadcast_plan(solve)
    try:
        broadcast_plan(
            lambda: plan_batch([10**9], cluster, model, load_profile("h100_nvlink_ib400"))
        )
    except ValueError as exc:
        error = str(exc)
    else:
        raise AssertionError("a sequence of 10**9 tokens was planned")
    return {"plan": plan.to_dict(), "calls": calls, "error": error}
