"""What the byte counter and the recorder hook into, shared so neither imports the other.

:data:`DATA_OPS` names the ``torch.distributed`` functions that move data (every one the
strategies call, through :mod:`distseq.comm.transport`); :class:`DistPatch` wraps them on the
``dist`` module; :func:`control_plane` marks messages that are input agreement, not data.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch.distributed as dist

# The transport looks these up on ``dist`` at call time, so wrapping them on ``dist`` sees all
# of a strategy's traffic.
DATA_OPS = (
    "batch_isend_irecv",
    "all_reduce",
    "broadcast",
    "all_gather_single",
    "reduce_scatter_single",
    "all_to_all_single",
)

_CONTROL = contextvars.ContextVar("distseq_control_plane", default=False)


@contextlib.contextmanager
def control_plane() -> Iterator[None]:
    """Marks the messages sent inside the block as control plane (not counted as data)."""
    token = _CONTROL.set(True)
    try:
        yield
    finally:
        _CONTROL.reset(token)


def in_control_plane() -> bool:
    """Whether the current message is sent inside :func:`control_plane`."""
    return _CONTROL.get()


class DistPatch:
    """Replaces ``torch.distributed`` functions by ``fn(original, *args, **kwargs)`` until
    :meth:`restore`; wrappers nest (each wraps what was on ``dist`` when it was installed)."""

    def __init__(self) -> None:
        self._originals: dict[str, object] = {}

    def wrap(self, name: str, fn: Callable) -> None:
        original = getattr(dist, name)
        self._originals[name] = original

        def wrapper(*args, **kwargs):
            return fn(original, *args, **kwargs)

        setattr(dist, name, wrapper)

    def restore(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()
