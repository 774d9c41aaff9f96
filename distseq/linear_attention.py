"""``distseq.linear_attention``: exact sequence-parallel linear attention over local shards."""

from __future__ import annotations

import torch

from distseq.agreed import AgreedBatch
from distseq.comm import GroupInfo, ProcessGroup, resolve_group
from distseq.kernels import select_linear_backend
from distseq.layout import check_layout, shard_layout
from distseq.strategies import LINEAR_STRATEGIES
from distseq.strategies.linear_base import LinearContext, SequenceParallelLinearAttention
from distseq.validation import (
    check_cu_seqlens,
    check_scale,
    check_tensors,
    signature_code,
    validate_on_all_ranks,
)

_SIGNATURE = [
    "batch", "local sequence length", "heads", "key head_dim", "value head_dim", "dtype",
    "strategy", "layout", "cu_seqlens", "scale", "log_decay given", "initial_state given",
    "output_final_state",
]  # fmt: skip


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_tensors({"q": q, "k": k, "v": v}, 4, "[batch, seq, heads, head_dim]")
    if q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: q and k must have "
            "the same shape [B, S, H, Dk] and v the same batch, sequence and heads [B, S, H, Dv]"
        )


def _check_log_decay_shape(log_decay: torch.Tensor | None, q: torch.Tensor) -> None:
    if log_decay is None:
        return
    check_tensors({"log_decay": log_decay}, 3, "[batch, seq, heads]")
    if log_decay.shape != q.shape[:3] or log_decay.device != q.device:
        raise ValueError(
            f"log_decay has shape {tuple(log_decay.shape)} on {log_decay.device}; expected "
            f"{tuple(q.shape[:3])} ([batch, seq, heads] of q) on {q.device}"
        )


def _check_log_decay(log_decay: torch.Tensor | None, q: torch.Tensor) -> None:
    _check_log_decay_shape(log_decay, q)
    # Reading the values is a host sync: the agreed (model) path skips this check.
    if log_decay is not None and not bool(((log_decay <= 0) & log_decay.isfinite()).all()):
        raise ValueError(
            "log_decay must be finite and <= 0 (the natural log of a decay in (0, 1]); "
            "e.g. pass -softplus(x) or logsigmoid(x)"
        )


def _check_initial_state(state: torch.Tensor | None, q, v, docs: int) -> None:
    if state is None:
        return
    check_tensors({"initial_state": state}, 4, "[documents, heads, Dk, Dv]")
    expected = (docs, q.shape[2], q.shape[3], v.shape[3])
    if tuple(state.shape) != expected or state.device != q.device:
        raise ValueError(
            f"initial_state has shape {tuple(state.shape)} on {state.device}; expected "
            f"{expected} on {q.device} (one state per batch row, or per document with "
            "cu_seqlens, [N, heads, Dk, Dv])"
        )


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
    info = resolve_group(group)
    built: dict[str, object] = {}

    def check() -> list[int]:
        check_layout(layout)
        impl = LINEAR_STRATEGIES.check(strategy, info.world_size, layout)
        _check_qkv(q, k, v)
        _check_log_decay(log_decay, q)
        lengths = check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1], info.world_size, layout)
        ctx = _context(q, info, lengths, layout, cu_seqlens is not None, scale, backend,
                       output_final_state)  # fmt: skip
        _check_initial_state(initial_state, q, v, ctx.docs)
        built.update(impl=impl, ctx=ctx)
        return [
            *q.shape, v.shape[3], signature_code(str(q.dtype)), signature_code(strategy),
            signature_code(layout), signature_code(str(lengths)), signature_code(repr(ctx.scale)),
            int(log_decay is not None), int(initial_state is not None), int(output_final_state),
        ]  # fmt: skip

    validate_on_all_ranks("distseq.linear_attention", info, check, _SIGNATURE)
    out, final = SequenceParallelLinearAttention.apply(
        q, k, v, log_decay, initial_state, built["impl"], built["ctx"]
    )
    return (out, final) if output_final_state else out


def _context(q, info: GroupInfo, lengths, layout, varlen, scale, backend, output_final_state):
    return LinearContext(
        info=info,
        shard=shard_layout(lengths, info.world_size, info.rank, layout),
        varlen=varlen,
        batch=q.shape[0],
        scale=check_scale(scale, q.shape[-1]),
        kernel=select_linear_backend(backend, q.device, q.dtype),
        output_final_state=bool(output_final_state),
    )


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

    def plan():
        impl = LINEAR_STRATEGIES.check(batch.linear_strategy, batch.info.world_size, batch.layout)
        _check_qkv(q, k, v)
        _check_log_decay_shape(log_decay, q)
        batch.check_local_shape("distseq.linear_attention", q.shape[0], q.shape[1])
        ctx = _context(q, batch.info, batch.doc_lengths, batch.layout, True, scale,
                       batch.linear_backend, False)  # fmt: skip
        return impl, ctx

    decay = None if log_decay is None else (log_decay.shape, log_decay.dtype, log_decay.device)
    key = ("linear_attention", q.shape, k.shape, v.shape, q.dtype, q.device, decay, scale)
    impl, ctx = batch.plan(key, plan)
    out, _ = SequenceParallelLinearAttention.apply(q, k, v, log_decay, None, impl, ctx)
    return out
