"""Per-rank bodies of the ZeRO bucket tests: the sharded engine driven directly, with ranks
whose backward reaches the parameters in different orders, skips some, or is idle."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from distseq.train.config import Config
from distseq.train.zero import ShardedEngine

WIDTH, LAYERS = 24, 5


def _config(bucket_mb: float) -> Config:
    cfg = Config()
    cfg.adaptive.zero_bucket_mb = bucket_mb
    cfg.train.grad_clip = 0.0  # compare raw averaged gradients
    return cfg


def _run(model: nn.Module, order: list[int], seed: int) -> torch.Tensor:
    """A loss through the layers ``order`` names (others unused), on data seeded by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, WIDTH, generator=gen)
    for index in order:
        x = torch.tanh(model[index](x))
    return x.square().sum()


# Per micro-step and rank: the layers its forward uses (None: idle). Rank 1 runs them in
# reverse (its hooks fire in another order) and skips one; rank 2 is idle, then uses few.
ORDERS = [
    {0: [0, 1, 2, 3, 4], 1: [4, 3, 1, 0], 2: None},
    {0: [0, 2, 4], 1: [4, 3, 2, 1, 0], 2: [1, 3]},
]


def bucketed_gradients_match(rank: int, world: int, stage: int, bucket_mb: float) -> dict:
    """Two micro-steps of ``ORDERS`` through :class:`ShardedEngine`; returns whether every
    gathered gradient equals the all-reduced mean of plain autograd's, the bucket count and
    whether ``.grad`` was freed after each micro-step (stage 2)."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))
    reference = copy.deepcopy(model)
    engine = ShardedEngine(_config(bucket_mb), model, SimpleNamespace(world_size=world), stage)
    engine.zero_grad()
    freed = True
    for micro, orders in enumerate(ORDERS):
        order = orders.get(rank)
        if order is not None:
            engine.backward(_run(model, order, seed=10 * micro + rank))
            _run(reference, order, seed=10 * micro + rank).backward()
        engine.end_micro_step()
        freed &= stage == 1 or all(p.grad is None for p in model.parameters())
    engine.step(0.0, lambda norm: True)
    got = engine.gathered_gradients()
    worst = 0.0
    for name, param in reference.named_parameters():
        want = param.grad if param.grad is not None else torch.zeros_like(param)
        dist.all_reduce(want)
        worst = max(worst, float((got[name] - want / world).abs().max()))
    return {"worst": worst, "buckets": len(engine.buckets), "freed": freed}


def second_backward_is_refused(rank: int, world: int) -> str:
    """Two backward passes in one stage-2 micro-step: the second reaches parameters whose
    bucket already left; returns the error."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))
    engine = ShardedEngine(_config(1e-3), model, SimpleNamespace(world_size=world), 2)
    engine.backward(_run(model, [0, 1, 2, 3, 4], seed=rank))
    try:
        engine.backward(_run(model, [0, 1, 2, 3, 4], seed=rank))
    except RuntimeError as exc:
        return str(exc)
    finally:
        engine._reducer._wait(keep=0)  # the first backward's posts, joined by every rank
    return ""
