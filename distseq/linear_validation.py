"""Input checks shared by the recurrent ops (``linear_attention``, ``delta_rule``).

Each raises ``ValueError`` naming the value and the fix; the callers run them inside
:func:`distseq.validation.validate_on_all_ranks` so every rank raises together.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from distseq.agreed import AgreedBatch
from distseq.comm import GroupInfo
from distseq.layout import check_layout, shard_layout
from distseq.strategies.linear_base import LinearContext, LinearStrategy
from distseq.strategies.registry import Registry
from distseq.validation import (
    check_cu_seqlens,
    check_scale,
    check_tensors,
    signature_code,
    validate_on_all_ranks,
)

# What the ranks of a group must agree on (see distseq.validation.validate_on_all_ranks).
SIGNATURE = [
    "batch", "local sequence length", "heads", "key head_dim", "value head_dim", "dtype",
    "strategy", "layout", "cu_seqlens", "scale", "log_decay given", "initial_state given",
    "output_final_state",
]  # fmt: skip


def validated_call(
    op: str,
    info: GroupInfo,
    registry: Registry,
    select_kernel: Callable[[str, torch.device, torch.dtype], ModuleType],
    tensors: dict[str, torch.Tensor | None],
    options: dict[str, object],
) -> tuple[LinearStrategy, LinearContext]:
    """Check a recurrent op's call and agree on it across ``info``'s group (every rank raises
    together: :func:`distseq.validation.validate_on_all_ranks`); returns the strategy and
    context. ``tensors`` and ``options`` as :func:`check_call`; ``tensors`` may add ``beta``
    (the delta rule's, checked too)."""
    built: dict[str, object] = {}

    def check() -> list[int]:
        check_layout(options["layout"])
        impl = registry.check(options["strategy"], info.world_size, options["layout"])
        ctx, signature = check_call(info, tensors, options, select_kernel)
        if "beta" in tensors:
            check_beta(tensors["beta"], tensors["q"])
        built.update(impl=impl, ctx=ctx)
        return signature

    validate_on_all_ranks(op, info, check, SIGNATURE)
    return built["impl"], built["ctx"]


def check_call(
    info: GroupInfo,
    tensors: dict[str, torch.Tensor | None],
    options: dict[str, object],
    select_kernel: Callable[[str, torch.device, torch.dtype], ModuleType],
) -> tuple[LinearContext, list[int]]:
    """Check a recurrent op's call and build its context; returns it and the signature.

    ``tensors``: ``q, k, v, log_decay, initial_state``; ``options``: ``strategy, layout,
    cu_seqlens, scale, output_final_state, backend`` (the strategy is checked by the caller).
    """
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    layout, cu = options["layout"], options["cu_seqlens"]
    check_layout(layout)
    check_qkv(q, k, v)
    check_log_decay(tensors["log_decay"], q)
    lengths = check_cu_seqlens(cu, q.shape[0], q.shape[1], info.world_size, layout)
    ctx = _context(
        info, q, lengths, layout, cu is not None, options["scale"],
        select_kernel(options["backend"], q.device, q.dtype), options["output_final_state"],
    )  # fmt: skip
    check_initial_state(tensors["initial_state"], q, v, ctx.docs)
    signature = [
        *q.shape, v.shape[3], signature_code(str(q.dtype)),
        signature_code(str(options["strategy"])), signature_code(layout),
        signature_code(str(lengths)), signature_code(repr(ctx.scale)),
        int(tensors["log_decay"] is not None), int(tensors["initial_state"] is not None),
        int(ctx.output_final_state),
    ]  # fmt: skip
    return ctx, signature


def _context(
    info: GroupInfo, q: torch.Tensor, lengths: tuple[int, ...], layout: str, varlen: bool,
    scale: float | None, kernel: ModuleType, output_final_state: bool,
) -> LinearContext:  # fmt: skip
    return LinearContext(
        info=info,
        shard=shard_layout(lengths, info.world_size, info.rank, layout),
        varlen=varlen,
        batch=q.shape[0],
        scale=check_scale(scale, q.shape[-1]),
        kernel=kernel,
        output_final_state=bool(output_final_state),
    )


def plan_agreed(
    op: str,
    batch: AgreedBatch,
    registry: Registry,
    select_kernel: Callable[[str, torch.device, torch.dtype], ModuleType],
    tensors: dict[str, torch.Tensor | None],
    scale: float | None,
) -> tuple[LinearStrategy, LinearContext]:
    """Strategy and context of a recurrent op's call on an agreed batch (no initial or final
    state): local shape checks only, once per distinct shape (cached in ``batch``), and no
    host sync, so value checks (``log_decay <= 0``, ``beta`` in ``[0, 1]``) are skipped: the
    model path builds those values in range (``logsigmoid``, ``sigmoid``).
    ``tensors``: ``q, k, v, log_decay`` and optionally ``beta``."""
    q, k, v = tensors["q"], tensors["k"], tensors["v"]

    def build() -> tuple[LinearStrategy, LinearContext]:
        impl = registry.check(batch.linear_strategy, batch.info.world_size, batch.layout)
        check_qkv(q, k, v)
        check_log_decay_shape(tensors["log_decay"], q)
        if "beta" in tensors:
            check_beta_shape(tensors["beta"], q)
        batch.check_local_shape(op, q.shape[0], q.shape[1])
        kernel = select_kernel(batch.linear_backend, q.device, q.dtype)
        ctx = _context(batch.info, q, batch.doc_lengths, batch.layout, True, scale, kernel, False)
        return impl, ctx

    described = tuple(
        None if t is None else (name, t.shape, t.dtype, t.device) for name, t in tensors.items()
    )
    return batch.plan((op, described, scale), build)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """``q``/``k`` ``[B, S, H, Dk]`` and ``v`` ``[B, S, H, Dv]``, one dtype and device."""
    check_tensors({"q": q, "k": k, "v": v}, 4, "[batch, seq, heads, head_dim]")
    if q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: q and k must have "
            "the same shape [B, S, H, Dk] and v the same batch, sequence and heads [B, S, H, Dv]"
        )


