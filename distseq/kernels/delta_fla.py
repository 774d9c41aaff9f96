"""The ``fla`` delta-rule backend: flash-linear-attention's ``chunk_gated_delta_rule``.

It computes exactly our recurrence (``use_qk_l2norm_in_kernel=False``; ``g = 0`` when there
is no decay) and takes ``initial_state``/``output_final_state``/``cu_seqlens``. CUDA only: its
Triton kernels neither run on CPU nor under the interpreter. The piece maps ``A`` and ``q̃``
that sequence parallelism needs come from the torch backend's chunked form
(:func:`distseq.kernels.delta_torch.maps`, batched matmuls on the GPU); the backward
differentiates fla's own autograd function.
"""

from __future__ import annotations

import torch

from distseq.kernels import delta_torch
from distseq.kernels.common import fla_unavailable

try:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
except (ImportError, RuntimeError, OSError) as _exc:  # no GPU driver: not only ImportError
    chunk_gated_delta_rule = None
    _IMPORT_ERROR: str | None = f"flash-linear-attention is not usable ({_exc})"
else:
    _IMPORT_ERROR = None


def is_available(device: torch.device, dtype: torch.dtype) -> str | None:
    return fla_unavailable(_IMPORT_ERROR, device, dtype)


def forward(
    q, k, v, beta, log_decay, *, scale, initial_state=None, cu_seqlens=None, chunk_size=64,
    bounds=None,
):  # fmt: skip
    """See :mod:`distseq.kernels` (``chunk_size`` is fla's own, fixed at 64; fla reads the
    device ``cu_seqlens``, so ``bounds`` is unused)."""
    g = torch.zeros_like(beta, dtype=torch.float32) if log_decay is None else log_decay.float()
    o, final = chunk_gated_delta_rule(
        q, k, v, g=g, beta=beta.to(q.dtype), scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=True, cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
        use_qk_l2norm_in_kernel=False,
    )  # fmt: skip
    return o, final.float()


class _Prepared:
    """:class:`distseq.kernels.delta_torch.Prepared` from fla's outputs (all computed at once)."""

    def __init__(self, out, memories, transitions, queries):
        self._out, self._queries = out, queries
        self.memories, self.transitions = memories, transitions

    def outputs(self):
        return self._out, self._queries


def prepare(q, k, v, beta, log_decay, *, scale, cu_seqlens=None, chunk_size=64, bounds=None):
    """See :func:`distseq.kernels.delta_torch.prepare`."""
    out, memory = forward(q, k, v, beta, log_decay, scale=scale, cu_seqlens=cu_seqlens)
    transition, queries = delta_torch.maps(
        q, k, beta, log_decay, cu_seqlens=cu_seqlens, chunk_size=chunk_size, bounds=bounds
    )
    return _Prepared(out.float(), memory, transition, queries)


def backward(
    do, dfinal_state, q, k, v, beta, log_decay, *, scale, initial_state=None, cu_seqlens=None,
    chunk_size=64, bounds=None,
):  # fmt: skip
    """See :func:`distseq.kernels.delta_torch.backward`: fla's own autograd function,
    re-run from the inputs."""
    if initial_state is None:
        n = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        initial_state = q.new_zeros(n, q.shape[2], k.shape[-1], v.shape[-1], dtype=torch.float32)
    inputs = [q, k, v, beta, initial_state.float()] + ([] if log_decay is None else [log_decay])
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in inputs]
        o, final = forward(
            *leaves[:4], leaves[5] if log_decay is not None else None, scale=scale,
            initial_state=leaves[4], cu_seqlens=cu_seqlens,
        )  # fmt: skip
        outputs, grads = [o], [do]
        if dfinal_state is not None:
            outputs.append(final)
            grads.append(dfinal_state.float())
        dq, dk, dv, dbeta, dinit, *dg = torch.autograd.grad(
            outputs, leaves, grads, allow_unused=True
        )
    return dq, dk, dv, dbeta, dg[0] if dg else None, dinit
