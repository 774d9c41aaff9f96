"""``usp``: Ulysses inside, ring across (2-D sequence parallelism, as USP / LoongTrain).

The ``P`` ranks form ``r = P/u`` *Ulysses groups* of ``u`` consecutive ranks (the same node
when ranks are numbered node by node) and ``u`` *ring groups* of the ranks ``i, i+u, i+2u, ...``
(one per node, so ring hops cross nodes). Rank ``j·u + i`` is member ``i`` of Ulysses group
``j`` and position ``j`` of ring group ``i``.

Why this is exact with the ordinary layouts: sharding a document into ``P`` (contiguous) or
``2P`` (zigzag) chunks, the union of the shards of Ulysses group ``j`` is exactly ring position
``j``'s shard of the same layout over ``r`` ranks (chunks ``u`` times longer). So usp is

1. an all-to-all inside the Ulysses group (sequence -> heads, as ``ulysses``), the gathered
   tokens permuted into that ring-level shard's order;
2. the ``ring`` strategy over the ring group, ``Hq/u`` query heads, on the ring-level shard;
3. the inverse all-to-all. Backward mirrors it.

K/V heads are replicated to ``lcm(Hkv, u)`` before the all-to-all (as in ``ulysses``), their
gradients summed back.

Communication runs point-to-point on the caller's group through strided sub-groups
(:meth:`distseq.comm.GroupInfo.subgroup`): no ``new_group`` (a collective over the world,
cached per group and never freed) and any parent group works, on gloo as on NCCL. The cost: on
NCCL the Ulysses all-to-all is ``u - 1`` batched sends/receives instead of one
``all_to_all_single`` on a sub-communicator; NCCL itself runs its all-to-all as grouped
send/receive, so the bytes and the pattern are the same.
Bytes: :meth:`UspAttention.traffic`.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from distseq.comm import GroupInfo
from distseq.layout import ShardLayout, shard_layout
from distseq.strategies.base import AttentionContext, AttentionStrategy, register_attention_strategy
from distseq.strategies.ring import RingAttention
from distseq.strategies.ulysses import (
    UlyssesAttention,
    replicate_kv,
    sent_kv_heads,
    sum_kv_replicas,
    to_heads,
    to_sequence,
)
from distseq.traffic import Traffic


def ranks_per_node(world_size: int) -> int:
    """Ranks sharing a node: ``LOCAL_WORLD_SIZE`` (set by torchrun), else the CUDA devices
    visible, else ``world_size`` (CPU processes started on one machine)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local:
        return int(local)
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.cuda.device_count()
    return world_size


def resolve_ulysses_degree(world_size: int, q_heads: int, ulysses_degree: int | None) -> int:
    """``ulysses_degree``, or by default the largest divisor of ``world_size`` that divides
    ``q_heads`` and is at most :func:`ranks_per_node` (all-to-all stays inside a node)."""
    if ulysses_degree is not None:
        return ulysses_degree
    limit = ranks_per_node(world_size)
    return max(u for u in ulysses_degrees(world_size, q_heads) if u <= limit)


def ulysses_degrees(world_size: int, q_heads: int) -> list[int]:
    """Every valid Ulysses degree of a ``world_size`` group with ``q_heads`` query heads."""
    return [u for u in range(1, world_size + 1) if world_size % u == 0 == q_heads % u]


def planned_name(ulysses_degree: int) -> str:
    """The name a plan gives usp at one degree (``"usp:2"``): plans pick the degree too."""
    return f"{UspAttention.name}:{ulysses_degree}"


def split_planned(name: str) -> tuple[str, int | None]:
    """A plan's strategy name -> ``(registered name, ulysses_degree)``; ``None`` unless usp."""
    base, _, degree = name.partition(":")
    return (base, int(degree)) if degree else (base, None)


