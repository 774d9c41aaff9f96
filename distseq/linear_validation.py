"""Input checks shared by the recurrent ops (``linear_attention``, ``delta_rule``).

Each raises ``ValueError`` naming the value and the fix; the callers run them inside
:func:`distseq.validation.validate_on_all_ranks` so every rank raises together.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from distseq.comm import GroupInfo
from distseq.layout import check_layout, shard_layout
from distseq.strategies.linear_base import LinearContext
from distseq.validation import check_cu_seqlens, check_scale, check_tensors, signature_code

# What the ranks of a group must agree on (see distseq.validation.validate_on_all_ranks).
SIGNATURE = [
    "batch", "local sequence length", "heads", "key head_dim", "value head_dim", "dtype",
    "strategy", "layout", "cu_seqlens", "scale", "log_decay given", "initial_state given",
    "output_final_state",
]  # fmt: skip


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
    ctx = LinearContext(
        info=info,
        shard=shard_layout(lengths, info.world_size, info.rank, layout),
        varlen=cu is not None,
        batch=q.shape[0],
        scale=check_scale(options["scale"], q.shape[-1]),
        kernel=select_kernel(options["backend"], q.device, q.dtype),
        output_final_state=bool(options["output_final_state"]),
    )
    check_initial_state(tensors["initial_state"], q, v, ctx.docs)
    signature = [
        *q.shape, v.shape[3], signature_code(str(q.dtype)),
        signature_code(str(options["strategy"])), signature_code(layout),
        signature_code(str(lengths)), signature_code(repr(ctx.scale)),
        int(tensors["log_decay"] is not None), int(tensors["initial_state"] is not None),
        int(ctx.output_final_state),
    ]  # fmt: skip
    return ctx, signature


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
    if log_decay is None:
        return
    check_tensors({"log_decay": log_decay}, 3, "[batch, seq, heads]")
    if log_decay.shape != q.shape[:3] or log_decay.device != q.device:
        raise ValueError(
            f"log_decay has shape {tuple(log_decay.shape)} on {log_decay.device}; expected "
            f"{tuple(q.shape[:3])} ([batch, seq, heads] of q) on {q.device}"
        )
    if not bool(((log_decay <= 0) & log_decay.isfinite()).all()):
        raise ValueError(
            "log_decay must be finite and <= 0 (the natural log of a decay in (0, 1]); "
            "e.g. pass -softplus(x) or logsigmoid(x)"
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
    check_tensors({"beta": beta}, 3, "[batch, seq, heads]")
    if beta.shape != q.shape[:3] or beta.device != q.device:
        raise ValueError(
            f"beta has shape {tuple(beta.shape)} on {beta.device}; expected "
            f"{tuple(q.shape[:3])} ([batch, seq, heads] of q) on {q.device}"
        )
    if not bool(((beta >= 0) & (beta <= 1)).all()):
        raise ValueError(
            "beta must lie in [0, 1] (a write strength; outside it the state can grow "
            "without bound); e.g. pass sigmoid(x)"
        )
