"""The ``fla`` linear-attention backend: flash-linear-attention's chunked simple-GLA kernels.

``fla.ops.simple_gla.chunk_simple_gla`` computes exactly our recurrence (scalar per-head log
decay ``g``, ``g = None`` for none) and takes ``initial_state``/``output_final_state``/
``cu_seqlens``, which is what state passing needs. CUDA only: its kernels neither run on CPU
nor under the Triton interpreter. The backward differentiates fla's own autograd function.
"""

from __future__ import annotations

import torch

from distseq.kernels.common import fla_unavailable

try:
    from fla.ops.simple_gla import chunk_simple_gla
except (ImportError, RuntimeError, OSError) as _exc:  # no GPU driver: not only ImportError
    chunk_simple_gla = None
    _IMPORT_ERROR: str | None = f"flash-linear-attention is not usable ({_exc})"
else:
    _IMPORT_ERROR = None


def is_available(device: torch.device, dtype: torch.dtype) -> str | None:
    return fla_unavailable(_IMPORT_ERROR, device, dtype)


def forward(
    q, k, v, log_decay, *, scale, initial_state=None, cu_seqlens=None, chunk_size=64, bounds=None
):  # fmt: skip
    """See :mod:`distseq.kernels` (``chunk_size`` is fla's own, fixed at 64; fla reads the
    device ``cu_seqlens``, so ``bounds`` is unused)."""
    o, final = chunk_simple_gla(
        q, k, v, g=log_decay, scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=True, cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
    )  # fmt: skip
    return o, final.float()


def backward(
    do, dfinal_state, q, k, v, log_decay, *, scale, initial_state=None, cu_seqlens=None,
    chunk_size=64, bounds=None,
):  # fmt: skip
    """See :mod:`distseq.kernels`."""
    if initial_state is None:
        n = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        initial_state = q.new_zeros(n, q.shape[2], k.shape[-1], v.shape[-1], dtype=torch.float32)
    inputs = [q, k, v, initial_state.float()] + ([] if log_decay is None else [log_decay])
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in inputs]
        o, final = forward(
            *leaves[:3], leaves[4] if log_decay is not None else None, scale=scale,
            initial_state=leaves[3], cu_seqlens=cu_seqlens,
        )  # fmt: skip
        outputs, grads = [o], [do]
        if dfinal_state is not None:
            outputs.append(final)
            grads.append(dfinal_state.float())
        dq, dk, dv, dinit, *dg = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
    return dq, dk, dv, dg[0] if dg else None, dinit
