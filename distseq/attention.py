"""``distseq.attention``: exact sequence-parallel softmax attention over local shards."""

from __future__ import annotations

import torch

from distseq.agreed import AgreedBatch
from distseq.comm import GroupInfo, ProcessGroup, resolve_group
from distseq.kernels import select_backend
from distseq.layout import check_layout, shard_layout
from distseq.strategies import ATTENTION_STRATEGIES, DELTA_STRATEGIES, LINEAR_STRATEGIES
from distseq.strategies.base import AttentionContext, SequenceParallelAttention
from distseq.validation import (
    check_cu_seqlens,
    check_qkv,
    check_scale,
    signature_code,
    validate_on_all_ranks,
)

_SIGNATURE = [
    "batch", "local sequence length", "query heads", "key/value heads", "head_dim", "dtype",
    "strategy", "layout", "causal", "cu_seqlens", "scale", "ulysses_degree",
]  # fmt: skip


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    strategy: str = "ring",
    group: ProcessGroup | None = None,
    causal: bool = True,
    layout: str = "zigzag",
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    ulysses_degree: int | None = None,
) -> torch.Tensor:
    """Softmax attention of the local query shard over the whole (sharded) sequence.

    ``q`` ``[B, S_local, Hq, D]``, ``k``/``v`` ``[B, S_local, Hkv, D]`` (``Hq % Hkv == 0``) are
    this rank's shards in ``layout`` (see :mod:`distseq.layout`); ``cu_seqlens`` is the *global*
    int32 document boundary vector (batch 1), attention never crossing documents. Returns the
    local output shard ``[B, S_local, Hq, D]``, exact (up to float rounding) to dense attention
    on the gathered sequence, and differentiable. ``strategy`` is one of
    ``available_strategies()["attention"]``; ``backend`` picks the local block kernel
    (``"auto"``, ``"torch"``, ``"flash"``, ``"triton"``). ``group=None`` means WORLD.
    ``ulysses_degree`` (``strategy="usp"`` only): ranks per Ulysses group, ``None`` = the
    largest divisor of the group size and ``Hq`` within one node (:mod:`distseq.strategies.usp`).
    """
    info = resolve_group(group)
    built: dict[str, object] = {}

    def check() -> list[int]:
        check_layout(layout)
        impl = _checked_strategy(q, k, v, strategy, info, layout, ulysses_degree)
        lengths = check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1], info.world_size, layout)
        varlen = cu_seqlens is not None
        ctx = _context(q, info, lengths, layout, varlen, causal, scale, backend, ulysses_degree)
        built.update(impl=impl, ctx=ctx)
        return [
            *q.shape[:3], k.shape[2], q.shape[3], signature_code(str(q.dtype)),
            signature_code(strategy), signature_code(layout), int(ctx.causal),
            signature_code(str(lengths)), signature_code(repr(ctx.scale)),
            signature_code(repr(ulysses_degree)),
        ]  # fmt: skip

    validate_on_all_ranks("distseq.attention", info, check, _SIGNATURE)
    return SequenceParallelAttention.apply(q, k, v, built["impl"], built["ctx"])


def _checked_strategy(q, k, v, strategy: str, info: GroupInfo, layout: str, ulysses_degree):
    check_qkv(q, k, v)
    return ATTENTION_STRATEGIES.check(
        strategy, info.world_size, q.shape[2], k.shape[2], layout, ulysses_degree
    )


def _context(q, info: GroupInfo, lengths, layout, varlen, causal, scale, backend, ulysses_degree):
    return AttentionContext(
        info=info,
        shard=shard_layout(lengths, info.world_size, info.rank, layout),
        varlen=varlen,
        causal=bool(causal),
        scale=check_scale(scale, q.shape[-1]),
        kernel=select_backend(backend, q.device, q.dtype),
        ulysses_degree=ulysses_degree,
    )


def attention_agreed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: AgreedBatch,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`attention` on a batch agreed by :func:`distseq.agreed.agree_batch`: its group,
    layout, documents, strategy and backend. Makes no agreement collective and no host sync;
    shapes are checked locally once per distinct shape (see :mod:`distseq.agreed`). ``q``
    ``[1, S_local, Hq, D]``, ``k``/``v`` ``[1, S_local, Hkv, D]`` -> ``[1, S_local, Hq, D]``."""

    def plan():
        impl = _checked_strategy(q, k, v, batch.attention_strategy, batch.info, batch.layout,
                                 batch.ulysses_degree)  # fmt: skip
        batch.check_local_shape("distseq.attention", q.shape[0], q.shape[1])
        ctx = _context(q, batch.info, batch.doc_lengths, batch.layout, True, causal, scale,
                       batch.attention_backend, batch.ulysses_degree)  # fmt: skip
        return impl, ctx

    key = ("attention", q.shape, k.shape, v.shape, q.dtype, q.device, bool(causal), scale)
    impl, ctx = batch.plan(key, plan)
    return SequenceParallelAttention.apply(q, k, v, impl, ctx)


def available_strategies() -> dict[str, list[str]]:
    """Registered strategy names per family: ``{"attention": [...], "linear_attention": [...],
    "delta_rule": [...]}``."""
    return {
        "attention": sorted(ATTENTION_STRATEGIES),
        "linear_attention": sorted(LINEAR_STRATEGIES),
        "delta_rule": sorted(DELTA_STRATEGIES),
    }
