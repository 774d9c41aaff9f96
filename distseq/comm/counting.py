"""Byte accounting: :class:`CommCounter` counts what this rank puts on and takes off the wire."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from distseq.comm.hooks import DATA_OPS, DistPatch, in_control_plane
from distseq.comm.transport import ProcessGroup


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class CommCounter:
    """Counts the bytes this rank sends and receives through ``torch.distributed``.

    Use as a context manager: it wraps the data ops (:data:`distseq.comm.hooks.DATA_OPS`) on
    ``torch.distributed`` while active. For collectives it records what a bandwidth-optimal
    algorithm puts on this rank's wire (all-gather: ``(P-1)·shard``; reduce-scatter and
    all-to-all: ``(P-1)/P·input``), so numbers compare directly with the strategies' formulas;
    all-reduce: ``2(P-1)/P·input``; broadcast: ``(P-1)/P·input`` (scatter + all-gather).
    Control-plane messages (input agreement) are kept apart in ``control_bytes``.
    ``calls`` counts the data-op calls by ``torch.distributed`` function (one
    ``batch_isend_irecv`` is one call, however many messages it posts) and ``control_calls``
    the control-plane ones: what a layer launches, as opposed to how many bytes it moves.
    """

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    received: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    control_bytes: int = 0
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    control_calls: int = 0
    _patch: DistPatch = field(default_factory=DistPatch)

    @property
    def bytes_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def bytes_received(self) -> int:
        return sum(self.received.values())

    def _record(self, op: str, sent: int, received: int) -> None:
        if in_control_plane():
            self.control_bytes += sent
            return
        self.sent[op] += sent
        self.received[op] += received

    def _size(self, group: ProcessGroup | None) -> int:
        return dist.get_world_size(group)

    def _wrap(self, name: str, account) -> None:
        def wrapper(original, *args, **kwargs):
            if in_control_plane():
                self.control_calls += 1
            else:
                self.calls[name] += 1
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

        accounts = {
            "batch_isend_irecv": p2p,
            "all_reduce": all_reduce,
            "broadcast": broadcast,
            "all_gather_single": all_gather,
            "reduce_scatter_single": scatter_like("reduce_scatter"),
            "all_to_all_single": scatter_like("all_to_all"),
        }
        for name in DATA_OPS:  # a data op without an account here is a KeyError, not a miss
            self._wrap(name, accounts[name])
        return self

    def __exit__(self, *exc) -> None:
        self._patch.restore()
