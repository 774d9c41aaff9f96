"""``plan_batch``: the step plan for a batch of sequence lengths.

Per micro-step: greedy fills of candidate splits (every homogeneous split, splits from a dual
search on the makespan, all splits when there are few, then neighbours of the best) give the
incumbent. Up to 64 sequences, the slot MILP (:mod:`distseq.planner.milp`) on the degrees
and strategies those use, with the longest sequences placed one by one and the rest in length
buckets, tries to beat it under a time limit; above that, the split MILP
(:mod:`distseq.planner.split_milp`) bisects a target makespan between the LP bound and the
incumbent, and each split it proposes is filled aiming at the target. Every candidate is scored
on the true lengths and replaces the incumbent only when better, so the plan is never worse
than the heuristic's, nor than the best static plan (one degree and strategy for every
sequence). ``lower_bound_s`` is the LP bound of :mod:`distseq.planner.bound`.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter

import numpy as np

from distseq.planner import heuristic
from distseq.planner.bound import lp_bound
from distseq.planner.cost import CostModel, padded, sums, work_floor
from distseq.planner.milp import Candidate, solve_milp
from distseq.planner.plan import GroupPlan, MicroStep, Plan, StaticSummary
from distseq.planner.profile import Profile
from distseq.planner.schedule import Schedule, Scored, score
from distseq.planner.spec import Cluster, ModelSpec
from distseq.planner.split_milp import SplitModel, one_step_bound
from distseq.planner.units import format_bytes

EXACT_SEQUENCES, EXACT_RANKS = 12, 8  # up to here the MILP sees every split and strategy
LOCAL_SEARCH_FILLS = 24
SPLIT_ROUNDS = 3  # bisection steps of the split MILP's target makespan per micro-step
# ... and per plan, shared by its micro-steps (a count, not a clock, so plans do not depend
# on the machine's speed): 40 micro-steps of ~100 sequences on 8 ranks took 101 split MILPs
# (4 s) and none improved on the greedy.
SPLIT_ROUNDS_PER_PLAN = 12
ONE_STEP_ROUNDS = 8  # bisection rounds of the one-step bound of a small batch
SPLIT_LIMIT = 5.0  # seconds per split MILP: a guard (4096 sequences on 1024 ranks: ~0.3 s)
# Up to this many sequences in a micro-step the slot MILP (one binary per sequence and group)
# runs; above it, the split MILP (:mod:`distseq.planner.split_milp`), which counts groups.
MILP_MAX_SEQUENCES = 64


def _check_lengths(lengths) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"lengths must be a non-empty 1-D list of integers, got shape {arr.shape}")
    whole = np.issubdtype(arr.dtype, np.floating) and bool(np.all(arr == np.round(arr)))
    if not (np.issubdtype(arr.dtype, np.integer) or whole):
        raise ValueError(f"lengths must be integers; got dtype {arr.dtype}")
    bad = np.flatnonzero(arr <= 0)
    if bad.size:
        raise ValueError(
            f"sequence {int(bad[0])} has length {arr[bad[0]]}; every length must be >= 1"
        )
    return arr.astype(np.int64)


def _check_fits(lengths: np.ndarray, cost: CostModel) -> None:
    longest = int(np.argmax(lengths))
    degree, need = cost.min_memory(int(lengths[longest]))
    limit = cost.cluster.memory_bytes
    if need > limit:
        raise ValueError(
            f"sequence {longest} of length {int(lengths[longest])} fits no group: it needs "
            f"{format_bytes(need)} per rank even on {degree} ranks (limit {format_bytes(limit)}); "
            "truncate or split it, add GPUs, or raise --memory"
        )


class _MicroSteps:
    """Splits of a batch into ``k`` micro-steps balancing tokens (longest first to the
    lightest), cached: the static plans ask for the same ``k`` many times."""

    def __init__(self, lengths: np.ndarray) -> None:
        self.lengths = lengths
        self.order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
        self._cache: dict[int, list[np.ndarray]] = {}

    def __call__(self, k: int) -> list[np.ndarray]:
        if k not in self._cache:
            steps: list[list[int]] = [[] for _ in range(k)]
            heap = [(0, j) for j in range(k)]
            for i, length in zip(self.order, self.lengths[self.order].tolist()):
                load, j = heap[0]
                steps[j].append(i)
                heapq.heapreplace(heap, (load + length, j))
            self._cache[k] = [np.array(sorted(s)) for s in steps if s]
        return self._cache[k]


def _plan_in_steps(splitter: _MicroSteps, cost: CostModel, solve_step, capacity: float):
    """Solve as one step, or in the fewest micro-steps that each have a feasible plan
    (``capacity``: the most padded tokens the cluster holds at once)."""
    lengths = splitter.lengths
    total = float(padded(lengths, cost.cluster.world_size).sum())
    k = max(1, math.ceil(total / max(capacity, 1.0)))
    while k <= len(lengths):
        solved = []
        steps = splitter(k)
        if hasattr(solve_step, "share_budget"):
            solve_step.share_budget(len(steps))
        for idx in steps:
            best = solve_step(idx)
            if best is None or not math.isfinite(best.makespan):
                break
            solved.append(best)
        else:
            return solved
        k = max(k + 1, math.ceil(k * 1.25))  # fragmentation: a few more micro-steps
    return None


def _cluster_capacity(cost: CostModel, degree: int | None = None, combo=None) -> float:
    """Most padded tokens the cluster holds at once (all degrees, or one static choice)."""
    w, mem = cost.cluster.world_size, cost.cluster.memory_bytes
    if degree is not None:
        return (w // degree) * cost.group_cost(degree, combo).capacity(mem)
    return max((w // d) * k.capacity(mem) for d in cost.cluster.degrees() for k in cost.kinds(d))


class _StepSolver:
    def __init__(self, lengths, cost, *, max_items, time_limit, node_limit, use_milp):
        self.lengths, self.cost = lengths, cost
        self.max_items, self.time_limit, self.node_limit = max_items, time_limit, node_limit
        self.use_milp = use_milp
        self.step_limit = time_limit
        self.split_limit = SPLIT_LIMIT
        self.split_rounds = SPLIT_ROUNDS
        self.info: dict = {"milp_status": [], "milp_gap": [], "source": [], "one_step_bound": []}
        self._items: dict[tuple[int, ...], heuristic.Items] = {}

    def _score_split(self, split, items, index, combo=None) -> Scored | None:
        sched = heuristic.greedy_fill(split, items, self.cost, combo)
        if sched is None:
            return None
        sched = Schedule(tuple((d, tuple(index[list(s)].tolist())) for d, s in sched.groups), combo)
        return score(sched, self.lengths, self.cost)

    def share_budget(self, steps: int) -> None:
        """Split the MILP time budget and the split MILP's rounds evenly over ``steps``
        micro-steps."""
        self.step_limit = self.time_limit / steps
        self.split_rounds = min(SPLIT_ROUNDS, SPLIT_ROUNDS_PER_PLAN // steps)

    def items(self, index: np.ndarray) -> heuristic.Items:
        key = tuple(index.tolist())
        if key not in self._items:
            degrees = self.cost.cluster.degrees()
            self._items[key] = heuristic.make_items(self.lengths[index], degrees, self.max_items)
        return self._items[key]

    def static(self, index: np.ndarray, degree: int, combo) -> Scored | None:
        items = self.items(index)
        split = ((degree, self.cost.cluster.world_size // degree),)
        return self._score_split(split, items, index, combo)

    def __call__(self, index: np.ndarray) -> Scored | None:
        cost, lengths = self.cost, self.lengths[index]
        degrees = cost.cluster.degrees()
        items = self.items(index)
        scored: dict = {}

        def consider(split):
            if split not in scored:
                scored[split] = self._score_split(split, items, index)

        for split in heuristic.homogeneous_splits(cost):
            consider(split)
        every = heuristic.all_splits(cost.cluster.world_size, degrees, limit=40)
        for split in every or []:
            consider(split)
        finite = [s for s in scored.values() if s is not None and math.isfinite(s.makespan)]
        if not finite:
            return None
        upper = min(s.makespan for s in finite)
        lower = _lower_bound(lengths, cost)
        for split in heuristic.demand_splits(items, cost, lower, upper):
            consider(split)
        best = min((s for s in scored.values() if s is not None), key=lambda s: s.key)
        # Hill-climb over neighbouring splits, with a fixed budget of fills (not a clock, so
        # the result does not depend on the machine's speed).
        budget = len(scored) + LOCAL_SEARCH_FILLS
        improved = True
        while improved and len(scored) < budget:
            improved = False
            for split in heuristic.neighbours(_split_of(best.schedule, cost)):
                consider(split)
                cand = scored[split]
                if cand is not None and cand.key < best.key:
                    best, improved = cand, True
        # The greedy's best is the incumbent: the MILP's plans replace it only when better,
        # so a plan is never worse than the heuristic's.
        from_milp = None
        large = len(index) > MILP_MAX_SEQUENCES and self.split_rounds > 0
        if self.use_milp and large and best.makespan > lower * 1.005:
            # A coarse LP (valid, ~1.5% looser, a third of the time) brackets the bisection.
            lower = lp_bound(lengths, cost, floor=lower, exact=16, grid=0.05).seconds
            found = self._split_milp(index, lower, best.makespan)
            if found is not None and found.key < best.key:
                best = from_milp = found
        source = "milp" if best is from_milp else "greedy"
        useful = len(index) <= MILP_MAX_SEQUENCES and best.makespan > lower * 1.005
        if self.use_milp and useful:
            ranked = sorted((s for s in scored.values() if s is not None), key=lambda s: s.key)
            result = self._milp(index, ranked[:3], best, lower)
            if result is not None and result.key < best.key:
                best, source = result, "milp"
        self.info["source"].append(source)
        return best

    def _split_milp(self, index: np.ndarray, lower: float, upper: float) -> Scored | None:
        """Bisect the target makespan between ``lower`` and ``upper``: at each target the split
        MILP (:mod:`distseq.planner.split_milp`) proposes a split, which the greedy fills
        with every sequence as its own item, aiming at the target; the best realization on
        the true lengths is returned. The bisection follows the fluid model's feasibility."""
        model = SplitModel(self.lengths[index], self.cost)
        items = heuristic.make_items(self.lengths[index], self.cost.cluster.degrees(), len(index))
        best, lo, hi = None, lower, upper
        for _ in range(self.split_rounds):
            target = math.sqrt(lo * hi)
            split, status = model.solve(target, self.split_limit)
            self.info["milp_status"].append(f"split {status}")
            if split is None:
                if status != "infeasible":
                    break  # out of time: a harder target would not solve either
                lo = target
            else:
                hi = target
                sched = heuristic.greedy_fill(split, items, self.cost, target=target)
                if sched is not None:
                    sched = Schedule(
                        tuple((d, tuple(index[list(s)].tolist())) for d, s in sched.groups)
                    )
                    got = score(sched, self.lengths, self.cost)
                    if best is None or got.key < best.key:
                        best = got
            if hi / lo < 1.005:
                break
        # ``lo``: no split of these sequences in one micro-step finishes within it (the split
        # MILP relaxes one micro-step), a bound for one-step plans tighter than the LP's.
        self.info["one_step_bound"].append(lo)
        return best

    def _milp(
        self, index: np.ndarray, top: list[Scored], best: Scored, lower: float
    ) -> Scored | None:
        cost, lengths = self.cost, self.lengths
        w = cost.cluster.world_size
        exact = len(index) <= EXACT_SEQUENCES and w <= EXACT_RANKS
        order = sorted(index.tolist(), key=lambda i: (-int(lengths[i]), i))
        candidates: list[Candidate] = []
        if exact:
            slots = {d: min(w // d, len(index)) for d in cost.cluster.degrees()}
            combos = {d: cost.combos(d) for d in slots}
            singles, buckets = order, []
        else:
            slots, combos = Counter(), {}
            for s in top:
                for d, n in Counter(d for d, _ in s.schedule.groups).items():
                    slots[d] = max(slots[d], min(n + 1, w // d))
                for (d, _), kind in zip(s.schedule.groups, s.kinds):
                    if kind is not None:
                        combos.setdefault(d, [])
                        if kind.combo not in combos[d]:
                            combos[d].append(kind.combo)
            n_single = min(len(order), 16)
            singles, rest = order[:n_single], order[n_single:]
            parts = np.array_split(np.array(rest, dtype=np.int64), min(len(rest), 12) or 1)
            buckets = [[int(i) for i in b] for b in parts if len(b)]
        for d in sorted(slots, reverse=True):
            for combo in combos.get(d, []):
                for k in range(slots[d]):
                    candidates.append(Candidate(cost.group_cost(d, combo), k))
        upper = best.makespan * (1 + 1e-9 if exact else 1.02)
        res = solve_milp(
            lengths,
            singles,
            buckets,
            candidates,
            cost,
            upper_bound=upper,
            lower_bound=lower * (1 - 1e-9),
            time_limit=self.step_limit,
            node_limit=self.node_limit,
        )
        self.info["milp_status"].append(res.status)
        self.info["milp_gap"].append(res.gap)
        if res.schedule is None:
            return None
        return score(res.schedule, lengths, cost)


def _split_of(schedule: Schedule, cost: CostModel) -> heuristic.Split:
    counts = Counter(d for d, _ in schedule.groups)
    used = sum(d * n for d, n in counts.items())
    d = 1
    left = cost.cluster.world_size - used
    while left > 0:  # idle ranks count as groups of one in the neighbourhood
        if left & d:
            counts[d] += 1
            left -= d
        d *= 2
    return tuple(sorted(counts.items(), reverse=True))


def _lower_bound(lengths: np.ndarray, cost: CostModel) -> float:
    """max(Σ best-case work / W, the longest single sequence's best time)."""
    work = np.full(len(lengths), np.inf)
    alone = np.full(len(lengths), np.inf)
    limit = cost.cluster.memory_bytes
    for d in cost.cluster.degrees():
        p = padded(lengths, d).astype(np.float64)
        for kind in cost.kinds(d):
            fits = kind.memory(p) <= limit
            work = np.where(fits, np.minimum(work, work_floor(kind, p, p * p)), work)
            alone = np.where(fits, np.minimum(alone, kind.time(p, p * p)), alone)
    return float(max(work.sum() / cost.cluster.world_size, alone.max()))


def _one_step_bound(
    lengths: np.ndarray, cost: CostModel, lower: float, upper: float, solver: _StepSolver
) -> float:
    """No one-step plan of the batch is faster: the split MILP's bisection. Small batches
    (the slot MILP's) get ``ONE_STEP_ROUNDS`` rounds here; larger ones reuse what the
    solver's own bisection proved (its rounds are the solve time's largest part)."""
    if len(lengths) <= MILP_MAX_SEQUENCES:
        model = SplitModel(lengths, cost)
        return one_step_bound(model, lower, upper, ONE_STEP_ROUNDS, SPLIT_LIMIT)
    return max([lower, *solver.info["one_step_bound"][-1:]])


def _to_micro_step(best: Scored, lengths: np.ndarray, cost: CostModel) -> MicroStep:
    rows = [
        (d, t, seqs, kind)
        for (d, seqs), t, kind in zip(best.schedule.groups, best.times, best.kinds)
        if seqs
    ]
    rows.sort(key=lambda r: (-r[0], -r[1], r[2]))
    groups, start = [], 0
    for d, t, seqs, kind in rows:
        tokens, _ = sums(lengths[list(seqs)], d)
        groups.append(
            GroupPlan(
                ranks=tuple(range(start, start + d)),
                strategy=kind.strategy,
                strategies=kind.strategies,
                sequences=tuple(int(s) for s in seqs),
                tokens=int(lengths[list(seqs)].sum()),
                predicted_time_s=float(t),
                memory_bytes=float(kind.memory(tokens)),
            )
        )
        start += d
    return MicroStep(tuple(groups), float(best.makespan))


def plan_batch(
    lengths,
    cluster: Cluster,
    model: ModelSpec,
    profile: Profile,
    *,
    cost: CostModel | None = None,
    time_limit: float = 0.25,
    node_limit: int | None = None,
    max_items: int = 160,
    use_milp: bool = True,
    activation_checkpointing: bool = False,
) -> Plan:
    """Plan one training step for sequences of ``lengths`` (input order is kept in the plan).

    ``cost`` overrides the default :class:`CostModel` (memory options) built from ``model``,
    ``profile`` and ``cluster``. ``time_limit``: seconds of the slot MILP (≤ 64 sequences per
    micro-step) per step, shared by its micro-steps; the split MILP (more sequences) has a
    fixed number of rounds instead. ``use_milp=False`` plans with the heuristic alone (the
    MILPs' incumbent; the plan is never worse than it). Deterministic for a given input as
    long as the MILP ends on optimality or finds nothing within its limit (the common cases);
    a solution found just before the limit can depend on timing, so a trainer should solve on
    one rank and broadcast ``plan.to_json()``. Raises ``ValueError`` on bad lengths or when a
    sequence fits no group under the memory limit.
    """
    start = time.perf_counter()
    lengths = _check_lengths(lengths)
    cost = cost or CostModel(
        model, profile, cluster, activation_checkpointing=activation_checkpointing
    )
    _check_fits(lengths, cost)
    solver = _StepSolver(
        lengths,
        cost,
        max_items=max_items,
        time_limit=time_limit,
        node_limit=node_limit,
        use_milp=use_milp,
    )
    splitter = _MicroSteps(lengths)
    steps = _plan_in_steps(splitter, cost, solver, _cluster_capacity(cost))
    static_best, static_steps = None, None
    longest = padded(lengths[[int(np.argmax(lengths))]], 1)
    for d in cluster.degrees():
        for combo in cost.combos(d):
            kind = cost.group_cost(d, combo)
            if kind.memory(float(padded(longest, d)[0])) > cluster.memory_bytes:
                continue
            found = _plan_in_steps(
                splitter,
                cost,
                lambda idx, d=d, combo=combo: solver.static(idx, d, combo),
                _cluster_capacity(cost, d, combo),
            )
            if found is None:
                continue
            total = sum(s.makespan for s in found) + cost.sync_time(len(found))
            if static_best is None or total < static_best.predicted_step_time_s:
                static_best, static_steps = StaticSummary(d, kind.strategy, total), found
    if static_best is None:
        raise ValueError("no static plan fits memory; this is a planner bug for a feasible batch")
    method = "adaptive"
    adaptive = math.inf if steps is None else sum(s.makespan for s in steps)
    if steps is None or adaptive + cost.sync_time(len(steps)) > static_best.predicted_step_time_s:
        steps, method = static_steps, "static"
    micro = tuple(_to_micro_step(s, lengths, cost) for s in steps)
    # The sharded states' collectives (0 unless the cost model has a ZeRO stage) are paid
    # once per step or per micro-step, by every rank: part of the step, idle time for none.
    sync = cost.sync_time(len(micro))
    total = float(sum(m.predicted_time_s for m in micro)) + sync
    busy = sum(g.degree * g.predicted_time_s for m in micro for g in m.groups)
    pad = sum(
        int(padded(lengths[list(g.sequences)], g.degree).sum() - lengths[list(g.sequences)].sum())
        for m in micro
        for g in m.groups
    )
    work = _lower_bound(lengths, cost)
    bound = lp_bound(lengths, cost, floor=work)
    solver.info["bound"] = {"work_s": work, "lp_s": bound.seconds, "lp_status": bound.status}
    if len(micro) == 1:
        solver.info["bound"]["one_step_s"] = _one_step_bound(
            lengths, cost, bound.seconds, micro[0].predicted_time_s, solver
        ) + cost.sync_time(1)
    return Plan(
        world_size=cluster.world_size,
        lengths=tuple(int(x) for x in lengths),
        micro_steps=micro,
        predicted_step_time_s=total,
        static_best=static_best,
        lower_bound_s=bound.seconds + cost.sync_time(1),  # every plan syncs at least once
        solve_time_s=time.perf_counter() - start,
        idle_fraction=1.0 - busy / (cluster.world_size * total) if total > 0 else 0.0,
        padding_fraction=pad / float(lengths.sum()),
        method=method,
        solver=solver.info,
    )
