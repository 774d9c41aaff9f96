"""The plug-in interface of sequence-parallel attention strategies, and their registry.

A strategy is one module with a subclass of :class:`AttentionStrategy` decorated by
:func:`register_attention_strategy`; :func:`distseq.attention` validates the inputs, builds an
:class:`AttentionContext` and runs the strategy's ``forward``/``backward`` under one
``torch.autograd.Function``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import torch

from distseq.comm import GroupInfo
from distseq.layout import LAYOUTS, ShardLayout
from distseq.strategies.registry import Registry, check_layout_supported
from distseq.traffic import Traffic


@dataclass(frozen=True)
class AttentionContext:
    """Everything a strategy needs besides the tensors.

    ``shard`` describes this rank's positions (documents from the global ``cu_seqlens``, or a
    single document of length ``S_local * P`` per batch row); ``varlen`` tells which.
    ``ulysses_degree``: the ``usp`` strategy's Ulysses group size as the caller gave it
    (``None``: its default).
    """

    info: GroupInfo
    shard: ShardLayout
    varlen: bool
    causal: bool
    scale: float
    kernel: ModuleType
    ulysses_degree: int | None = None


class AttentionStrategy(ABC):
    """Sequence-parallel softmax attention over local shards ``[B, S_local, H, D]``.

    A strategy declares what it can run once, here: ``layouts`` and :meth:`check_group` (read
    by :func:`distseq.attention`, the training config's validation, the planner and the docs),
    and :meth:`traffic`, the bytes it sends (read by the cost model, benchmarks and tests).
    """

    name: ClassVar[str]
    layouts: ClassVar[tuple[str, ...]] = LAYOUTS  # shard layouts the strategy handles

    def check_group(
        self,
        world_size: int,
        q_heads: int,
        kv_heads: int,
        layout: str,
        ulysses_degree: int | None = None,
    ) -> None:
        """Raise ``ValueError`` if the strategy cannot run ``q_heads``/``kv_heads`` heads over
        ``world_size`` ranks in ``layout`` (shapes only: no tensors, no communication).
        ``ulysses_degree`` is ``usp``'s alone: the others refuse a value."""
        check_layout_supported(self, layout)
        if ulysses_degree is not None:
            raise ValueError(
                f"ulysses_degree={ulysses_degree!r} applies to strategy 'usp' only, not "
                f"{self.name!r}; drop it or use strategy='usp'"
            )

    @abstractmethod
    def traffic(
        self, p: int, s_local: float, q_heads: int, kv_heads: int, head_dim: int, elem: int
    ) -> Traffic:
        """Bytes the most loaded rank sends in one call on ``[B=1, s_local, H, head_dim]``
        shards of ``elem``-byte elements over ``p`` ranks (``s_local`` may be a fraction: the
        cost model asks per token)."""

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Return the local output ``[B, S_local, Hq, D]`` and the tensors backward needs."""

    @abstractmethod
    def backward(
        self, dout: torch.Tensor, saved: tuple[torch.Tensor, ...], ctx: AttentionContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``dq`` ``[B, S_local, Hq, D]``, ``dk``/``dv`` ``[B, S_local, Hkv, D]``."""


ATTENTION_STRATEGIES: Registry[AttentionStrategy] = Registry("attention", default="ring")
register_attention_strategy = ATTENTION_STRATEGIES.register
get_attention_strategy = ATTENTION_STRATEGIES.get


class SequenceParallelAttention(torch.autograd.Function):
    """Runs any registered strategy's forward and backward under autograd."""

    @staticmethod
    def forward(fctx, q, k, v, strategy: AttentionStrategy, ctx: AttentionContext):
        out, saved = strategy.forward(q, k, v, ctx)
        fctx.save_for_backward(*saved)
        fctx.strategy, fctx.ctx = strategy, ctx
        return out

    @staticmethod
    def backward(fctx, dout):
        dq, dk, dv = fctx.strategy.backward(dout.contiguous(), fctx.saved_tensors, fctx.ctx)
        return dq, dk, dv, None, None
