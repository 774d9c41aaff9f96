"""Sharded states for ``planner: adaptive``: ZeRO stages 1 and 2 (our own engine) and 3 (FSDP2).

Each rank runs different sequences in groups of different sizes, or none, in every
micro-step, so an engine whose collectives live in the forward and backward (DDP hooks, FSDP,
DeepSpeed) keeps them matched only if idle ranks run a forward and backward too. Stages 1 and 2
avoid that: the collectives are issued by the trainer's loop, by every rank, at fixed points:
stage 2 reduce-scatters the gradients after *every* micro-step of the plan
(a rank idle in it contributes zeros), stage 1 once per step; both all-gather the updated
weights after the optimizer step.

Layout: the trainable parameters, weight-decayed ones first, flattened into one fp32 vector of
``N`` elements padded to ``P·S``; rank ``r`` owns elements ``[r·S, (r+1)·S)``: the Adam moments
and (stage 2) the accumulated gradient of that range only. AdamW runs on the shard's decayed
and non-decayed parts as two parameter groups: the same elementwise arithmetic as one process.

Stage 3 (:class:`AdaptiveFSDPEngine`) is FSDP2 (``fully_shard`` per block over all ranks),
whose per-layer all-gathers and reduce-scatters live in the forward and backward: there a rank
idle in a micro-step runs a dummy micro-batch (a few padding tokens, no token in the loss, a
one-rank group), so every rank runs one forward and backward per micro-step and FSDP's
collectives stay matched; its gradient is exactly zero.

Memory per parameter (fp32): weights 4 B and the micro-step's gradient 4 B whole, Adam's
moments 8 B / P, and in stage 2 the accumulated gradient shard 4 B / P. Stage 2 saves the
accumulated whole gradient only between micro-steps; a reduce-scatter in buckets during the
backward (not done here) would be what removes the whole gradient from the peak.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from distseq.train.config import Config
from distseq.train.engine import Engine, FSDPEngine
from distseq.train.mesh import Mesh


class ShardedEngine(Engine):
    """ZeRO stage ``stage`` (1 or 2) over all ranks; parameters stay whole on every rank (the
    model runs unchanged in any group). Parameters start from rank 0's values."""

    def __init__(self, cfg: Config, model: nn.Module, mesh: Mesh, stage: int) -> None:
        if stage not in (1, 2):
            raise ValueError(f"adaptive.zero_stage={stage!r}; use 0 (replicated), 1 or 2")
        self.cfg, self.model, self.mesh, self.stage = cfg, model, mesh, stage
        self.module = model
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)
        params = [p for p in model.parameters() if p.requires_grad]
        self._params = [p for p in params if p.dim() >= 2] + [p for p in params if p.dim() < 2]
        self._decayed = sum(p.numel() for p in self._params if p.dim() >= 2)
        total = sum(p.numel() for p in self._params)
        world, rank = mesh.world_size, dist.get_rank()
        self.shard = math.ceil(total / world)
        self.lo = rank * self.shard
        flat = self._flat([p.detach() for p in self._params])
        # The shard's decayed and non-decayed parts (either may be empty), as optimizer params.
        cut = min(max(self._decayed - self.lo, 0), self.shard)
        mine = flat[self.lo : self.lo + self.shard]
        self._parts = [nn.Parameter(mine[:cut].clone()), nn.Parameter(mine[cut:].clone())]
        opt = cfg.train
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [self._parts[0]], "weight_decay": opt.weight_decay},
                {"params": [self._parts[1]], "weight_decay": 0.0},
            ],
            lr=opt.lr,
            betas=(opt.beta1, opt.beta2),
            foreach=False,
        )
        self._grad = torch.zeros(self.shard, dtype=torch.float32, device=flat.device)
        self._full_grad = torch.zeros_like(self._grad)  # the last step's, for tests

    def _flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``tensors`` (one per parameter, ``None`` as zeros) as one padded fp32 vector."""
        pad = self.shard * self.mesh.world_size - sum(p.numel() for p in self._params)
        parts = [
            (t if t is not None else torch.zeros_like(p)).flatten().float()
            for t, p in zip(tensors, self._params)
        ]
        return torch.cat([*parts, parts[0].new_zeros(pad)])

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)
        self._grad.zero_()

    def _scatter(self) -> None:
        """Reduce-scatter the local gradients into this rank's shard (a collective every rank
        joins) and free them."""
        full = self._flat([p.grad for p in self._params])
        mine = torch.empty_like(self._grad)
        dist.reduce_scatter_tensor(mine, full)
        self._grad += mine
        for p in self._params:
            p.grad = None

    def end_micro_step(self) -> None:
        """Called by every rank after every micro-step of the plan, idle or not."""
        if self.stage == 2:
            self._scatter()

    def step(self, lr: float, should_update: Callable[[float], bool]) -> float:
        """Average the gradient shards, clip by the global norm (one all-reduce of the shards'
        squared norms), update the shard and all-gather the weights."""
        if self.stage == 1:
            self._scatter()
        grad = self._grad / self.mesh.world_size
        square = grad.double().square().sum()
        dist.all_reduce(square)
        norm = float(square.sqrt())
        limit = self.cfg.train.grad_clip or math.inf
        if norm > limit:  # as clip_grad_norm_: scale by limit / (norm + 1e-6)
            grad *= limit / (norm + 1e-6)
        cut = self._parts[0].numel()
        self._parts[0].grad, self._parts[1].grad = grad[:cut], grad[cut:]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if should_update(norm):
            self.optimizer.step()
            self._gather()
        self._full_grad = grad
        return norm

    def _gather(self) -> None:
        mine = torch.cat([part.detach() for part in self._parts])
        full = mine.new_empty(self.shard * self.mesh.world_size)
        dist.all_gather_into_tensor(full, mine)
        with torch.no_grad():
            start = 0
            for p in self._params:
                p.copy_(full[start : start + p.numel()].view_as(p))
                start += p.numel()

    def gathered_gradients(self) -> dict[str, torch.Tensor]:
        """Collective: the last step's averaged, clipped gradient of every parameter by name
        (what a replicated engine leaves in ``.grad``), for tests and debugging."""
        full = self._full_grad.new_empty(self.shard * self.mesh.world_size)
        dist.all_gather_into_tensor(full, self._full_grad)
        out, start = {}, 0
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p in self._params:
            out[names[id(p)]] = full[start : start + p.numel()].view_as(p).clone()
            start += p.numel()
        return out

    def state_dict(self) -> dict:
        """This rank's shard: optimizer state and layout (saved per rank by the checkpoint)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "parts": [part.detach().clone() for part in self._parts],
            "world_size": self.mesh.world_size,
            "stage": self.stage,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.mesh.world_size:
            raise ValueError(
                f"the checkpoint's sharded optimizer state is for {state['world_size']} ranks, "
                f"this run has {self.mesh.world_size}; resume on {state['world_size']} ranks"
            )
        with torch.no_grad():
            for part, saved in zip(self._parts, state["parts"]):
                part.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])


class AdaptiveFSDPEngine(FSDPEngine):
    """ZeRO stage 3 for adaptive plans: FSDP2 over all ranks, gradients reduce-scattered after
    every micro-step (sharded accumulation). The scheduler gives idle ranks a dummy
    micro-batch (:attr:`needs_idle_work`)."""

    needs_idle_work = True

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        self.module.set_requires_gradient_sync(True)
        yield
