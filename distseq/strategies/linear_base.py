"""The plug-in interface of sequence-parallel linear-attention strategies, and their registry.

Every strategy runs the same three steps; only the exchange differs:

1. *prepare*: each local piece (one per batch row or document, two under zigzag) computes its
   memory ``M`` (decay-weighted ``kᵀv``, float32 ``[H, Dk, Dv]``) and total log decay;
2. *exchange*: an exclusive scan ``S_in(p+1) = exp(G_p) S_in(p) + M_p`` over the global piece
   order, starting from the initial state (:meth:`LinearStrategy.scan`), posted before the
   local chunked kernel runs so communication overlaps it (the scan takes any per-piece
   transition: a scalar factor here, a ``Dk × Dk`` matrix for the delta rule,
   :mod:`distseq.strategies.delta_base`);
3. *apply*: ``o_t += scale · exp(G_t) q_t S_in`` on top of the kernel's zero-state output.

Backward is the mirror: the outputs' gradient reaching each piece's incoming state goes
through the *reversed* scan (starting from the final state's gradient), giving every piece the
gradient ``dS_out`` of its outgoing state, while the kernel's zero-state backward runs; the
terms of ``S_in`` and ``dS_out`` are added afterwards (``linear_local.state_gradients``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar, Protocol

import torch

from distseq.comm import all_reduce_sum
from distseq.layout import LAYOUTS
from distseq.pieces import Pieces
from distseq.strategies import linear_local
from distseq.strategies.registry import Registry, check_layout_supported
from distseq.traffic import Traffic


@dataclass(frozen=True)
class LinearContext(Pieces):
    """Everything a linear strategy needs besides the tensors (see :mod:`distseq.pieces`)."""

    scale: float
    kernel: ModuleType
    output_final_state: bool


class PendingScan(Protocol):
    def wait(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Incoming states of the local segments, and the scan's end state (or ``None``)."""


class LinearStrategy(ABC):
    """Sequence-parallel linear attention; a strategy is its exchange.

    As for softmax strategies, ``layouts``, :meth:`check_group` and :meth:`traffic` are the
    one statement of what the strategy runs and sends.
    """

    name: ClassVar[str]
    layouts: ClassVar[tuple[str, ...]] = LAYOUTS  # shard layouts the strategy handles

    def check_group(self, world_size: int, layout: str) -> None:
        """Raise ``ValueError`` if the strategy cannot run over ``world_size`` ranks in
        ``layout`` (no tensors, no communication)."""
        check_layout_supported(self, layout)

    @abstractmethod
    def traffic(self, p: int, docs: int, heads: int, dk: int, dv: int, layout: str) -> Traffic:
        """Bytes the most loaded rank sends in one call over ``docs`` documents (or batch
        rows) of ``heads`` float32 ``[dk, dv]`` states on ``p`` ranks (no final state)."""

    @abstractmethod
    def scan(
        self,
        states: torch.Tensor,
        transitions: torch.Tensor,
        start: torch.Tensor | None,
        ctx: Pieces,
        *,
        reverse: bool,
        need_end: bool,
    ) -> PendingScan:
        """Post the exclusive scan ``X(p+1) = T_p X(p) + Y_p`` over the pieces.

        ``states`` ``[N_local, H, Dk, Dv]`` are the local ``Y`` and ``transitions`` the local
        ``T`` (float32, local segment order): ``[N_local, H, 1, 1]`` scalar factors
        ``exp(a_p)``, or ``[N_local, H, Dk, Dk]`` matrices (see
        :func:`distseq.strategies.transition.combine`); ``start``
        ``[docs, H, Dk, Dv]`` is ``X(0)`` (zeros if ``None``, only read where needed).
        Pieces run in :meth:`LinearContext.order` (reversed if ``reverse``). ``wait()``
        returns ``X`` entering each local piece ``[N_local, ...]`` and, if ``need_end``,
        ``X(end)`` ``[docs, ...]`` on every rank.
        """


