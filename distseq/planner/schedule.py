"""A candidate assignment of sequences to groups, scored on the true lengths."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from distseq.planner.cost import Combo, CostModel, GroupCost, sums


@dataclass(frozen=True)
class Schedule:
    """Groups ``(degree, sequence indices)`` of one micro-step; ``combo`` pins one strategy
    for every group (a static plan), otherwise each group takes its fastest feasible one."""

    groups: tuple[tuple[int, tuple[int, ...]], ...]
    combo: Combo | None = None

    @property
    def ranks(self) -> int:
        return sum(d for d, _ in self.groups)


@dataclass(frozen=True)
class Scored:
    schedule: Schedule
    makespan: float
    total: float
    kinds: tuple[GroupCost | None, ...]
    times: tuple[float, ...]

    @property
    def key(self) -> tuple[float, float]:
        """Order of preference: makespan, then total group time (the issue's tie-break)."""
        return (self.makespan, self.total)


def score(schedule: Schedule, lengths: np.ndarray, cost: CostModel) -> Scored:
    """Time every group on the true lengths; an infeasible group makes the makespan ``inf``."""
    kinds, times = [], []
    for degree, seqs in schedule.groups:
        if not seqs:
            kinds.append(None)
            times.append(0.0)
            continue
        if schedule.combo is None:
            kind, t = cost.best(degree, lengths[list(seqs)])
        else:
            kind = cost.group_cost(degree, schedule.combo)
            tokens, squares = sums(lengths[list(seqs)], degree)
            fits = kind.memory(tokens) <= cost.cluster.memory_bytes
            t = float(kind.time(tokens, squares)) if fits else math.inf
            kind = kind if fits else None
        kinds.append(kind)
        times.append(t)
    over = schedule.ranks > cost.cluster.world_size
    makespan = math.inf if over else max(times, default=0.0)
    return Scored(schedule, makespan, float(sum(times)), tuple(kinds), tuple(times))
