"""The training spine: mesh -> model -> engine -> data -> steps -> metrics / checkpoints.

Loss is the mean over all real (unmasked) tokens of the global batch: every rank sums the
token losses of its shards, divides by the global real-token count (known to every rank from
the deterministic loader), and scales by the world size because the engines average
gradients over all ranks. The result equals a single-process run. With ``planner: static``
each rank runs its data-parallel share of packed sequences on the ``sp`` group; with
``planner: adaptive`` each step's documents are planned over SP groups of different sizes
(:mod:`distseq.train.adaptive`) and each rank runs its groups' sequences. The model is
distseq's :class:`~distseq.models.Decoder` or, with ``model.hf`` / ``model.hf_config``, a
Hugging Face causal LM (:class:`distseq.hf.model.HFCausalLM`), called the same way.

A step whose loss or gradient norm is NaN/inf raises :class:`FloatingPointError` naming the
step before the optimizer runs, or, within ``train.skip_nonfinite`` such steps in a row, is
skipped: no update of weights or optimizer state, its batch consumed and dropped, the step
counted (the learning-rate schedule moves on) and logged with ``skipped: true``.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distseq.kernels import describe_backends
from distseq.models import Decoder, SequenceContext
from distseq.planner.spec import ModelSpec
from distseq.train import checkpoint
from distseq.train.adaptive import AdaptiveScheduler, plan_summary
from distseq.train.config import Config
from distseq.train.data import DocumentLoader, PackedSequence, StepLoader
from distseq.train.engine import build_engine, learning_rate
from distseq.train.mesh import Mesh, build_mesh, init_distributed, pick_device
from distseq.train.metrics import MetricsLogger, flops_per_token, peak_flops, peak_memory_bytes

Work = tuple[PackedSequence, SequenceContext] | None  # a sequence and its sharding (None: idle)


def build_model(cfg: Config, mesh: Mesh) -> nn.Module:
    """distseq's decoder, or the Hugging Face model ``model.hf`` / ``model.hf_config`` names
    (seed torch first: FSDP and DeepSpeed assume every rank built the same weights)."""
    if cfg.model.hf_key is None:
        return Decoder(cfg.model)
    from distseq.hf.model import build_hf_model

    par = cfg.parallel
    # Every forward passes its SequenceContext, which picks group, strategy and layout; these
    # are only apply()'s defaults. The adaptive planner picks strategies per group, so it
    # gets ring, which every group shape allows.
    strategy = par.attention_strategy if cfg.planner == "static" else "ring"
    return build_hf_model(cfg.model, strategy=strategy, layout=par.layout,
                          group=mesh.sp_group, backend=par.attention_backend)  # fmt: skip


class Trainer:
    """Build everything for a validated ``cfg`` (see :func:`distseq.train.validate_config`).

    Joins torchrun's process group (or starts a one-process one); ``fit()`` trains and returns
    the per-step metrics. A checkpoint to resume from is read and checked against the config
    before any process-group work.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        resume = checkpoint.resume_point(cfg)
        self.device = pick_device(cfg.train.device)
        par = cfg.parallel
        init_distributed(self.device, par.timeout_s)
        self.mesh = build_mesh(par.dp, par.sp, self.device, par.timeout_s)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg, self.mesh).to(self.device)
        self.model.checkpoint_blocks = cfg.train.activation_checkpointing
        self.engine = build_engine(cfg, self.model, self.mesh)
        self.scheduler: AdaptiveScheduler | None = None
        if cfg.planner == "adaptive":
            self.loader = DocumentLoader(cfg)
            self.scheduler = AdaptiveScheduler(cfg, self.device)
        else:
            self.loader = StepLoader(cfg, self.mesh.dp_rank, self.mesh.dp)
        self.step = 0
        self.nonfinite_in_a_row = 0
        compute = torch.bfloat16 if cfg.train.dtype == "bfloat16" else torch.float32
        # Which kernels "auto" (or a named backend) resolved to on this device, said once.
        self.backends = describe_backends(par.attention_backend, par.linear_backend,
                                          self.device, compute)  # fmt: skip
        if dist.get_rank() == 0:
            print(f"kernel backends: {self.backends}", flush=True)
        if resume is not None:
            path, meta = resume
            if dist.get_rank() == 0:
                print(f"resuming from {path} (step {meta['step']}, saved with "
                      f"{meta.get('saved_with')})", flush=True)  # fmt: skip
            checkpoint.load(path, self.engine)
            self.loader.load_state_dict(meta["loader"])
            self.step = int(meta["step"])

    def _context(self, seq: PackedSequence) -> SequenceContext:
        par = self.cfg.parallel
        return SequenceContext.build(
            seq.doc_lengths, group=self.mesh.sp_group, layout=par.layout,
            attention_strategy=par.attention_strategy, linear_strategy=par.linear_strategy,
            attention_backend=par.attention_backend, linear_backend=par.linear_backend,
            ulysses_degree=par.ulysses_degree,
        )  # fmt: skip

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.train.dtype == "bfloat16" and self.cfg.parallel.engine == "ddp":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _static_work(self) -> tuple[list[Work], int, dict]:
        sequences, real_tokens = self.loader.next_step()
        tokens = self.cfg.train.global_batch * self.cfg.data.seq_len
        return [(seq, self._context(seq)) for seq in sequences], real_tokens, {"tokens": tokens}

    def _adaptive_work(self) -> tuple[list[Work], int, dict]:
        docs, real_tokens = self.loader.next_step()
        upcoming = self.loader.peek() if self.step + 1 < self.cfg.train.steps else None
        plan = self.scheduler.plan(docs, upcoming)
        stats = {"tokens": sum(len(tokens) for tokens, _ in docs), **plan_summary(plan)}
        return self.scheduler.work(plan, docs), real_tokens, stats

    def _skip(self, **values: float) -> bool:
        """Whether to skip this step for a non-finite one of ``values`` (every rank holds the
        same); raises when ``train.skip_nonfinite`` allows no more such steps in a row."""
        bad = ", ".join(
            f"{name} {value}" for name, value in values.items() if not math.isfinite(value)
        )
        if not bad:
            return False
        self.nonfinite_in_a_row += 1
        allowed, step = self.cfg.train.skip_nonfinite, self.step + 1
        if self.nonfinite_in_a_row > allowed:
            raise FloatingPointError(
                f"step {step}: non-finite {bad} ({self.nonfinite_in_a_row} such step(s) in a "
                f"row, train.skip_nonfinite={allowed}); the weights were not updated. Lower "
                "train.lr, check the data, or allow skipping with train.skip_nonfinite"
            )
        if dist.get_rank() == 0:
            message = f"step {step}: non-finite {bad}; step skipped (weights and optimizer "
            warnings.warn(message + "state unchanged, its batch dropped)", RuntimeWarning, 2)
        return True

    def _update(self, loss: float) -> tuple[float, bool]:
        """Clip and update unless the loss or gradient norm is non-finite (see ``_skip``);
        returns (gradient norm, skipped)."""
        if self._skip(loss=loss):
            return float("nan"), True
        skipped = False

        def should_update(norm: float) -> bool:
            nonlocal skipped
            skipped = self._skip(grad_norm=norm)
            return not skipped

        grad_norm = self.engine.step(learning_rate(self.cfg, self.step + 1), should_update)
        if not skipped:
            self.nonfinite_in_a_row = 0
        return grad_norm, skipped

    def train_step(self) -> dict:
        """One optimizer step; returns its ``loss`` (global mean), ``grad_norm``,
        ``real_tokens``, ``tokens``, ``skipped`` and, when adaptive, the plan's summary."""
        work, real_tokens, stats = (
            self._adaptive_work() if self.scheduler is not None else self._static_work()
        )
        if real_tokens == 0:
            raise ValueError(f"step {self.step + 1}: the global batch has no token in the loss")
        scale = self.mesh.world_size / real_tokens
        self.engine.zero_grad()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for index, item in enumerate(work):
            if item is None:  # idle in this micro-step of an adaptive plan
                self.engine.end_micro_step()
                continue
            seq, ctx = item
            tokens, targets, mask = (
                ctx.shard_tokens(t[None].to(self.device))
                for t in (seq.tokens, seq.targets, seq.loss_mask)
            )
            with self.engine.accumulate(sync=index == len(work) - 1):
                with self._autocast():
                    logits = self.engine.module(tokens, ctx)
                token_loss = F.cross_entropy(
                    logits.flatten(0, 1), targets.flatten(), reduction="none"
                )
                local = (token_loss * mask.flatten()).sum()
                self.engine.backward(local * scale)
            loss_sum += local.detach().double()
            self.engine.end_micro_step()
        dist.all_reduce(loss_sum)
        loss = float(loss_sum) / real_tokens
        grad_norm, skipped = self._update(loss)
        return {"loss": loss, "grad_norm": grad_norm, "real_tokens": real_tokens,
                "skipped": skipped, **stats}  # fmt: skip

    def fit(self) -> list[dict]:
        cfg = self.cfg
        is_main = dist.get_rank() == 0
        logger = MetricsLogger(cfg.out_dir, cfg.train.steps, self.step, is_main, cfg.log.progress)
        world = self.mesh.world_size
        peak = peak_flops(self.device, cfg.log.peak_flops)
        # A Hugging Face model's description builds it on the meta device: only when used.
        spec = ModelSpec.from_config(cfg.model) if peak else None
        per_token_flops = flops_per_token(spec, cfg.data.seq_len) if spec else 0.0
        try:
            while self.step < cfg.train.steps:
                start = time.perf_counter()
                result = self.train_step()
                self.step += 1
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - start
                memory = torch.tensor([peak_memory_bytes(self.device)], device=self.device)
                dist.all_reduce(memory, op=dist.ReduceOp.MAX)
                tokens = result["tokens"]
                record = {
                    "step": self.step,
                    "lr": learning_rate(cfg, self.step),
                    **result,
                    "step_time_s": elapsed,
                    "tokens_per_s": tokens / elapsed,
                    "tokens_per_s_per_rank": tokens / elapsed / world,
                    "peak_mem_bytes": int(memory.item()),
                }
                if peak:
                    record["mfu"] = record["tokens_per_s_per_rank"] * per_token_flops / peak
                logger.log(record)
                self._maybe_save()
            if cfg.checkpoint.export_hf:
                checkpoint.export_hf(cfg, self.engine)
        finally:
            logger.close()
            if self.scheduler is not None:
                self.scheduler.close()
        return logger.history

    def _maybe_save(self) -> None:
        every, last = self.cfg.checkpoint.every, self.step == self.cfg.train.steps
        if (every and self.step % every == 0) or (last and self.cfg.checkpoint.save_final):
            path = checkpoint.checkpoint_root(self.cfg) / f"step_{self.step}"
            checkpoint.save(Path(path), self.cfg, self.engine, self.step, self.loader.state_dict())
