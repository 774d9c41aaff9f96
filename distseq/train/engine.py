"""Training engines: DDP, FSDP2 (``fully_shard``) or DeepSpeed ZeRO, behind one interface.

Parameters are replicated over ``sp`` as well as ``dp``, so every engine reduces gradients over
all ``dp x sp`` ranks and *averages* them; the trainer multiplies each rank's loss by the world
size so the result is the gradient of the mean over the global batch's real tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distseq.train.config import Config
from distseq.train.mesh import Mesh


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms and biases (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), foreach=False
    )


def learning_rate(cfg: Config, step: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine to ``lr * min_lr_ratio`` (step 1-based)."""
    opt = cfg.train
    if step <= opt.warmup_steps:
        return opt.lr * step / opt.warmup_steps
    span = max(1, opt.steps - opt.warmup_steps)
    progress = min(1.0, (step - opt.warmup_steps) / span)
    floor = opt.lr * opt.min_lr_ratio
    return floor + (opt.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Engine:
    """``module`` is what to call forward on; ``model`` the bare decoder underneath."""

    def __init__(self, cfg: Config, model: nn.Module, mesh: Mesh) -> None:
        self.cfg, self.model, self.mesh = cfg, model, mesh
        self.module: nn.Module = model
        self.optimizer = build_optimizer(cfg, model)

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        """Context for one micro-batch; gradients are reduced only when ``sync``."""
        yield

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def end_micro_step(self) -> None:
        """Called by every rank after every micro-step of an adaptive plan, idle or not (an
        engine may issue collectives here that all ranks must join)."""

    def step(self, lr: float, should_update: Callable[[float], bool]) -> float:
        """Clip, then update with learning rate ``lr`` if ``should_update(global gradient
        norm)`` (every rank sees the same norm); returns the norm."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        limit = self.cfg.train.grad_clip or math.inf
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), limit, foreach=False)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        if should_update(float(norm)):
            self.optimizer.step()
        return float(norm)


class DDPEngine(Engine):
    def __init__(self, cfg: Config, model: nn.Module, mesh: Mesh) -> None:
        super().__init__(cfg, model, mesh)
        device_ids = [mesh.device.index] if mesh.device.type == "cuda" else None
        self.module = DistributedDataParallel(model, device_ids=device_ids)

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        with contextlib.nullcontext() if sync else self.module.no_sync():
            yield


class FSDPEngine(Engine):
    def __init__(self, cfg: Config, model: nn.Module, mesh: Mesh) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        flat = mesh.flat()
        policy = MixedPrecisionPolicy()
        if cfg.train.dtype == "bfloat16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mesh=flat, mp_policy=policy)
        fully_shard(model, mesh=flat, mp_policy=policy)
        super().__init__(cfg, model, mesh)

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        self.module.set_requires_gradient_sync(sync)
        yield


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` over all ranks (ZeRO stage ``parallel.zero_stage``); its
    gradient accumulation steps are this rank's micro-batches per step."""

    def __init__(self, cfg: Config, model: nn.Module, mesh: Mesh) -> None:
        import deepspeed

        micro = cfg.train.global_batch // mesh.dp
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": micro,
            "train_batch_size": micro * mesh.world_size,
            "zero_optimization": {"stage": cfg.parallel.zero_stage},
            "gradient_clipping": cfg.train.grad_clip,
            "bf16": {"enabled": cfg.train.dtype == "bfloat16"},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        super().__init__(cfg, model, mesh)
        self.module, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=ds_config
        )

    def zero_grad(self) -> None:
        """DeepSpeed clears gradients itself after each optimizer step."""

    def backward(self, loss: torch.Tensor) -> None:
        # The trainer already scales by the global token count; no extra 1/accumulation.
        self.module.backward(loss, scale_wrt_gas=False)

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        yield
        if not sync:  # DeepSpeed counts micro-batches in step() and updates at the boundary
            self.module.step()

    def step(self, lr: float, should_update: Callable[[float], bool]) -> float:
        """DeepSpeed clips and updates in one call, so ``should_update`` sees the norm only
        afterwards (the config refuses ``train.skip_nonfinite`` with DeepSpeed and the trainer
        checks the loss first): a non-finite norm then stops the run before the weights are
        used or saved. A norm DeepSpeed does not report is NaN in the metrics, not checked."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.module.step()
        norm = self.module.get_global_grad_norm()
        if norm is None:
            return float("nan")
        should_update(float(norm))
        return float(norm)


class ReplicatedEngine(Engine):
    """Replicated parameters whose gradients are all-reduced once, after every micro-batch of
    the step: for the adaptive planner, where ranks run different numbers of micro-batches in
    different groups (or none), which DDP's per-backward hooks cannot express. Parameters
    start from rank 0's values."""

    def __init__(self, cfg: Config, model: nn.Module, mesh: Mesh) -> None:
        super().__init__(cfg, model, mesh)
        self._params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)

    def step(self, lr: float, should_update: Callable[[float], bool]) -> float:
        self.average_gradients()
        return super().step(lr, should_update)

    def average_gradients(self) -> None:
        """Mean of every rank's gradients (a rank that ran nothing contributes zeros), in one
        flat all-reduce."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= self.mesh.world_size
        for param, chunk in zip(self._params, flat.split([g.numel() for g in grads])):
            param.grad = chunk.view_as(param)


ENGINES: dict[str, type[Engine]] = {
    "ddp": DDPEngine,
    "fsdp": FSDPEngine,
    "deepspeed": DeepSpeedEngine,
}


def build_engine(cfg: Config, model: nn.Module, mesh: Mesh) -> Engine:
    """``parallel.engine``; under ``planner: adaptive`` (``ddp`` only) the same replicated
    data-parallel semantics come from :class:`ReplicatedEngine`, or with
    ``adaptive.zero_stage`` 1/2 from :class:`distseq.train.zero.ShardedEngine`, 3 from
    :class:`distseq.train.zero.AdaptiveFSDPEngine`."""
    if cfg.planner == "adaptive":
        from distseq.train.zero import AdaptiveFSDPEngine, ShardedEngine

        if cfg.adaptive.zero_stage == 3:
            return AdaptiveFSDPEngine(cfg, model, mesh)
        if cfg.adaptive.zero_stage:
            return ShardedEngine(cfg, model, mesh, cfg.adaptive.zero_stage)
        return ReplicatedEngine(cfg, model, mesh)
    return ENGINES[cfg.parallel.engine](cfg, model, mesh)
