"""Communication primitives of the strategies, and the byte-accounting hook.

Every byte a strategy moves goes through ``torch.distributed`` calls made here (looked up on
the module at call time, so :class:`CommCounter` can wrap them). Asynchronous ops return
handles so callers post communication, compute, then wait.
"""

from __future__ import annotations

import contextvars
import time
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


# The torch.distributed functions that move data; every one the strategies use goes through
# this module, so wrapping these on ``dist`` sees all of a strategy's traffic.
DATA_OPS = (
    "batch_isend_irecv",
    "all_reduce",
    "broadcast",
    "all_gather_single",
    "reduce_scatter_single",
    "all_to_all_single",
)


class _DistPatch:
    """Replaces ``torch.distributed`` functions by ``fn(original, *args, **kwargs)`` until
    :meth:`restore`; wrappers nest (each wraps what was on ``dist`` when it was installed)."""

    def __init__(self) -> None:
        self._originals: dict[str, object] = {}

    def wrap(self, name: str, fn) -> None:
        original = getattr(dist, name)
        self._originals[name] = original

        def wrapper(*args, **kwargs):
            return fn(original, *args, **kwargs)

        setattr(dist, name, wrapper)

    def restore(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()


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
    _patch: _DistPatch = field(default_factory=lambda: _DistPatch())

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
        def wrapper(original, *args, **kwargs):
            account(*args, **kwargs)
            return original(*args, **kwargs)

        self._patch.wrap(name, wrapper)

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
        self._patch.restore()


# ---------------------------------------------------------------------------- record / replay
@dataclass(frozen=True)
class _Spec:
    """Shape, dtype and device of a tensor a recorded op took (its contents are not kept)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def _map_leaves(obj, fn):
    """``obj`` with every tensor / :class:`_Spec` replaced by ``fn(leaf)``; P2P ops become
    ``("p2p", op, fn(tensor), peer, group, tag)`` tuples and back."""
    if isinstance(obj, (torch.Tensor, _Spec)):
        return fn(obj)
    if isinstance(obj, dist.P2POp):
        return ("p2p", obj.op, fn(obj.tensor), obj.peer, obj.group, obj.tag)
    if isinstance(obj, tuple) and obj and obj[0] == "p2p":
        _, op, tensor, peer, group, tag = obj
        return dist.P2POp(op, fn(tensor), peer, group, tag)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_leaves(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_leaves(v, fn) for k, v in obj.items()}
    return obj


def _outputs(name: str, args: tuple) -> list[torch.Tensor]:
    """The tensors an op writes: received P2P buffers, or its first argument (the output of
    the ``*_single`` collectives, the in-place tensor of all-reduce / broadcast)."""
    if name == "batch_isend_irecv":
        return [op.tensor for op in args[0] if op.op is not dist.isend]
    return [args[0]]


def _is_async(name: str, kwargs: dict) -> bool:
    return name == "batch_isend_irecv" or bool(kwargs.get("async_op", False))


@dataclass
class _Call:
    name: str
    template: tuple  # (args, kwargs) with tensors replaced by _Spec
    outputs: list[torch.Tensor] | None  # until the op completes
    received: list[torch.Tensor] | None = None
    pending: list = field(default_factory=list)  # unwaited handles

    def complete(self) -> None:
        if self.received is None:
            for work in self.pending:
                work.wait()
            self.pending = []
            self.received = [t.detach().clone() for t in self.outputs]
            self.outputs = None


class _RecordingWork:
    """A handle that, once every handle of its op has been waited on, snapshots what the op
    received (the buffers may be reused or modified by the caller afterwards)."""

    def __init__(self, work, call: _Call) -> None:
        self._work, self._call = work, call

    def wait(self, *args, **kwargs):
        result = self._work.wait(*args, **kwargs)
        if self._work in self._call.pending:
            self._call.pending.remove(self._work)
        if not self._call.pending:
            self._call.complete()
        return result

    def __getattr__(self, name):
        return getattr(self._work, name)


class _DoneWork:
    """A handle whose op has already completed (what replayed async ops return)."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


@dataclass
class CommRecording:
    """The data ops one rank issued through ``torch.distributed`` and what each received.

    ``replay()`` re-runs the same code with every op answered from the recording;
    ``run_alone()`` times the same ops for real with no compute in between.
    """

    calls: list[_Call] = field(default_factory=list)

    def replay(self) -> CommReplay:
        return CommReplay(self)

    def run_alone(self) -> float:
        """Seconds this rank spends issuing the recorded ops for real, in order, each waited on
        before the next is issued, on fresh buffers of the recorded shapes (contents are
        irrelevant to the time). Every rank of the recording must call it together; call a
        barrier first so the ranks start at the same time."""
        prepared = []
        for call in self.calls:
            args, kwargs = _map_leaves(
                call.template, lambda s: torch.zeros(s.shape, dtype=s.dtype, device=s.device)
            )
            prepared.append((getattr(dist, call.name), args, kwargs))
        start = time.perf_counter()
        for fn, args, kwargs in prepared:
            works = fn(*args, **kwargs)
            for work in works if isinstance(works, list) else [works]:
                if work is not None:
                    work.wait()
        return time.perf_counter() - start


class CommRecorder:
    """Records every data op issued through ``torch.distributed`` (see :data:`DATA_OPS`) while
    active, and what it received; the ops still run for real.

    ``with CommRecorder() as rec: step()`` then ``with rec.recording.replay(): step()`` runs
    the same step again without any communication: each op's output buffers are filled with
    the recorded data and asynchronous ops return handles that are already complete. The
    replayed step must issue the same ops in the same order with the same shapes (the same
    code on the same input shapes); a mismatch raises ``RuntimeError``. The recording holds a
    copy of every received buffer (for a long step, as much memory as all its messages).

    Replay removes the time spent *in* communication and waiting for peers while keeping all
    compute (including buffer packing). With ``t_real`` a step's time, ``t_replay`` the replayed
    step's and ``t_comm`` the recorded ops' time alone (:meth:`CommRecording.run_alone`), see
    :func:`hidden_comm_fraction`.
    """

    def __init__(self) -> None:
        self.recording = CommRecording()
        self._patch = _DistPatch()

    def _record(self, name: str):
        def fn(original, *args, **kwargs):
            call = _Call(name, _map_leaves((args, kwargs), _spec), _outputs(name, args))
            self.recording.calls.append(call)
            result = original(*args, **kwargs)
            if not _is_async(name, kwargs):
                call.complete()
                return result
            works = result if isinstance(result, list) else [result]
            call.pending = [w for w in works if w is not None]
            wrapped = [_RecordingWork(w, call) for w in call.pending]
            if not call.pending:
                call.complete()
            return wrapped if isinstance(result, list) else (wrapped[0] if wrapped else None)

        return fn

    def __enter__(self) -> CommRecorder:
        for name in DATA_OPS:
            self._patch.wrap(name, self._record(name))
        return self

    def __exit__(self, *exc) -> None:
        self._patch.restore()
        for call in self.recording.calls:
            call.complete()


def _spec(t: torch.Tensor) -> _Spec:
    return _Spec(tuple(t.shape), t.dtype, t.device)


class CommReplay:
    """Answers every data op from a :class:`CommRecording` instead of calling
    ``torch.distributed`` (see :class:`CommRecorder`). Re-enterable: each ``with`` replays
    the recording from its first op."""

    def __init__(self, recording: CommRecording) -> None:
        self.recording = recording
        self._patch = _DistPatch()
        self._next = 0

    def _replay(self, name: str):
        def fn(_original, *args, **kwargs):
            index = self._next
            if index >= len(self.recording.calls):
                raise RuntimeError(
                    f"replay: op {index} ({name}) was not recorded (the recording has "
                    f"{len(self.recording.calls)} ops); replay the same step that was recorded"
                )
            call = self.recording.calls[index]
            outputs = _outputs(name, args)
            shapes = [tuple(t.shape) for t in outputs]
            if call.name != name or shapes != [tuple(t.shape) for t in call.received]:
                raise RuntimeError(
                    f"replay: op {index} is {name} with outputs {shapes} but the recording has "
                    f"{call.name} with {[tuple(t.shape) for t in call.received]}; replay the "
                    "same step on the same shapes"
                )
            self._next += 1
            for out, data in zip(outputs, call.received):
                out.copy_(data)
            if not _is_async(name, kwargs):
                return None
            if name == "batch_isend_irecv":
                return [_DoneWork() for _ in args[0]]
            return _DoneWork()

        return fn

    def __enter__(self) -> CommReplay:
        self._next = 0
        for name in DATA_OPS:
            self._patch.wrap(name, self._replay(name))
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._patch.restore()
        if exc_type is None and self._next != len(self.recording.calls):
            raise RuntimeError(
                f"replay: the step issued {self._next} ops but {len(self.recording.calls)} "
                "were recorded; replay the same step that was recorded"
            )


def hidden_comm_fraction(t_real: float, t_replay: float, t_comm: float) -> float:
    """Fraction of the communication time hidden behind compute (raw, not clamped).

    ``t_real``: the step with real communication; ``t_replay``: the same step with every op
    answered from a recording (compute only, no waiting on peers); ``t_comm``: the same ops
    issued alone, each waited on before the next (:meth:`CommRecording.run_alone`). Exposed
    communication is ``t_real - t_replay``, so the hidden fraction is
    ``1 - (t_real - t_replay) / t_comm``: 1 when the step costs no more than its compute, 0
    when it costs compute plus all communication. Noise and load imbalance (time waiting for a
    slower peer counts as exposed) can push it outside ``[0, 1]``; clamp only for display.
    Returns ``nan`` when ``t_comm`` is 0 (nothing to hide).
    """
    if t_comm <= 0:
        return float("nan")
    return 1.0 - (t_real - t_replay) / t_comm
