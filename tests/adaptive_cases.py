"""Per-rank bodies of the adaptive-planner training tests."""

from __future__ import annotations

from distseq.planner import GroupPlan, MicroStep, Plan, StaticSummary
from distseq.train import Trainer
from train_cases import build_config, fit_and_collect

GroupSpec = tuple[tuple[int, ...], dict[str, str]]


def fixed_plan(steps: list[list[GroupSpec]], world: int, lengths: list[int]) -> Plan:
    """A plan with the given micro-steps of ``(ranks, strategies)`` groups; document ``i``
    goes to the ``i % G``-th of the ``G`` groups (counted over all micro-steps)."""
    flat = [group for step in steps for group in step]
    if len(lengths) < len(flat):
        raise AssertionError(f"{len(lengths)} documents cannot fill {len(flat)} groups")
    micro, index = [], 0
    for step in steps:
        groups = []
        for ranks, strategies in step:
            docs = tuple(i for i in range(len(lengths)) if i % len(flat) == index)
            name = "+".join(strategies.values())
            tokens = sum(lengths[i] for i in docs)
            groups.append(GroupPlan(tuple(ranks), name, strategies, docs, tokens, 0.0, 0.0))
            index += 1
        micro.append(MicroStep(tuple(groups), 0.0))
    return Plan(
        world_size=world, lengths=tuple(lengths), micro_steps=tuple(micro),
        predicted_step_time_s=1.0, static_best=StaticSummary(1, "ring", 1.0), lower_bound_s=1.0,
        solve_time_s=0.0, idle_fraction=0.0, padding_fraction=0.0, method="fixed",
    )  # fmt: skip


def adaptive_run(rank: int, world: int, overrides: list[str], steps=None) -> dict:
    """Train with ``planner=adaptive``; ``steps`` (micro-steps of groups) replaces the solver
    by :func:`fixed_plan`. Returns losses, gradients and history as ``train_run`` does."""
    trainer = Trainer(build_config(["planner=adaptive", *overrides], world))
    if steps is not None:
        trainer.scheduler.solve = lambda lengths: fixed_plan(steps, world, lengths)
    result = fit_and_collect(trainer)
    result["prefetched"] = trainer.scheduler.prefetched
    result["engine"] = type(trainer.engine).__name__
    moments = [s["exp_avg"] for s in trainer.engine.optimizer.state.values()]
    local = [m.to_local() if hasattr(m, "to_local") else m for m in moments]  # FSDP: DTensor
    result["adam_elements"] = sum(m.numel() for m in local)  # this rank's (rank 0's)
    result["parameters"] = sum(p.numel() for p in trainer.model.parameters())
    result["buckets"] = len(getattr(trainer.engine, "buckets", ()))
    return result
