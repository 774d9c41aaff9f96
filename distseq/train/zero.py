"""Sharded states for ``planner: adaptive``: ZeRO stages 1 and 2 (our own engine) and 3 (FSDP2).

Each rank runs different sequences in groups of different sizes, or none, in every
micro-step, so an engine whose collectives live in the forward and backward (DDP hooks, FSDP,
DeepSpeed) keeps them matched only if idle ranks run a forward and backward too. Stages 1 and 2
avoid that with collectives on the whole world in one fixed order
(:mod:`distseq.train.zero_buckets`): stage 2 reduce-scatters the gradients of *every*
micro-step of the plan in buckets (``adaptive.zero_bucket_mb``), posting bucket ``b`` during
the backward once it and every earlier bucket hold their gradients and the rest at
:meth:`ShardedEngine.end_micro_step`, which every rank calls after every micro-step (an idle
rank posts zeros for all of them); stage 1 reduce-scatters the same buckets once per step.
Both all-gather the updated weights after the optimizer step, bucket by bucket.

Layout: the trainable parameters in buckets (registration order reversed: the order the
backward reaches them), each flattened into fp32 and padded to a multiple
of ``P``; rank ``r`` owns the ``r``-th ``1/P`` of every bucket: the Adam moments and the
accumulated gradient of those elements only. AdamW runs on the shard's weight-decayed and
non-decayed elements as two parameter groups: the same elementwise arithmetic as one process.

Stage 3 (:class:`AdaptiveFSDPEngine`) is FSDP2 (``fully_shard`` per block over all ranks),
whose per-layer all-gathers and reduce-scatters live in the forward and backward: there a rank
idle in a micro-step runs a dummy micro-batch (a few padding tokens, no token in the loss, a
one-rank group), so every rank runs one forward and backward per micro-step and FSDP's
collectives stay matched; its gradient is exactly zero.

Memory per parameter (fp32): weights 4 B whole and Adam's moments 8 B / P. Stage 1 keeps the
step's whole gradient (4 B) until the step; stage 2 only the gradient shard (4 B / P) plus the
buckets in flight: each parameter's ``.grad`` lives from its accumulation until its bucket is
posted, the bucket's flat copy until its reduce-scatter completes (measured in
``docs/training.md``). Gradients of parameters in a bucket behind one the backward has not
finished wait with it, so buckets follow the backward's order.
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
from distseq.train.zero_buckets import Bucket, BucketReducer, flatten, plan_buckets

NORM_CHUNK = 1 << 20  # elements per fp64 piece of the gradient norm


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
        self._params = [p for p in model.parameters() if p.requires_grad]
        world = mesh.world_size
        sizes = [p.numel() for p in self._params]
        # Stage 1 reduces the same buckets once per step (one bucket's flat copy at a time).
        self.buckets = plan_buckets(sizes, world, cfg.adaptive.zero_bucket_mb * 2**20 / 4)
        self.shard = sum(bucket.shard for bucket in self.buckets)
        # Which shard elements are weight-decayed (2-D and larger parameters; padding is not).
        self._decay = self._mine(lambda p: torch.full_like(p, p.dim() >= 2, dtype=torch.bool))
        self._plain = ~self._decay
        mine = self._mine(lambda p: p.detach().float())
        self._parts = [nn.Parameter(mine[self._decay]), nn.Parameter(mine[self._plain])]
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
        self._grad = torch.zeros(self.shard, dtype=torch.float32, device=mine.device)
        self._reducer = BucketReducer(self._params, self.buckets, self._grad, world)
        if stage == 2:
            self._reducer.watch()

    def _mine(self, of: Callable[[nn.Parameter], torch.Tensor]) -> torch.Tensor:
        """This rank's shard vector of ``of(parameter)``: its piece of every bucket."""
        rank, pieces = dist.get_rank(), []
        for bucket in self.buckets:
            tensors = [of(self._params[i]) for i in bucket.params]
            flat = flatten(bucket, tensors, self.mesh.world_size)
            pieces.append(flat[rank * bucket.shard : (rank + 1) * bucket.shard])
        return torch.cat(pieces)

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)
        self._grad.zero_()

    def end_micro_step(self) -> None:
        """Called by every rank after every micro-step of the plan, idle or not: stage 2
        reduce-scatters the buckets its backward did not post (all of them when idle)."""
        if self.stage == 2:
            self._reducer.flush()

    def step(self, lr: float, should_update: Callable[[float], bool]) -> float:
        """Average the gradient shards, clip by the global norm (one all-reduce of the shards'
        squared norms), update the shard and all-gather the weights."""
        if self.stage == 1:
            self._reducer.flush()
        grad = self._grad.div_(self.mesh.world_size)  # in place: the shard is all this step
        # fp64 sum of squares, a chunk at a time (no fp64 copy of the whole shard)
        square = sum(chunk.double().square().sum() for chunk in grad.split(NORM_CHUNK))
        square = torch.as_tensor(square, dtype=torch.float64, device=grad.device)
        dist.all_reduce(square)
        norm = float(square.sqrt())
        limit = self.cfg.train.grad_clip or math.inf
        if norm > limit:  # as clip_grad_norm_: scale by limit / (norm + 1e-6)
            grad *= limit / (norm + 1e-6)
        self._parts[0].grad, self._parts[1].grad = grad[self._decay], grad[self._plain]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        updated = should_update(norm)
        if updated:
            self.optimizer.step()
        for part in self._parts:
            part.grad = None  # before the gather's buffers
        if updated:
            self._gather()
        return norm

    def _gather(self) -> None:
        mine = torch.empty_like(self._grad)
        mine[self._decay], mine[self._plain] = self._parts[0].detach(), self._parts[1].detach()
        with torch.no_grad():
            for bucket, full in self._gathered(mine):
                for i, value in zip(bucket.params, self._split(bucket, full)):
                    self._params[i].copy_(value)

    def _gathered(self, mine: torch.Tensor) -> Iterator[tuple[Bucket, torch.Tensor]]:
        """Collective: every bucket's whole vector from the ranks' shard vectors ``mine``, one
        bucket at a time (one bucket's buffer in memory)."""
        world = self.mesh.world_size
        for bucket in self.buckets:
            full = mine.new_empty(bucket.shard * world)
            dist.all_gather_into_tensor(full, mine[bucket.offset : bucket.offset + bucket.shard])
            yield bucket, full

    def _split(self, bucket: Bucket, full: torch.Tensor) -> list[torch.Tensor]:
        """A bucket's whole vector as views shaped like its parameters."""
        params = [self._params[i] for i in bucket.params]
        chunks = full[: bucket.numel].split([p.numel() for p in params])
        return [chunk.view_as(p) for chunk, p in zip(chunks, params)]

    def gathered_gradients(self) -> dict[str, torch.Tensor]:
        """Collective: the last step's averaged, clipped gradient of every parameter by name
        (what a replicated engine leaves in ``.grad``; until the next step starts), for tests
        and debugging."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        out = {}
        for bucket, full in self._gathered(self._grad):
            for i, value in zip(bucket.params, self._split(bucket, full)):
                out[names[id(self._params[i])]] = value.clone()
        return out

    def state_dict(self) -> dict:
        """This rank's shard: optimizer state and layout (saved per rank by the checkpoint)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "parts": [part.detach().clone() for part in self._parts],
            "world_size": self.mesh.world_size,
            "stage": self.stage,
            "buckets": [bucket.numel for bucket in self.buckets],
        }

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.mesh.world_size:
            raise ValueError(
                f"the checkpoint's sharded optimizer state is for {state['world_size']} ranks, "
                f"this run has {self.mesh.world_size}; resume on {state['world_size']} ranks"
            )
        buckets = [bucket.numel for bucket in self.buckets]
        if state.get("buckets") != buckets:
            raise ValueError(
                f"the checkpoint's sharded optimizer state has gradient buckets "
                f"{state.get('buckets')} (elements), this run {buckets}: resume with the saving "
                "run's adaptive.zero_stage and adaptive.zero_bucket_mb"
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
