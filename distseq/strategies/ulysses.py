"""``ulysses``: all-to-all from sequence shards to head shards, full-sequence attention, back.

Each rank trades its ``[S_local, H]`` shard for a ``[S, H/P]`` slice with one all-to-all of the
packed Q/K/V, restores natural token order (the layout may be zigzag or varlen), runs the local
kernel over the whole sequence for its heads, and sends the output back with a second
all-to-all. Backward mirrors it. Needs ``Hq`` divisible by ``P``
(:meth:`UlyssesAttention.check_group`); when ``Hkv`` is not, each K/V head is replicated only as
far as the all-to-all needs (to ``lcm(Hkv, P)`` heads, which divides ``Hq``, so every query
head still meets its own K/V head) and the replicas' gradients are summed back.
Bytes: :meth:`UlyssesAttention.traffic`.
"""

from __future__ import annotations

import math

import torch

from distseq.comm import GroupInfo, all_to_all
from distseq.layout import shard_tensor
from distseq.strategies.base import AttentionContext, AttentionStrategy, register_attention_strategy
from distseq.traffic import Traffic


def to_heads(
    parts: list[torch.Tensor], info: GroupInfo, order: torch.Tensor | None
) -> list[torch.Tensor]:
    """``[B, S_local, H_i, D]`` shards -> ``[B, P*S_local, H_i/P, D]``: rank ``i`` keeps head
    group ``i`` of every rank's tokens, concatenated rank-major, then reordered by ``order``
    (indices into that concatenation, on the tensors' device; ``None`` keeps it)."""
    p = info.world_size
    # [P (destination), B, S_local, sum_i H_i/P, D]: one message per destination rank.
    packed = torch.cat([t.unflatten(2, (p, -1)).movedim(2, 0) for t in parts], dim=3)
    received = all_to_all(packed, info)  # [P (source), B, S_local, sum H_i/P, D]
    full = received.movedim(0, 1).flatten(1, 2)  # [B, P*S_local, ...] rank-major
    if order is not None:
        full = full.index_select(1, order)
    return list(full.split([t.shape[2] // p for t in parts], dim=2))


def to_sequence(
    parts: list[torch.Tensor], info: GroupInfo, inverse: torch.Tensor | None
) -> list[torch.Tensor]:
    """Inverse of :func:`to_heads` (``inverse`` undoes its ``order``):
    ``[B, P*S_local, H_i/P, D]`` -> ``[B, S_local, H_i, D]``."""
    p = info.world_size
    full = torch.cat(parts, dim=2)
    if inverse is not None:
        full = full.index_select(1, inverse)
    b, s, h, d = full.shape
    packed = full.unflatten(1, (p, s // p)).movedim(1, 0)  # [P (destination), B, S_local, h, D]
    received = all_to_all(packed, info)  # [P (source = head group), B, S_local, h, D]
    merged = received.movedim(0, 2)  # [B, S_local, P, h, D]
    outs, start = [], 0
    for t in parts:
        width = t.shape[2]
        outs.append(merged[:, :, :, start : start + width].flatten(2, 3))
        start += width
    return outs


def sent_kv_heads(kv_heads: int, p: int) -> int:
    """K/V heads after replication: the fewest multiple of ``Hkv`` that ``P`` divides."""
    return math.lcm(kv_heads, p)


def replicate_kv(
    k: torch.Tensor, v: torch.Tensor, p: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k``/``v`` ``[B, S, Hkv, D]`` with each head repeated to ``lcm(Hkv, p)`` heads, and an
    empty tensor whose shape records ``Hkv`` for :func:`sum_kv_replicas` (autograd saves
    only tensors)."""
    kv_heads = k.new_empty(0, k.shape[2])
    copies = sent_kv_heads(k.shape[2], p) // k.shape[2]
    k, v = (t.repeat_interleave(copies, dim=2) for t in (k, v))
    return k, v, kv_heads


def sum_kv_replicas(
    dk: torch.Tensor, dv: torch.Tensor, kv_heads: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each K/V head's gradient ``[B, S, Hkv, D]``: the sum over its replicas."""
    dk, dv = (t.unflatten(2, (kv_heads.shape[1], -1)).sum(3) for t in (dk, dv))
    return dk, dv


def _natural_order(
    ctx: AttentionContext, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(order, inverse)`` on ``device`` for :func:`to_heads`: natural token order of the
    whole sequence (``None`` when the layout already is: contiguous without documents)."""
    if ctx.shard.layout == "contiguous" and not ctx.varlen:
        return None, None
    order = shard_tensor(ctx.shard, "natural_order", device)
    return order, shard_tensor(ctx.shard, "all_positions", device)


def _whole_sequence(ctx: AttentionContext, device: torch.device) -> dict:
    """The kernel's varlen arguments for the whole (natural-order) sequence: the global
    document boundaries on ``device`` and the longest document, known on the host so no
    kernel reads it back from the device (``{}`` without documents)."""
    if not ctx.varlen:
        return {}
    cu = shard_tensor(ctx.shard, "global_cu_seqlens", device)
    longest = max(ctx.shard.doc_lengths)
    return {"cu_seqlens_q": cu, "cu_seqlens_k": cu, "max_seqlen_q": longest,
            "max_seqlen_k": longest}  # fmt: skip


@register_attention_strategy
class UlyssesAttention(AttentionStrategy):
    name = "ulysses"

    def check_group(self, world_size, q_heads, kv_heads, layout, ulysses_degree=None) -> None:
        """``Hq`` divisible by ``P`` (K/V heads are replicated up to ``lcm(Hkv, P)``)."""
        super().check_group(world_size, q_heads, kv_heads, layout, ulysses_degree)
        if q_heads % world_size:
            raise ValueError(
                f"ulysses: {q_heads} query heads are not divisible by the group size "
                f"{world_size}; use a group size dividing {q_heads} or another strategy"
            )

    def traffic(self, p, s_local, q_heads, kv_heads, head_dim, elem) -> Traffic:
        """Each pass ``(P-1)/P·S_local·D·(2Hq+2H'kv)·e``, ``H'kv = lcm(Hkv, P)``: Q/K/V out
        and O back; dO out and dQ/dK/dV back."""
        sent_kv = sent_kv_heads(kv_heads, p)
        # Each all-to-all keeps 1/P of its buffer; heads divide by P, so this is exact.
        per_pass = (p - 1) * s_local * head_dim * elem * (2 * q_heads + 2 * sent_kv) / p
        return Traffic(per_pass, per_pass)

    def forward(self, q, k, v, ctx: AttentionContext):
        k, v, kv_heads = replicate_kv(k, v, ctx.info.world_size)
        order, inverse = _natural_order(ctx, q.device)
        qh, kh, vh = to_heads([q, k, v], ctx.info, order)
        out_h, lse_h = ctx.kernel.forward(
            qh, kh, vh, scale=ctx.scale, causal=ctx.causal, **_whole_sequence(ctx, q.device)
        )
        (out,) = to_sequence([out_h], ctx.info, inverse)
        return out, (qh, kh, vh, out_h, lse_h, kv_heads)

    def backward(self, dout, saved, ctx: AttentionContext):
        qh, kh, vh, out_h, lse_h, kv_heads = saved
        order, inverse = _natural_order(ctx, dout.device)
        (dout_h,) = to_heads([dout], ctx.info, order)
        dq, dk, dv = ctx.kernel.backward(
            dout_h, qh, kh, vh, out_h, lse_h, scale=ctx.scale, causal=ctx.causal,
            **_whole_sequence(ctx, dout.device),
        )  # fmt: skip
        dq, dk, dv = to_sequence([dq, dk, dv], ctx.info, inverse)
        dk, dv = sum_kv_replicas(dk, dv, kv_heads)
        return dq, dk, dv
