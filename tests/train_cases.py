"""Per-rank bodies of the training tests (module-level so the gloo pool can pickle them)."""

from __future__ import annotations

import importlib
import os
from collections import Counter
from types import ModuleType

from distseq.kernels import BACKENDS, LINEAR_BACKENDS
from distseq.train import Trainer, load_config, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")

# Small enough for a few seconds per run on 2 cores; pad_multiple 8 serves every layout up to
# zigzag over 4 ranks, so runs at different sp pack identical sequences and must agree.
SMALL = [
    "data.seq_len=128", "data.pad_multiple=8", "data.recall.min_len=40",
    "data.recall.max_len=64", "train.global_batch=2", "train.warmup_steps=1",
    "log.progress=false",
]  # fmt: skip


def build_config(overrides: list[str], world: int):
    return validate_config(load_config(TINY, [*SMALL, *overrides]), world)


def train_run(rank: int, world: int, overrides: list[str]) -> dict:
    """Train with ``overrides``; losses and the last step's full gradients (rank 0 view)."""
    return fit_and_collect(Trainer(build_config(overrides, world)))


def fit_and_collect(trainer: Trainer) -> dict:
    history = trainer.fit()
    if hasattr(trainer.engine, "gathered_gradients"):  # sharded: collective, every rank
        grads = trainer.engine.gathered_gradients()
        return {"losses": [r["loss"] for r in history], "grads": grads, "history": history}
    grads = {}
    for name, param in trainer.model.named_parameters():
        grad = param.grad
        if hasattr(grad, "full_tensor"):
            grad = grad.full_tensor()
        grads[name] = None if grad is None else grad.detach().clone()
    return {"losses": [r["loss"] for r in history], "grads": grads, "history": history}


def resume_error(rank: int, world: int, overrides: list[str]) -> str:
    """Build a trainer expected to refuse; returns the message (or '' if it did not refuse)."""
    try:
        Trainer(build_config(overrides, world))
    except ValueError as exc:
        return str(exc)
    return ""


def losses_only(rank: int, world: int, overrides: list[str]) -> list[float]:
    return train_run(rank, world, overrides)["losses"]


def default_config_losses(rank: int, world: int, overrides: list[str]) -> list[float]:
    """The shipped configs/tiny.yaml as is (plus ``overrides``)."""
    cfg = validate_config(load_config(TINY, overrides), world)
    return [record["loss"] for record in Trainer(cfg).fit()]


def kernel_calls(rank: int, world: int, overrides: list[str]) -> dict:
    """Train with ``overrides`` while counting calls of every kernel module's ``forward``;
    returns ``{"losses": [...], "calls": {module name: count}}``. The pool's workers are
    reused, so the modules are restored afterwards."""
    calls: Counter[str] = Counter()
    modules = [
        importlib.import_module(path) for path in (*BACKENDS.values(), *LINEAR_BACKENDS.values())
    ]
    originals = {module: module.forward for module in modules}

    def counting(module: ModuleType):
        def forward(*args, **kwargs):
            calls[module.__name__] += 1
            return originals[module](*args, **kwargs)

        return forward

    try:
        for module in modules:
            module.forward = counting(module)
        losses = losses_only(rank, world, overrides)
    finally:
        for module, forward in originals.items():
            module.forward = forward
    return {"losses": losses, "calls": dict(calls)}
