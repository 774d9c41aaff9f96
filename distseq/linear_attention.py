"""``distseq.linear_attention``: exact sequence-parallel linear attention over local shards."""

from __future__ import annotations

import torch

from distseq.agreed import AgreedBatch
from distseq.comm import ProcessGroup, resolve_group
from distseq.kernels import select_linear_backend
from distseq.linear_validation import plan_agreed, validated_call
from distseq.strategies import LINEAR_STRATEGIES
from distseq.strategies.linear_base import SequenceParallelLinearAttention


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    strategy: str = "lasp2",
    group: ProcessGroup | None = None,
    log_decay: torch.Tensor | None = None,
    layout: str = "contiguous",
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal (decayed) linear attention of the local shard over the whole sharded sequence.

    Per head ``S_t = exp(g_t) S_{t-1} + k_tᵀ v_t`` and ``o_t = scale · q_t S_t`` (``scale``
    defaults to ``Dk ** -0.5``), the state restarting at every document of ``cu_seqlens``.
    ``q``/``k`` ``[B, S_local, H, Dk]``, ``v`` ``[B, S_local, H, Dv]`` and ``log_decay``
    ``[B, S_local, H]`` (``g_t <= 0``; ``None`` = no decay) are this rank's shards in
    ``layout``; ``cu_seqlens`` are the *global* int32 document boundaries (batch 1), as in
    :func:`distseq.attention`.

    ``initial_state`` ``[N, H, Dk, Dv]`` (``N`` = batch, or documents with ``cu_seqlens``) is
    the state before each row/document; every rank passes the same tensor and only rank 0's
    copy receives its gradient (so summing over ranks, as data parallelism does, is exact).
    With ``output_final_state`` it returns ``(o, final_state)``: the float32 state
    ``[N, H, Dk, Dv]`` after each row/document, the same on every rank; its gradient is summed
    over the ranks (like :func:`distseq.gather_sequence`). Otherwise returns ``o``
    ``[B, S_local, H, Dv]``, differentiable. ``strategy`` is one of
    ``available_strategies()["linear_attention"]``; ``backend`` picks the local chunked kernel
    (``"auto"``, ``"torch"``, ``"triton"``, ``"fla"``). ``group=None`` means WORLD.
    """
    impl, ctx = validated_call(
        "distseq.linear_attention", resolve_group(group), LINEAR_STRATEGIES,
        select_linear_backend,
        {"q": q, "k": k, "v": v, "log_decay": log_decay, "initial_state": initial_state},
        {"strategy": strategy, "layout": layout, "cu_seqlens": cu_seqlens, "scale": scale,
         "output_final_state": output_final_state, "backend": backend},
    )  # fmt: skip
    out, final = SequenceParallelLinearAttention.apply(q, k, v, log_decay, initial_state, impl, ctx)
    return (out, final) if output_final_state else out


def linear_attention_agreed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: AgreedBatch,
    *,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`linear_attention` on a batch agreed by :func:`distseq.agreed.agree_batch` (its
    group, layout, documents, strategy and backend), with no initial or final state. Makes no
    agreement collective and no host sync: shapes are checked locally once per distinct shape,
    and ``log_decay``'s values are trusted to be ``<= 0`` (the caller builds them so, e.g. with
    ``logsigmoid``). ``q``/``k`` ``[1, S_local, H, Dk]``, ``v`` ``[1, S_local, H, Dv]``,
    ``log_decay`` ``[1, S_local, H]`` -> ``[1, S_local, H, Dv]``."""
    impl, ctx = plan_agreed(
        "distseq.linear_attention", batch, LINEAR_STRATEGIES, select_linear_backend,
        {"q": q, "k": k, "v": v, "log_decay": log_decay}, scale,
    )  # fmt: skip
    out, _ = SequenceParallelLinearAttention.apply(q, k, v, log_decay, None, impl, ctx)
    return out
