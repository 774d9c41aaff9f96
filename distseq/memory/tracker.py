"""Peak bytes of live tensors on one device, as an allocator would count them (no RSS noise).

CUDA has ``torch.cuda.max_memory_allocated``; a CPU has no such counter, so
:class:`TensorPeak` counts it: a dispatch mode that sees every tensor an operator returns,
adds its storage's bytes the first time it sees the storage and subtracts them when the
storage is freed (a weak reference's callback). Storages that existed before (parameters,
buffers, optimizer state) are added with :meth:`TensorPeak.track`. A storage's bytes count
once however many views share it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _local(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor holding ``tensor``'s memory: a DTensor's local shard; ``None`` for other
    wrapper subclasses (their inner tensors are seen when their own operators run)."""
    local = getattr(tensor, "_local_tensor", None)
    if local is not None:
        return local
    return tensor if type(tensor) in (torch.Tensor, torch.nn.Parameter) else None


class TensorPeak(TorchDispatchMode):
    """Live and peak bytes of the tensor storages on ``device`` (type, e.g. ``"cpu"``) while
    the mode is active (``with tracker: ...``; re-enterable, the peak spans all entries).
    ``reset_peak()`` starts a new peak from the live bytes."""

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors allocated outside the mode (parameters, gradients, states)."""
        for tensor in tensors:
            self._see(tensor)

    def _freed(self, key: int, _ref: weakref.ref) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def _see(self, tensor: torch.Tensor) -> None:
        tensor = _local(tensor)
        if tensor is None or tensor.device.type != self.device or tensor.is_meta:
            return
        storage = tensor.untyped_storage()
        key, size = storage._cdata, storage.nbytes()
        old = self._sizes.get(key)
        if old is None:
            self._refs[key] = weakref.ref(storage, lambda ref, key=key: self._freed(key, ref))
        self._sizes[key] = size
        self.live += size - (old or 0)  # a storage resized in place counts its new size
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._see(item)
        return out
