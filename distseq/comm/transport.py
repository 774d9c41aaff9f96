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


@dataclass(frozen=True)
class GroupInfo:
    """A process group as seen by this rank (``group`` is ``None`` when single-process)."""

    group: ProcessGroup | None
    rank: int
    world_size: int

    def global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)


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


def all_reduce_sum(x: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """The sum of ``x`` over the ranks of the group (a new tensor)."""
    out = x.contiguous().clone()
    if info.world_size > 1:
        dist.all_reduce(out, group=info.group)
    return out


def broadcast(x: torch.Tensor, source: int, info: GroupInfo) -> torch.Tensor:
    """Group rank ``source``'s ``x`` on every rank (``x`` gives the shape elsewhere)."""
    out = x.contiguous().clone()
    if info.world_size > 1:
        dist.broadcast(out, info.global_rank(source), group=info.group)
    return out


def all_gather_async(x: torch.Tensor, info: GroupInfo) -> tuple[torch.Tensor, dist.Work | None]:
    """Start gathering ``x`` from every rank into ``[world_size, *x.shape]``; wait on the handle."""
    if info.world_size == 1:
        return x.unsqueeze(0).clone(), None
    # gloo wants the output concatenated along dim 0, not stacked.
    flat = x.new_empty((info.world_size * x.shape[0], *x.shape[1:]))
    work = dist.all_gather_single(flat, x.contiguous(), group=info.group, async_op=True)
    return flat.view(info.world_size, *x.shape), work


def reduce_scatter(stacked: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """Sum ``stacked`` ``[world_size, ...]`` over ranks and return this rank's slice ``[...]``."""
    if info.world_size == 1:
        return stacked[0]
    out = stacked.new_empty(stacked.shape[1:])
    # gloo wants the input concatenated along dim 0, not stacked.
    dist.reduce_scatter_single(out, stacked.contiguous().flatten(0, 1), group=info.group)
    return out


def all_to_all(stacked: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """Send ``stacked[j]`` to rank ``j``; return ``[world_size, ...]``, ``[i]`` from rank ``i``."""
    if info.world_size == 1:
        return stacked
    stacked = stacked.contiguous()
    out = torch.empty_like(stacked)
    dist.all_to_all_single(out, stacked, group=info.group)
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
