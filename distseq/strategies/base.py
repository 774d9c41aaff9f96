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
from distseq.strategies.registry import Registry


@dataclass(frozen=True)
class AttentionContext:
    """Everything a strategy needs besides the tensors.

    ``shard`` describes this rank's positions (documents from the global ``cu_seqlens``, or a
    single document of length ``S_local * P`` per batch row); ``varlen`` tells which.
    """

    info: GroupInfo
    shard: ShardLayout
    varlen: bool
    causal: bool
    scale: float
    kernel: ModuleType

    @property
    def local_cu_seqlens(self) -> torch.Tensor | None:
        return self.shard.local_cu_seqlens() if self.varlen else None

    @property
    def global_cu_seqlens(self) -> torch.Tensor | None:
        if not self.varlen:
            return None
        full = ShardLayout(self.shard.doc_lengths, 1, 0, "contiguous")
        return full.local_cu_seqlens()


class AttentionStrategy(ABC):
    """Sequence-parallel softmax attention over local shards ``[B, S_local, H, D]``."""

    name: ClassVar[str]
    layouts: ClassVar[tuple[str, ...]] = LAYOUTS  # shard layouts the strategy handles

    def check(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> None:  # noqa: B027
        """Raise ``ValueError`` for inputs this strategy cannot handle (no communication)."""

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


ATTENTION_STRATEGIES: Registry[AttentionStrategy] = Registry("attention")
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
