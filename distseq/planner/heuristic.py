"""Warm start and fallback: splits of the ranks into aligned power-of-two groups, each filled by a
longest-first greedy (every item goes to the group where it finishes earliest).

Items are the sequences, longest first; the short tail is packed into items of a few
sequences each (a group's cost depends only on its sums ``A`` and ``Q``, so packing is exact
in cost and only coarsens the choice).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from distseq.planner.cost import Combo, CostModel, GroupCost, padded
from distseq.planner.schedule import Schedule

Split = tuple[tuple[int, int], ...]  # ((degree, number of groups), ...), degrees descending


@dataclass
class Items:
    """``members[i]``: sequence indices of item ``i`` (longest first); ``tokens[i, j]`` and
    ``squares[i, j]``: its padded sums at degree ``degrees[j]``."""

    members: list[tuple[int, ...]]
    degrees: list[int]
    tokens: np.ndarray
    squares: np.ndarray


def make_items(lengths: np.ndarray, degrees: list[int], max_items: int) -> Items:
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    members: list[tuple[int, ...]] = []
    if len(order) <= max_items:
        members = [(i,) for i in order]
    else:
        # Keep the longest half of the budget single; pack the tail into items of similar size.
        singles = max_items // 2
        members = [(i,) for i in order[:singles]]
        tail = order[singles:]
        target = float(np.sum(lengths[tail])) / (max_items - singles)
        current: list[int] = []
        size = 0.0
        for i in tail:
            current.append(i)
            size += float(lengths[i])
            if size >= target:
                members.append(tuple(current))
                current, size = [], 0.0
        if current:
            members.append(tuple(current))
    flat = np.array([i for m in members for i in m], dtype=np.int64)
    starts = np.cumsum([0] + [len(m) for m in members[:-1]])
    tokens = np.zeros((len(members), len(degrees)))
    squares = np.zeros_like(tokens)
    for j, d in enumerate(degrees):
        p = padded(lengths[flat], d).astype(np.float64)
        tokens[:, j] = np.add.reduceat(p, starts)
        squares[:, j] = np.add.reduceat(p * p, starts)
    return Items(members, degrees, tokens, squares)


def _compile(kind: GroupCost, capacity: float):
    """``kind.scalar_time``, infinite beyond the memory ``capacity`` (in padded tokens)."""
    inner = kind.scalar_time

    def time(tokens: float, squares: float) -> float:
        return math.inf if tokens > capacity else inner(tokens, squares)

    return time


class _Kind:
    """A degree's candidate strategies as plain-float closures, for fast scalar evaluation."""

    def __init__(self, cost: CostModel, degree: int, combo: Combo | None) -> None:
        kinds = cost.kinds(degree) if combo is None else [cost.group_cost(degree, combo)]
        mem = cost.cluster.memory_bytes
        self.capacity = max(k.capacity(mem) for k in kinds)
        self.options = [_compile(k, k.capacity(mem)) for k in kinds]

    def time(self, tokens: float, squares: float) -> float:
        return min(f(tokens, squares) for f in self.options)


def kind_of(cost: CostModel, degree: int, combo: Combo | None) -> _Kind:
    key = ("heuristic-kind", degree, combo)
    if key not in cost.memo:
        cost.memo[key] = _Kind(cost, degree, combo)
    return cost.memo[key]


def greedy_fill(
    split: Split,
    items: Items,
    cost: CostModel,
    combo: Combo | None = None,
    target: float | None = None,
) -> Schedule | None:
    """Longest-first: each item goes to the group where it finishes earliest (``None`` when some
    item fits no group's memory). With a ``target`` makespan, it goes to the smallest degree
    whose least-loaded group still finishes within it (the cheapest place in rank-time), and
    only where none does, to the earliest finish."""
    col = {d: items.degrees.index(d) for d, _ in split}
    kinds = {d: kind_of(cost, d, combo) for d, _ in split}
    loads = {d: [[0.0, 0.0] for _ in range(n)] for d, n in split}
    members: dict[int, list[list[int]]] = {d: [[] for _ in range(n)] for d, n in split}
    heaps = {d: [(0.0, g) for g in range(n)] for d, n in split}
    for i, m in enumerate(items.members):
        best = (math.inf, 0, 0)
        best_key = (True, math.inf, math.inf)
        for d, _ in split:
            a, q = items.tokens[i, col[d]], items.squares[i, col[d]]
            if a > kinds[d].capacity:
                continue
            load = loads[d]
            # The least-loaded group of a degree is where the item finishes earliest, unless
            # its memory is full; then take the least-loaded group with room.
            g = heaps[d][0][1]
            t = kinds[d].time(load[g][0] + a, load[g][1] + q)
            if t == math.inf:
                for g in sorted(range(len(load)), key=lambda k: (load[k][0], k)):
                    t = kinds[d].time(load[g][0] + a, load[g][1] + q)
                    if t < math.inf:
                        break
            within = target is not None and t <= target
            key = (False, d, t) if within else (True, t, d)
            if key < best_key:
                best, best_key = (t, d, g), key
        t, d, g = best
        if t == math.inf:
            return None
        loads[d][g][0] += items.tokens[i, col[d]]
        loads[d][g][1] += items.squares[i, col[d]]
        members[d][g].extend(m)
        heap = heaps[d]
        if heap[0][1] == g:
            heapq.heapreplace(heap, (t, g))
        else:
            heap[:] = [(tt, gg) if gg != g else (t, g) for tt, gg in heap]
            heapq.heapify(heap)
    groups = tuple((d, tuple(sorted(s))) for d, _ in split for s in members[d] if s)
    return Schedule(groups, combo)


