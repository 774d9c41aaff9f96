"""Per-rank bodies for tests/test_comm_replay.py: record a forward+backward, replay it."""

from __future__ import annotations

import torch
import torch.distributed as dist

import distseq
from distseq.comm import CommRecorder
from distseq.comm.hooks import DistPatch

# Every torch.distributed function that talks to other ranks; a call to any of them during a
# replay would mean the replay still communicates. (isend / irecv stay unwrapped: P2POp checks
# their identity, and they run only inside batch_isend_irecv, which is counted.)
_COMM_FUNCTIONS = (
    "batch_isend_irecv", "all_reduce", "broadcast", "all_gather_single",
    "reduce_scatter_single", "all_to_all_single", "send", "recv",
    "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
    "all_to_all", "barrier", "gather", "scatter", "reduce", "monitored_barrier",
)  # fmt: skip


class _CallCounter:
    """Counts calls reaching the torch.distributed communication functions while active."""

    def __init__(self) -> None:
        self.calls = 0
        self._patch = DistPatch()

    def _count(self, original, *args, **kwargs):
        self.calls += 1
        return original(*args, **kwargs)

    def __enter__(self):
        for name in _COMM_FUNCTIONS:
            self._patch.wrap(name, self._count)
        return self

    def __exit__(self, *exc):
        self._patch.restore()


def _inputs(rank: int, kind: str):
    gen = torch.Generator().manual_seed(100 + rank)
    if kind == "softmax":
        shapes = [(1, 16, 4, 8), (1, 16, 2, 8), (1, 16, 2, 8)]
    else:
        shapes = [(1, 16, 2, 8)] * 3 + [(1, 16, 2)]
    leaves = [torch.randn(s, generator=gen) for s in shapes]
    if kind == "linear":
        leaves[3] = -torch.nn.functional.softplus(leaves[3]) * 0.1
    return [t.requires_grad_() for t in leaves], torch.randn(shapes[0], generator=gen)


def _step(strategy: str, kind: str, world: int, leaves, dout):
    for t in leaves:
        t.grad = None
    docs = torch.tensor([0, 8 * world, 16 * world], dtype=torch.int32)
    if kind == "softmax":
        out = distseq.attention(*leaves, strategy=strategy, layout="zigzag", cu_seqlens=docs,
                                backend="torch")  # fmt: skip
    else:
        layout = "zigzag" if strategy == "lasp2" else "contiguous"
        out = distseq.linear_attention(*leaves[:3], log_decay=leaves[3], strategy=strategy,
                                       layout=layout, cu_seqlens=docs)  # fmt: skip
    out.backward(dout)
    return [out.detach().clone()] + [t.grad.clone() for t in leaves]


def record_then_replay(rank: int, world: int, strategy: str, kind: str) -> dict:
    """Bit-equality of the replayed step with the recorded one, and the calls each made."""
    leaves, dout = _inputs(rank, kind)
    with _CallCounter() as real_calls, CommRecorder() as recorder:
        recorded = _step(strategy, kind, world, leaves, dout)
    # Perturb nothing: the same inputs must give bit-identical results from recorded buffers.
    with _CallCounter() as replay_calls, recorder.recording.replay():
        replayed = _step(strategy, kind, world, leaves, dout)
    dist.barrier()
    t_alone = recorder.recording.run_alone()
    return {
        "identical": all(torch.equal(a, b) for a, b in zip(recorded, replayed)),
        "real_calls": real_calls.calls,
        "replay_calls": replay_calls.calls,
        "ops": len(recorder.recording.calls),
        "t_alone": t_alone,
    }


def replay_other_step(rank: int, world: int) -> str:
    """Replaying a recording on a different step must raise, not silently copy garbage."""
    leaves, dout = _inputs(rank, "softmax")
    with CommRecorder() as recorder:
        _step("ring", "softmax", world, leaves, dout)
    try:
        with recorder.recording.replay():
            _step("allgather", "softmax", world, leaves, dout)
    except RuntimeError as exc:
        return str(exc)
    return ""
