"""Sequence-parallel delta rule: the registry of its strategies and their autograd function.

The delta rule ``S_t = exp(g_t)(I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`` mixes the key
dimension, so a piece of the sequence maps an incoming state *affinely*, ``S_out = A S_in + M``
with ``A`` ``[Dk, Dk]``. The strategies are the linear-attention ones
(:mod:`distseq.strategies.linear_base`) with a matrix transition:

1. *prepare*: the local kernel's :func:`~distseq.kernels.delta_torch.prepare` gives every
   local piece's ``(A, M)`` (the chunk recurrence);
2. *exchange*: the exclusive scan ``S_in(p+1) = A_p S_in(p) + M_p`` (the strategy's
   :meth:`~distseq.strategies.linear_base.LinearStrategy.scan`), posted before the query-side
   matmuls run (zero-state output ``o0`` and effective queries ``q̃``, ``o = o0 +
   scale · q̃ S_in``), so they overlap;
3. *apply*: ``o += scale · q̃_t S_in``.

Backward: the gradient reaching each ``S_in`` from the outputs, ``R = Σ_t scale · q̃_tᵀ do_t``,
goes through the reversed scan with ``Aᵀ`` (``dS_in = Aᵀ dS_out + R``), giving every piece its
outgoing state's gradient; the kernel's backward from ``S_in`` with ``dS_out`` then gives all
input gradients and ``dS_in``. ``R`` needs only the saved ``q̃``, so the backward exchange is
posted first; the kernel's backward needs its result, so unlike the scalar case's nothing
overlaps it there (splitting the backward into a zero-state and a state part would, at the
price of a second local backward).
"""

from __future__ import annotations

import torch

from distseq.comm import all_reduce_sum
from distseq.strategies import linear_local
from distseq.strategies.linear_base import LinearContext, LinearStrategy
from distseq.strategies.registry import Registry

DELTA_STRATEGIES: Registry[LinearStrategy] = Registry("delta rule", default="lasp2")
register_delta_strategy = DELTA_STRATEGIES.register


class SequenceParallelDeltaRule(torch.autograd.Function):
    """Any registered delta strategy's forward and backward under autograd.

    Returns ``o`` and the final states ``[docs, H, Dk, Dv]`` (float32; empty unless
    ``ctx.output_final_state``), with the gradient conventions of
    :class:`~distseq.strategies.linear_base.SequenceParallelLinearAttention`.
    """

    @staticmethod
    def forward(fctx, q, k, v, beta, log_decay, initial_state, strategy: LinearStrategy, ctx):
        inputs = _kernel_inputs(ctx, q, k, v, beta, log_decay)
        cu, bounds = ctx.kernel_cu_seqlens(q.device), ctx.kernel_bounds()
        prepared = ctx.kernel.prepare(*inputs, scale=ctx.scale, cu_seqlens=cu, bounds=bounds)
        memories, transitions = prepared.memories, prepared.transitions
        start = None if initial_state is None else initial_state.to(memories.dtype)
        pending = strategy.scan(
            memories, transitions, start, ctx, reverse=False, need_end=ctx.output_final_state
        )
        out, queries = prepared.outputs()  # the query-side matmuls overlap the exchange
        incoming, final = pending.wait()
        segments = linear_local.Segments(bounds)
        out = out + linear_local.apply_incoming(queries, incoming, None, segments, ctx.scale)
        fctx.save_for_backward(q, k, v, beta, log_decay, incoming, transitions, queries)
        fctx.strategy, fctx.ctx = strategy, ctx
        fctx.initial_dtype = None if initial_state is None else initial_state.dtype
        final = memories.new_zeros(0) if final is None else final
        return ctx.from_kernel(out.to(q.dtype)), final

    @staticmethod
    def backward(fctx, dout, dfinal):
        q, k, v, beta, log_decay, incoming, transitions, queries = fctx.saved_tensors
        strategy, ctx = fctx.strategy, fctx.ctx
        inputs = _kernel_inputs(ctx, q, k, v, beta, log_decay)
        do_k = ctx.to_kernel(dout.contiguous())
        cu, bounds = ctx.kernel_cu_seqlens(q.device), ctx.kernel_bounds()
        # Every rank returned the final state, so its gradient is the sum over ranks.
        end_grad = all_reduce_sum(dfinal.float(), ctx.info) if ctx.output_final_state else None
        reaching = linear_local.incoming_gradient(
            queries, do_k, None, linear_local.Segments(bounds), ctx.scale
        )
        pending = strategy.scan(
            reaching, transitions.mT.contiguous(), end_grad, ctx, reverse=True, need_end=False
        )
        outgoing, _ = pending.wait()
        dq, dk, dv, dbeta, dg, dincoming = ctx.kernel.backward(
            do_k, outgoing, *inputs, scale=ctx.scale, initial_state=incoming, cu_seqlens=cu,
            bounds=bounds,
        )  # fmt: skip
        dinit = None
        if fctx.initial_dtype is not None:
            first = dincoming.view(ctx.docs, ctx.slots, *dincoming.shape[1:])[:, 0]
            dinit = first if ctx.info.rank == 0 else torch.zeros_like(first)
            dinit = dinit.to(fctx.initial_dtype)
        dg = None if log_decay is None else ctx.from_kernel(dg).to(log_decay.dtype)
        pairs = zip((dq, dk, dv, dbeta), (q, k, v, beta))
        grads = (ctx.from_kernel(g).to(t.dtype) for g, t in pairs)
        return *grads, dg, dinit, None, None


def _kernel_inputs(ctx: LinearContext, q, k, v, beta, log_decay) -> list[torch.Tensor | None]:
    """``q, k, v, beta, log_decay`` in the kernel view (the log decay in float32)."""
    g = None if log_decay is None else log_decay.float()
    return [ctx.to_kernel(t) for t in (q, k, v, beta, g)]
