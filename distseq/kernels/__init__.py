"""Local attention block kernels and the one backend selector.

Every backend module (``attention_torch``, ``attention_flash``, ``attention_triton``) exposes
the same three functions, so strategies never care which one runs:

``is_available(device: torch.device, dtype: torch.dtype) -> str | None``
    ``None`` when the backend can run on ``device`` with ``dtype``, otherwise the reason why not.

``forward(q, k, v, *, scale, causal, cu_seqlens_q=None, cu_seqlens_k=None) -> (out, lse)``
    ``q`` ``[B, Sq, Hq, D]``, ``k``/``v`` ``[B, Sk, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA: query
    head ``h`` reads K/V head ``h // (Hq // Hkv)``). Returns ``out`` ``[B, Sq, Hq, D]`` in
    ``q.dtype`` and ``lse`` ``[B, Hq, Sq]`` float32, the natural-log log-sum-exp of the scaled
    scores of each row. ``causal`` is *bottom-right aligned* (the flash-attn convention): query
    ``i`` sees key ``j`` iff ``j <= i + Sk - Sq``. A row that sees no key has ``out = 0`` and
    ``lse = -inf``. With ``cu_seqlens_q``/``cu_seqlens_k`` (int32 ``[n + 1]``, ``B == 1``) the
    block is ``n`` independent segments: rows of q-segment ``i`` attend only to k-segment ``i``,
    causal alignment applies per segment; segments may be empty.

``backward(dout, q, k, v, out, lse, *, scale, causal, cu_seqlens_q=None, cu_seqlens_k=None)
-> (dq, dk, dv)``
    Gradients of this block given the *final* ``out`` and ``lse`` of the rows (which may merge
    several blocks): ``P = exp(scale * q k^T - lse)``, ``dS = P * (dout v^T - rowsum(dout * out))``.
    ``dq`` ``[B, Sq, Hq, D]``, ``dk``/``dv`` ``[B, Sk, Hkv, D]`` (summed over each K/V head's query
    group), all in ``q.dtype``. ``out`` may be float32 while ``q`` is bf16.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS: dict[str, str] = {
    "torch": "distseq.kernels.attention_torch",
    "flash": "distseq.kernels.attention_flash",
    "triton": "distseq.kernels.attention_triton",
}
# "auto" tries these in order; the first that can run on the device wins.
_AUTO_ORDER = {"cuda": ("flash", "triton", "torch"), "cpu": ("torch",)}


def _load(name: str) -> ModuleType:
    return importlib.import_module(BACKENDS[name])


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why backend ``name`` cannot run on ``device``/``dtype``, or ``None`` when it can."""
    try:
        module = _load(name)
    except ImportError as exc:  # an optional dependency is missing
        return f"import failed ({exc})"
    return module.is_available(device, dtype)


def select_backend(name: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """Return the kernel module for ``name`` (or the best available one for ``"auto"``)."""
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            if unavailable_reason(candidate, device, dtype) is None:
                return _load(candidate)
        raise ValueError(f"no attention backend can run on device {device} with dtype {dtype}")
    if name not in BACKENDS:
        raise ValueError(
            f"unknown backend {name!r}; choose one of {['auto', *BACKENDS]} "
            '("auto" picks the fastest available)'
        )
    reason = unavailable_reason(name, device, dtype)
    if reason is not None:
        raise ValueError(
            f"backend {name!r} cannot run on device {device} with dtype {dtype}: {reason}; "
            'use backend="auto" or "torch"'
        )
    return _load(name)
