"""Communication primitives of the strategies: process groups, P2P, collectives, agreement.

Every byte a strategy moves goes through the ``torch.distributed`` calls made here, looked up
on the module at call time so :class:`distseq.comm.CommCounter` and
:class:`distseq.comm.CommRecorder` can wrap them (:data:`distseq.comm.hooks.DATA_OPS`).
Asynchronous ops return handles so callers post communication, compute, then wait.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from distseq.comm.hooks import control_plane

ProcessGroup = dist.ProcessGroup
# Point-to-point all-to-alls on a strided sub-group use their own tag, apart from the rings'.
_ALL_TO_ALL_TAG = 7


@dataclass(frozen=True)
class GroupInfo:
    """A process group as seen by this rank (``group`` is ``None`` when single-process).

    ``members``, when set, makes this a *strided sub-group* of ``group``: sub-group rank ``i``
    is ``group``'s rank ``members[i]``. It talks point-to-point on ``group`` (so it needs no
    ``new_group`` of its own): :class:`RingExchange`, :func:`post_p2p` and :func:`all_to_all`
    accept it; the other collectives refuse it.
    """

    group: ProcessGroup | None
    rank: int
    world_size: int
    members: tuple[int, ...] | None = None

    def global_rank(self, group_rank: int) -> int:
        parent_rank = group_rank if self.members is None else self.members[group_rank]
        if self.group is None:
            return parent_rank
        return dist.get_global_rank(self.group, parent_rank)

    def subgroup(self, members: tuple[int, ...]) -> GroupInfo:
        """The strided sub-group of this group's ranks ``members`` (this rank among them)."""
        if self.members is not None:
            raise ValueError("a sub-group of a sub-group is not supported; derive both from one")
        return GroupInfo(self.group, members.index(self.rank), len(members), tuple(members))


def resolve_group(group: ProcessGroup | None) -> GroupInfo:
    """Rank and size of this process in ``group`` (``None`` = WORLD, or one process).

    Raises ``ValueError`` when this rank is not a member of ``group``.
    """
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError(
                "a process group was given but torch.distributed is not initialized; "
                "call torch.distributed.init_process_group first or pass group=None"
            )
        return GroupInfo(None, 0, 1)
    group = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"global rank {dist.get_rank()} is not a member of the given process group "
            f"(ranks {dist.get_process_group_ranks(group)}); call the op only on its members "
            "or pass a group containing this rank"
        )
    return GroupInfo(group, rank, dist.get_world_size(group))


class RingExchange:
    """Send tensors to the next rank and receive same-shaped ones from the previous rank.

    Protocol: ``post(tensors)`` issues all sends/receives at once (``batch_isend_irecv``) and
    returns immediately; compute; then ``wait()`` returns the received tensors. The tensors
    passed to ``post`` must not be modified until ``wait`` returns. Rings in flight at the
    same time use distinct ``tag``s so their messages can never pair up with each other.
    """

    def __init__(self, info: GroupInfo, tag: int = 0) -> None:
        self.info = info
        self.tag = tag
        self._next = info.global_rank((info.rank + 1) % info.world_size)
        self._prev = info.global_rank((info.rank - 1) % info.world_size)
        self._pending: list[dist.Work] = []
        self._received: list[torch.Tensor] = []

    def post(self, tensors: list[torch.Tensor]) -> None:
        if self._pending:
            raise RuntimeError("RingExchange.post called twice without wait()")
        # Contiguous buffers: the backends send raw memory (empty_like would keep strides).
        tensors = [t.contiguous() for t in tensors]
        self._received = [torch.empty_like(t) for t in tensors]
        group, tag = self.info.group, self.tag
        ops = [dist.P2POp(dist.isend, t, self._next, group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self._prev, group, tag) for t in self._received]
        self._pending = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        for work in self._pending:
            work.wait()
        self._pending = []
        return self._received


