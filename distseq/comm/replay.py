"""Record / replay: run a step once for real, then again with every data op answered from
what it received, to tell the time spent communicating from the time spent computing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from distseq.comm.hooks import DATA_OPS, DistPatch


@dataclass(frozen=True)
class _Spec:
    """Shape, dtype and device of a tensor a recorded op took (its contents are not kept)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def _spec(t: torch.Tensor) -> _Spec:
    return _Spec(tuple(t.shape), t.dtype, t.device)


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
        self._patch = DistPatch()

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


class CommReplay:
    """Answers every data op from a :class:`CommRecording` instead of calling
    ``torch.distributed`` (see :class:`CommRecorder`). Re-enterable: each ``with`` replays
    the recording from its first op."""

    def __init__(self, recording: CommRecording) -> None:
        self.recording = recording
        self._patch = DistPatch()
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