def check_log_decay(log_decay: torch.Tensor | None, q: torch.Tensor) -> None:
    """``None``, or finite ``g <= 0`` ``[B, S, H]`` on ``q``'s device."""
    check_log_decay_shape(log_decay, q)
    # Reading the values is a host sync: the agreed (model) path checks only the shape.
    if log_decay is not None and not bool(((log_decay <= 0) & log_decay.isfinite()).all()):
        raise ValueError(
            "log_decay must be finite and <= 0 (the natural log of a decay in (0, 1]); "
            "e.g. pass -softplus(x) or logsigmoid(x)"
        )


def check_log_decay_shape(log_decay: torch.Tensor | None, q: torch.Tensor) -> None:
    """``None``, or a floating ``[B, S, H]`` tensor on ``q``'s device."""
    if log_decay is None:
        return
    check_tensors({"log_decay": log_decay}, 3, "[batch, seq, heads]")
    if log_decay.shape != q.shape[:3] or log_decay.device != q.device:
        raise ValueError(
            f"log_decay has shape {tuple(log_decay.shape)} on {log_decay.device}; expected "
            f"{tuple(q.shape[:3])} ([batch, seq, heads] of q) on {q.device}"
        )


def check_initial_state(
    state: torch.Tensor | None, q: torch.Tensor, v: torch.Tensor, docs: int
) -> None:
    """``None``, or ``[docs, H, Dk, Dv]`` on ``q``'s device."""
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


def check_beta(beta: torch.Tensor, q: torch.Tensor) -> None:
    """The delta rule's write strengths: ``[B, S, H]`` of ``q``, on its device, in ``[0, 1]``."""
    check_beta_shape(beta, q)
    if not bool(((beta >= 0) & (beta <= 1)).all()):
        raise ValueError(
            "beta must lie in [0, 1] (a write strength; outside it the state can grow "
            "without bound); e.g. pass sigmoid(x)"
        )


def check_beta_shape(beta: torch.Tensor, q: torch.Tensor) -> None:
    """``beta`` is a floating ``[B, S, H]`` tensor (``q``'s) on ``q``'s device."""
    check_tensors({"beta": beta}, 3, "[batch, seq, heads]")
    if beta.shape != q.shape[:3] or beta.device != q.device:
        raise ValueError(
            f"beta has shape {tuple(beta.shape)} on {beta.device}; expected "
            f"{tuple(q.shape[:3])} ([batch, seq, heads] of q) on {q.device}"
        )
