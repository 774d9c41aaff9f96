"""Offloaded checkpoints: each checkpointed layer's saved input lives in host memory.

With non-reentrant activation checkpointing a layer keeps only its input for the
recomputation, saved through autograd's saved-tensor hooks *outside* the checkpoint's own
hooks. :class:`OffloadInputs` around the checkpoint call packs that input to the host: on a
GPU into pinned memory on a side stream (the copy overlaps the next layer's compute) and back
when the backward recomputes the layer; on a CPU device a plain copy (the same code path,
so it is testable), which tensor trackers count as host memory.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import _disable_current_modes

_Packed = tuple[torch.device, torch.Tensor, "torch.cuda.Event | None"]


class OffloadInputs(saved_tensors_hooks):
    """Saved-tensor hooks that keep what is saved in host memory until the backward needs it.

    ``packed_bytes`` counts what was packed (device bytes moved to the host), so tests and
    benchmarks can see what was offloaded.
    """

    def __init__(self) -> None:
        self.packed_bytes = 0
        self._stream: torch.cuda.Stream | None = None
        super().__init__(self._pack, self._unpack)

    def _copy_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _pack(self, tensor: torch.Tensor) -> _Packed:
        self.packed_bytes += tensor.numel() * tensor.element_size()
        if tensor.device.type != "cuda":
            # The copy stands for host memory: hidden from tensor trackers (dispatch modes
            # such as TensorPeak) as a pinned host buffer is from CUDA's device counters.
            with _disable_current_modes():
                return tensor.device, tensor.detach().clone(), None
        stream = self._copy_stream()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        # The device tensor may be freed by the caller now; keep its memory until the copy ran.
        tensor.record_stream(stream)
        return tensor.device, host, done

    @staticmethod
    def _unpack(packed: _Packed) -> torch.Tensor:
        device, host, done = packed
        if done is None:
            return host
        torch.cuda.current_stream(device).wait_event(done)
        return host.to(device, non_blocking=True)


def offload_context(enabled: bool) -> contextlib.AbstractContextManager:
    """:class:`OffloadInputs` when ``enabled``, else nothing."""
    return OffloadInputs() if enabled else contextlib.nullcontext()
