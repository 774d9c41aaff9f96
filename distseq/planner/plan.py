"""The planner's output: groups of ranks per micro-step, and its JSON form (``plan.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class GroupPlan:
    """One SP group: ``ranks`` (aligned, power-of-two many) run ``sequences`` (indices into the
    batch's ``lengths``) packed together with ``strategies`` (one per layer type)."""

    ranks: tuple[int, ...]
    strategy: str
    strategies: dict[str, str]
    sequences: tuple[int, ...]
    tokens: int
    predicted_time_s: float
    memory_bytes: float

    @property
    def degree(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class MicroStep:
    groups: tuple[GroupPlan, ...]
    predicted_time_s: float

    def group_of(self, rank: int) -> GroupPlan | None:
        """The group ``rank`` belongs to in this micro-step (``None``: idle)."""
        for g in self.groups:
            if rank in g.ranks:
                return g
        return None


@dataclass(frozen=True)
class StaticSummary:
    degree: int
    strategy: str
    predicted_step_time_s: float


@dataclass(frozen=True)
class Plan:
    """A step's plan. ``predicted_step_time_s`` is the sum over micro-steps (run one after
    another); ``lower_bound_s``: a bound no plan of the batch can beat, communication
    included (:mod:`distseq.planner.bound`; ``solver["bound"]`` holds its parts);
    ``idle_fraction``: rank-time spent idle; ``padding_fraction``: padded tokens / tokens.
    """

    world_size: int
    lengths: tuple[int, ...]
    micro_steps: tuple[MicroStep, ...]
    predicted_step_time_s: float
    static_best: StaticSummary
    lower_bound_s: float
    solve_time_s: float
    idle_fraction: float
    padding_fraction: float
    method: str
    solver: dict = field(default_factory=dict)

    @property
    def gap_to_lower_bound(self) -> float:
        """How far above optimal the plan can be (0.05: at most 5%)."""
        return self.predicted_step_time_s / self.lower_bound_s - 1.0

    @property
    def gap_to_static(self) -> float:
        """How much faster than the best static plan (0.2: 20% less time)."""
        return 1.0 - self.predicted_step_time_s / self.static_best.predicted_step_time_s

    def to_dict(self) -> dict:
        out = asdict(self)
        out["gap_to_lower_bound"] = self.gap_to_lower_bound
        out["gap_to_static"] = self.gap_to_static
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        steps = tuple(
            MicroStep(
                tuple(
                    GroupPlan(
                        ranks=tuple(g["ranks"]),
                        strategy=g["strategy"],
                        strategies=dict(g["strategies"]),
                        sequences=tuple(g["sequences"]),
                        tokens=g["tokens"],
                        predicted_time_s=g["predicted_time_s"],
                        memory_bytes=g["memory_bytes"],
                    )
                    for g in step["groups"]
                ),
                step["predicted_time_s"],
            )
            for step in data["micro_steps"]
        )
        keys = {k: data[k] for k in cls.__dataclass_fields__ if k not in ("micro_steps",)}
        keys["lengths"] = tuple(keys["lengths"])
        keys["static_best"] = StaticSummary(**data["static_best"])
        return cls(micro_steps=steps, **keys)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def write_plans(path: str, plans: list[Plan]) -> None:
    """``plan.json``: one object for one plan, a JSON list for several."""
    data = plans[0].to_dict() if len(plans) == 1 else [p.to_dict() for p in plans]
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