@functools.lru_cache(maxsize=256)
def _ring_order(
    shard: ShardLayout, u: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(order, inverse)`` on ``device`` taking the Ulysses group's tokens (its ``u`` shards
    concatenated, rank-major) to ring-level shard order and back (``None`` where that is the
    identity). Built and copied once per shard, degree and device, like
    :func:`distseq.layout.shard_tensor`: a copy per layer would stall a GPU's stream."""
    j = shard.rank // u
    gathered = torch.cat([shard.positions_of(j * u + t) for t in range(u)])
    ring = shard_layout(shard.doc_lengths, shard.world_size // u, j, shard.layout).positions
    ascending, index = torch.sort(gathered)
    order = index[torch.searchsorted(ascending, ring)]
    if torch.equal(order, torch.arange(len(order))):
        return None, None
    return order.to(device), torch.argsort(order).to(device)


@dataclasses.dataclass(frozen=True)
class _Levels:
    """The two levels one rank runs: its Ulysses group and its ring (as a context)."""

    ulysses: GroupInfo
    ring: AttentionContext
    order: torch.Tensor | None
    inverse: torch.Tensor | None


def _levels(ctx: AttentionContext, q_heads: int, device: torch.device) -> _Levels:
    info = ctx.info
    p = info.world_size
    u = resolve_ulysses_degree(p, q_heads, ctx.ulysses_degree)
    j, i = divmod(info.rank, u)

    def sub(members: range) -> GroupInfo:
        return info if len(members) == p else info.subgroup(tuple(members))

    ring_info = sub(range(i, p, u))
    ring_shard = shard_layout(ctx.shard.doc_lengths, p // u, j, ctx.shard.layout)
    ring = dataclasses.replace(ctx, info=ring_info, shard=ring_shard)
    return _Levels(sub(range(j * u, (j + 1) * u)), ring, *_ring_order(ctx.shard, u, device))


_RING = RingAttention()


@register_attention_strategy
class UspAttention(AttentionStrategy):
    name = "usp"

    def check_group(self, world_size, q_heads, kv_heads, layout, ulysses_degree=None) -> None:
        """``ulysses_degree`` ``u`` (default: the largest divisor of ``P`` and ``Hq`` not above
        the ranks per node) divides ``P`` and ``Hq``; K/V heads are replicated up to
        ``lcm(Hkv, u)``."""
        AttentionStrategy.check_group(self, world_size, q_heads, kv_heads, layout)
        u = resolve_ulysses_degree(world_size, q_heads, ulysses_degree)
        valid = ulysses_degrees(world_size, q_heads)
        if isinstance(u, bool) or not isinstance(u, int) or u not in valid:
            raise ValueError(
                f"usp: ulysses_degree={u!r} must be a positive integer dividing both the group "
                f"size {world_size} and the {q_heads} query heads; use one of {valid} "
                "(or None for the default)"
            )

    def traffic(
        self, p, s_local, q_heads, kv_heads, head_dim, elem, ulysses_degree=None
    ) -> Traffic:
        """Ulysses over ``u`` ranks plus ring over ``r = P/u``, ``H'kv = lcm(Hkv, u)``: each
        pass ``(u-1)/u·S_local·D·(2Hq+2H'kv)·e``, plus forward ``(r-1)·2n·e`` and backward
        ``(r-1)·2n·(e+4)``, ``n = S_local·H'kv·D``."""
        a2a, ring = self.level_traffic(
            p, s_local, q_heads, kv_heads, head_dim, elem, ulysses_degree
        )
        return Traffic(a2a.forward + ring.forward, a2a.backward + ring.backward)

    def level_traffic(
        self, p, s_local, q_heads, kv_heads, head_dim, elem, ulysses_degree=None
    ) -> tuple[Traffic, Traffic]:
        """:meth:`traffic` per level: ``(all-to-all inside a Ulysses group, ring across)``."""
        u = resolve_ulysses_degree(p, q_heads, ulysses_degree)
        sent_kv = sent_kv_heads(kv_heads, u)
        a2a = UlyssesAttention().traffic(u, s_local, q_heads, sent_kv, head_dim, elem)
        # The ring holds u·S_local tokens of H'kv/u heads per rank: the same n.
        ring = _RING.traffic(p // u, s_local, q_heads, sent_kv, head_dim, elem)
        return a2a, ring

    def forward(self, q, k, v, ctx: AttentionContext):
        levels = _levels(ctx, q.shape[2], q.device)
        k, v, kv_heads = replicate_kv(k, v, levels.ulysses.world_size)
        qh, kh, vh = to_heads([q, k, v], levels.ulysses, levels.order)
        out_h, saved = _RING.forward(qh, kh, vh, levels.ring)
        (out,) = to_sequence([out_h], levels.ulysses, levels.inverse)
        return out, (*saved, kv_heads)

    def backward(self, dout, saved, ctx: AttentionContext):
        *saved, kv_heads = saved
        levels = _levels(ctx, dout.shape[2], dout.device)
        (dout_h,) = to_heads([dout], levels.ulysses, levels.order)
        dq, dk, dv = _RING.backward(dout_h, tuple(saved), levels.ring)
        dq, dk, dv = to_sequence([dq, dk, dv], levels.ulysses, levels.inverse)
        dk, dv = sum_kv_replicas(dk, dv, kv_heads)
        return dq, dk, dv
