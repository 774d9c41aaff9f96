"""Per-rank bodies of the resilience tests (module-level so the gloo pool can pickle them)."""

from __future__ import annotations

import time
import warnings

import torch
import torch.distributed as dist

import train_cases
from distseq.train import Trainer
from distseq.train.mesh import build_mesh


def run_with_warnings(rank: int, world: int, overrides: list[str]) -> dict:
    """Train; the losses, the history and the warnings raised (rank 0 warns, the others not)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_cases.train_run(rank, world, overrides)
    return {**result, "warnings": [str(w.message) for w in caught]}


def _snapshot(trainer: Trainer) -> dict:
    """Full parameters and the optimizer's per-parameter state (AdamW's ``step`` counts)."""
    params = {}
    for name, param in trainer.model.named_parameters():
        value = param.full_tensor() if hasattr(param, "full_tensor") else param
        params[name] = value.detach().clone()
    steps = [float(s["step"]) for s in trainer.engine.optimizer.state.values() if "step" in s]
    return {"params": params, "optimizer_steps": steps}


def nonfinite_steps(rank: int, world: int, overrides: list[str], bad_steps: list[int]) -> dict:
    """Train step by step, making the logits of the (1-based) steps in ``bad_steps`` NaN;
    returns the per-step records and snapshots (after each step), or the error raised."""
    trainer = Trainer(train_cases.build_config(overrides, world))
    module = trainer.engine.module
    forward = module.forward

    def poisoned(*args, **kwargs):
        logits = forward(*args, **kwargs)
        return logits * float("nan") if trainer.step + 1 in bad_steps else logits

    module.forward = poisoned
    records, snapshots = [], [_snapshot(trainer)]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            while trainer.step < trainer.cfg.train.steps:
                records.append(trainer.train_step())
                trainer.step += 1
                snapshots.append(_snapshot(trainer))
    except FloatingPointError as exc:
        return {"error": str(exc), "records": records, "at_step": trainer.step + 1}
    return {"records": records, "snapshots": snapshots,
            "warnings": [str(w.message) for w in caught]}  # fmt: skip


def silent_peer(rank: int, world: int, timeout_s: float) -> tuple[float, str] | None:
    """Rank 0 all-reduces over the mesh's ``sp`` group while rank 1 never joins: rank 0
    returns (seconds until the collective failed, its error)."""
    mesh = build_mesh(1, world, torch.device("cpu"), timeout_s)
    if rank != 0:
        time.sleep(2 * timeout_s)
        return None
    start = time.perf_counter()
    try:
        dist.all_reduce(torch.ones(1), group=mesh.sp_group)
    except RuntimeError as exc:
        return time.perf_counter() - start, str(exc)
    return time.perf_counter() - start, ""
