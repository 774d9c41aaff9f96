"""Communication primitives of the strategies, and the byte-accounting hook.

Every byte a strategy moves goes through ``torch.distributed`` calls made here (looked up on
the module at call time, so :class:`CommCounter` can wrap them). Asynchronous ops return
handles so callers post communication, compute, then wait.
"""

from __future__ import annotations

import contextvars
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

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


_CONTROL = contextvars.ContextVar("distseq_control_plane", default=False)


def agree(values: list[int], info: GroupInfo, device: torch.device) -> list[list[int]]:
    """Exchange a small integer vector with every rank (control plane, not counted as data)."""
    if info.world_size == 1:
        return [values]
    token = _CONTROL.set(True)
    try:
        mine = torch.tensor(values, dtype=torch.int64, device=device)
        gathered = mine.new_empty(info.world_size * len(values))
        dist.all_gather_single(gathered, mine, group=info.group)
        gathered = gathered.view(info.world_size, len(values))
    finally:
        _CONTROL.reset(token)
    return gathered.tolist()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class CommCounter:
    """Counts the bytes this rank sends and receives through ``torch.distributed``.

    Use as a context manager: it wraps the ``torch.distributed`` functions while active. For
    collectives it records what a bandwidth-optimal algorithm puts on this rank's wire
    (all-gather: ``(P-1)·shard``; reduce-scatter and all-to-all: ``(P-1)/P·input``), so numbers
    compare directly with the strategies' formulas; all-reduce: ``2(P-1)/P·input``; broadcast:
    ``(P-1)/P·input`` (scatter + all-gather). Control-plane messages (input agreement)
    are kept apart in ``control_bytes``.
    """

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    received: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    control_bytes: int = 0
    _originals: dict[str, object] = field(default_factory=dict)

    @property
    def bytes_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def bytes_received(self) -> int:
        return sum(self.received.values())

    def _record(self, op: str, sent: int, received: int) -> None:
        if _CONTROL.get():
            self.control_bytes += sent
            return
        self.sent[op] += sent
        self.received[op] += received

    def _size(self, group: ProcessGroup | None) -> int:
        return dist.get_world_size(group)

    def _wrap(self, name: str, account) -> None:
        original = getattr(dist, name)
        self._originals[name] = original

        def wrapper(*args, **kwargs):
            account(*args, **kwargs)
            return original(*args, **kwargs)

        setattr(dist, name, wrapper)

    def __enter__(self) -> CommCounter:
        def p2p(ops):
            for op in ops:
                n = _nbytes(op.tensor)
                is_send = op.op is dist.isend
                self._record("p2p", n if is_send else 0, 0 if is_send else n)

        def all_gather(out, inp, group=None, **_):
            n = _nbytes(inp) * (self._size(group) - 1)
            self._record("all_gather", n, n)

        def scatter_like(op):
            def account(out, inp, group=None, **_):
                p = self._size(group)
                n = _nbytes(inp) * (p - 1) // p
                self._record(op, n, n)

            return account

        def all_reduce(tensor, *args, group=None, **_):
            p = self._size(group)
            n = 2 * _nbytes(tensor) * (p - 1) // p
            self._record("all_reduce", n, n)

        def broadcast(tensor, *args, group=None, **_):
            p = self._size(group)
            n = _nbytes(tensor) * (p - 1) // p
            self._record("broadcast", n, n)

        self._wrap("batch_isend_irecv", p2p)
        self._wrap("all_reduce", all_reduce)
        self._wrap("broadcast", broadcast)
        self._wrap("all_gather_single", all_gather)
        self._wrap("reduce_scatter_single", scatter_like("reduce_scatter"))
        self._wrap("all_to_all_single", scatter_like("all_to_all"))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()