def post_p2p(
    sends: list[tuple[torch.Tensor, int, int]],
    recvs: list[tuple[torch.Tensor, int, int]],
    info: GroupInfo,
) -> list[dist.Work]:
    """Post point-to-point messages at once; ``(tensor, group_rank, tag)`` each.

    Returns the handles to wait on. Sent tensors must be contiguous and stay unmodified, and
    received ones contiguous and unread, until their handles are waited on.
    """
    ops = [dist.P2POp(dist.isend, t, info.global_rank(r), info.group, tag) for t, r, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, info.global_rank(r), info.group, tag) for t, r, tag in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


def _collective_group(info: GroupInfo) -> ProcessGroup | None:
    """The process group a collective runs on; a strided sub-group has none of its own."""
    if info.members is not None:
        raise ValueError(
            f"collective on a strided sub-group (ranks {list(info.members)} of its parent): "
            "only point-to-point exchanges and all_to_all support it; create a process group"
        )
    return info.group


def all_reduce_sum(x: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """The sum of ``x`` over the ranks of the group (a new tensor)."""
    out = x.contiguous().clone()
    if info.world_size > 1:
        dist.all_reduce(out, group=_collective_group(info))
    return out


def broadcast(x: torch.Tensor, source: int, info: GroupInfo) -> torch.Tensor:
    """Group rank ``source``'s ``x`` on every rank (``x`` gives the shape elsewhere)."""
    out = x.contiguous().clone()
    if info.world_size > 1:
        dist.broadcast(out, info.global_rank(source), group=_collective_group(info))
    return out


def all_gather_async(x: torch.Tensor, info: GroupInfo) -> tuple[torch.Tensor, dist.Work | None]:
    """Start gathering ``x`` from every rank into ``[world_size, *x.shape]``; wait on the handle."""
    if info.world_size == 1:
        return x.unsqueeze(0).clone(), None
    # gloo wants the output concatenated along dim 0, not stacked.
    flat = x.new_empty((info.world_size * x.shape[0], *x.shape[1:]))
    group = _collective_group(info)
    work = dist.all_gather_single(flat, x.contiguous(), group=group, async_op=True)
    return flat.view(info.world_size, *x.shape), work


def reduce_scatter(stacked: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """Sum ``stacked`` ``[world_size, ...]`` over ranks and return this rank's slice ``[...]``."""
    if info.world_size == 1:
        return stacked[0]
    out = stacked.new_empty(stacked.shape[1:])
    # gloo wants the input concatenated along dim 0, not stacked.
    flat = stacked.contiguous().flatten(0, 1)
    dist.reduce_scatter_single(out, flat, group=_collective_group(info))
    return out


def all_to_all(stacked: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """Send ``stacked[j]`` to rank ``j``; return ``[world_size, ...]``, ``[i]`` from rank ``i``.

    On a strided sub-group (``info.members``) it is ``P - 1`` sends and receives posted at
    once on the parent group, the same bytes as the collective; the rank's own slice stays.
    """
    if info.world_size == 1:
        return stacked
    stacked = stacked.contiguous()
    out = torch.empty_like(stacked)
    if info.members is None:
        dist.all_to_all_single(out, stacked, group=info.group)
        return out
    others = [r for r in range(info.world_size) if r != info.rank]
    works = post_p2p(
        [(stacked[r], r, _ALL_TO_ALL_TAG) for r in others],
        [(out[r], r, _ALL_TO_ALL_TAG) for r in others],
        info,
    )
    out[info.rank] = stacked[info.rank]
    for work in works:
        work.wait()
    return out


def agree(values: list[int], info: GroupInfo, device: torch.device) -> list[list[int]]:
    """Exchange a small integer vector with every rank (control plane, not counted as data)."""
    if info.world_size == 1:
        return [values]
    with control_plane():
        mine = torch.tensor(values, dtype=torch.int64, device=device)
        gathered = mine.new_empty(info.world_size * len(values))
        dist.all_gather_single(gathered, mine, group=info.group)
    return gathered.view(info.world_size, len(values)).tolist()