LINEAR_STRATEGIES: Registry[LinearStrategy] = Registry("linear attention", default="lasp2")
register_linear_strategy = LINEAR_STRATEGIES.register
get_linear_strategy = LINEAR_STRATEGIES.get


class SequenceParallelLinearAttention(torch.autograd.Function):
    """Any registered strategy's forward and backward under autograd.

    Returns ``o`` and the final states ``[docs, H, Dk, Dv]`` (float32; an empty tensor unless
    ``ctx.output_final_state``). Only rank 0 (holding every document's first piece) returns a
    gradient for ``initial_state``; the final state's gradient is summed over the ranks.
    """

    @staticmethod
    def forward(fctx, q, k, v, log_decay, initial_state, strategy: LinearStrategy, ctx):
        qk, kk, vk = (ctx.to_kernel(t) for t in (q, k, v))
        gk = ctx.to_kernel(None if log_decay is None else log_decay.float())
        cu, bounds = ctx.kernel_cu_seqlens(q.device), ctx.kernel_bounds()
        segments = linear_local.Segments(bounds)
        memories, log_decays = linear_local.memories(kk, vk, gk, segments)
        start = None if initial_state is None else initial_state.to(memories.dtype)
        factors = log_decays.exp()[..., None, None]
        pending = strategy.scan(
            memories, factors, start, ctx, reverse=False, need_end=ctx.output_final_state
        )
        out, _ = ctx.kernel.forward(qk, kk, vk, gk, scale=ctx.scale, cu_seqlens=cu, bounds=bounds)
        incoming, final = pending.wait()
        out = out + linear_local.apply_incoming(qk, incoming, gk, segments, ctx.scale)
        fctx.save_for_backward(q, k, v, log_decay, incoming, factors)
        fctx.strategy, fctx.ctx = strategy, ctx
        fctx.initial_dtype = None if initial_state is None else initial_state.dtype
        final = memories.new_zeros(0) if final is None else final
        return ctx.from_kernel(out.to(q.dtype)), final

    @staticmethod
    def backward(fctx, dout, dfinal):
        q, k, v, log_decay, incoming, factors = fctx.saved_tensors
        strategy, ctx = fctx.strategy, fctx.ctx
        qk, kk, vk, do_k = (ctx.to_kernel(t) for t in (q, k, v, dout.contiguous()))
        gk = ctx.to_kernel(None if log_decay is None else log_decay.float())
        cu, bounds = ctx.kernel_cu_seqlens(q.device), ctx.kernel_bounds()
        segments = linear_local.Segments(bounds)
        # Every rank returned the final state, so its gradient is the sum over ranks.
        end_grad = all_reduce_sum(dfinal.float(), ctx.info) if ctx.output_final_state else None
        reaching = linear_local.incoming_gradient(qk, do_k, gk, segments, ctx.scale)
        pending = strategy.scan(reaching, factors, end_grad, ctx, reverse=True, need_end=False)
        # The zero-state, zero-final-gradient backward needs nothing from other ranks.
        grads = ctx.kernel.backward(
            do_k, None, qk, kk, vk, gk, scale=ctx.scale, cu_seqlens=cu, bounds=bounds
        )
        outgoing, _ = pending.wait()
        extra = linear_local.state_gradients(
            qk, kk, vk, gk, do_k, incoming, outgoing, segments, ctx.scale
        )
        dq, dk, dv, dg = (
            None if g is None else (g + e).to(t.dtype)
            for g, e, t in zip(grads[:4], extra, (q, k, v, log_decay))
        )
        dg = None if dg is None else ctx.from_kernel(dg)
        dinit = None
        if fctx.initial_dtype is not None:
            dincoming = reaching + factors * outgoing
            first = dincoming.view(ctx.docs, ctx.slots, *dincoming.shape[1:])[:, 0]
            dinit = first if ctx.info.rank == 0 else torch.zeros_like(first)
            dinit = dinit.to(fctx.initial_dtype)
        grads = (ctx.from_kernel(t) for t in (dq, dk, dv))
        return *grads, dg, dinit, None, None
