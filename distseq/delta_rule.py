"""``distseq.delta_rule``: the exact sequence-parallel gated delta rule over local shards."""

from __future__ import annotations

import torch

from distseq.agreed import AgreedBatch
from distseq.comm import ProcessGroup, resolve_group
from distseq.kernels import select_delta_backend
from distseq.linear_validation import plan_agreed, validated_call
from distseq.strategies import DELTA_STRATEGIES
from distseq.strategies.delta_base import SequenceParallelDeltaRule


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
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
    """The causal gated delta rule of the local shard over the whole sharded sequence.

    Per head ``S_t = exp(g_t)(I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`` and
    ``o_t = scale · q_t S_t`` (flash-linear-attention's ``fused_recurrent_gated_delta_rule``
    with ``use_qk_l2norm_in_kernel=False``; normalise ``k`` yourself for a stable recurrence),
    the state restarting at every document of ``cu_seqlens``. ``q``/``k`` ``[B, S_local, H,
    Dk]``, ``v`` ``[B, S_local, H, Dv]``, ``beta`` ``[B, S_local, H]`` in ``[0, 1]`` and
    ``log_decay`` ``[B, S_local, H]`` (``g_t <= 0``; ``None`` = no decay) are this rank's
    shards in ``layout``; ``cu_seqlens``, ``scale`` (default ``Dk ** -0.5``),
    ``initial_state`` ``[N, H, Dk, Dv]``, ``output_final_state`` and ``group`` behave as in
    :func:`distseq.linear_attention`. Returns ``o`` ``[B, S_local, H, Dv]`` (and the float32
    final state), differentiable in every input. ``strategy`` is one of
    ``available_strategies()["delta_rule"]``; ``backend`` picks the local kernel (``"auto"``,
    ``"torch"``, ``"fla"``).
    """
    impl, ctx = validated_call(
        "distseq.delta_rule", resolve_group(group), DELTA_STRATEGIES, select_delta_backend,
        {"q": q, "k": k, "v": v, "log_decay": log_decay, "initial_state": initial_state,
         "beta": beta},
        {"strategy": strategy, "layout": layout, "cu_seqlens": cu_seqlens, "scale": scale,
         "output_final_state": output_final_state, "backend": backend},
    )  # fmt: skip
    out, final = SequenceParallelDeltaRule.apply(q, k, v, beta, log_decay, initial_state, impl, ctx)
    return (out, final) if output_final_state else out


def delta_rule_agreed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    batch: AgreedBatch,
    *,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`delta_rule` on a batch agreed by :func:`distseq.agreed.agree_batch` (its group,
    layout, documents, linear strategy and backend), with no initial or final state. No
    agreement collective and no host sync: shapes are checked locally once per distinct shape;
    ``beta`` in ``[0, 1]`` and ``log_decay <= 0`` are trusted (the model builds them with
    ``sigmoid`` / ``-softplus``). Shapes as :func:`delta_rule` with batch 1."""
    impl, ctx = plan_agreed(
        "distseq.delta_rule", batch, DELTA_STRATEGIES, select_delta_backend,
        {"q": q, "k": k, "v": v, "log_decay": log_decay, "beta": beta}, scale,
    )  # fmt: skip
    out, _ = SequenceParallelDeltaRule.apply(q, k, v, beta, log_decay, None, impl, ctx)
    return out