def homogeneous_splits(cost: CostModel) -> list[Split]:
    w = cost.cluster.world_size
    return [((d, w // d),) for d in cost.cluster.degrees()]


def all_splits(world: int, degrees: list[int], limit: int) -> list[Split] | None:
    """Every multiset of ``degrees`` summing to ``world`` (``None`` if more than ``limit``)."""
    out: list[Split] = []
    desc = sorted(degrees, reverse=True)

    def rec(k: int, left: int, acc: list[tuple[int, int]]) -> bool:
        if left == 0:
            out.append(tuple(acc))
            return len(out) <= limit
        if k == len(desc):
            return True
        d = desc[k]
        for n in range(left // d, -1, -1):
            if not rec(k + 1, left - n * d, acc + [(d, n)] if n else acc):
                return False
        return True

    return out if rec(0, world, []) else None


def fill_leftover(counts: Counter, left: int) -> Split:
    d = 1
    while left:
        if left & d:
            counts[d] += 1
            left -= d
        d *= 2
    return tuple(sorted(((d, n) for d, n in counts.items() if n), reverse=True))


def demand_splits(items: Items, cost: CostModel, lower: float, upper: float) -> list[Split]:
    """Splits from a dual search on a target makespan ``T``: each item on the smallest degree
    that runs it within ``T``, packed worst-fit into groups of that degree; the ranks this
    needs decide whether ``T`` is feasible. Returns the split of every ``T`` tried."""
    w = cost.cluster.world_size
    degrees = cost.cluster.degrees()
    kinds = {d: kind_of(cost, d, None) for d in degrees}
    found: list[Split] = []
    lo, hi = max(lower, 1e-12), max(upper, lower * 1.0001, 1e-12)
    for _ in range(14):
        target = math.sqrt(lo * hi)
        counts: Counter = Counter()
        heaps: dict[int, list] = {d: [] for d in degrees}
        feasible = True
        for i in range(len(items.members)):
            placed = False
            for j, d in enumerate(degrees):
                a, q = items.tokens[i, j], items.squares[i, j]
                if kinds[d].time(a, q) > target:
                    continue
                heap = heaps[d]
                if heap:
                    ta, tq, g = heap[0][1], heap[0][2], heap[0][3]
                    t = kinds[d].time(ta + a, tq + q)
                    if t <= target:
                        heapq.heapreplace(heap, (t, ta + a, tq + q, g))
                        placed = True
                        break
                heapq.heappush(heap, (kinds[d].time(a, q), a, q, counts[d]))
                counts[d] += 1
                placed = True
                break
            if not placed:
                feasible = False
                break
        used = sum(d * n for d, n in counts.items())
        if feasible and used <= w:
            found.append(fill_leftover(counts, w - used))
            hi = target
        else:
            lo = target
        if hi / lo < 1.01:
            break
    return found


def _take(counts: Counter, ranks: int, avoid: int) -> bool:
    """Free ``ranks`` ranks from the smallest groups other than degree ``avoid`` (halving a
    larger group when needed); ``False`` if there are not enough."""
    while ranks > 0:
        smaller = sorted(d for d, n in counts.items() if n and d != avoid)
        if not smaller:
            return False
        d = smaller[0]
        if d <= ranks:
            counts[d] -= 1
            ranks -= d
        else:
            counts[d] -= 1
            counts[d // 2] += 2
    return True


def neighbours(split: Split) -> list[Split]:
    """Merge two groups of one degree, halve one group, or double one group with ranks taken
    from the smallest other groups (a long sequence's group grows in one move)."""
    counts = Counter(dict(split))
    out = []
    for d, n in split:
        if n >= 2:
            c = counts.copy()
            c[d] -= 2
            c[2 * d] += 1
            out.append(c)
        if d >= 2:
            c = counts.copy()
            c[d] -= 1
            c[d // 2] += 2
            out.append(c)
        c = counts.copy()
        c[d] -= 1
        if _take(c, d, avoid=d):
            c[2 * d] += 1
            out.append(c)
    return [tuple(sorted(((d, n) for d, n in c.items() if n), reverse=True)) for c in out]
