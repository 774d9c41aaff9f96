"""Merge of partial attention results by their log-sum-exp (the online-softmax step).

Two partial results over disjoint key sets, ``(out, lse)`` and ``(block_out, block_lse)``,
combine exactly into the result over the union of the keys. The accumulator is float32
whatever the input dtype, so errors do not grow with the number of merged blocks.

The fused C++/CUDA kernel of ``csrc/`` (``distseq._C``) does it in one pass when it was built
and the accumulators are float32; :func:`merge_into_torch` is the fallback and the reference
the extension is tested against.
"""

from __future__ import annotations

import torch

try:
    from distseq import _C
except ImportError:  # built without the extension (no torch at build time): torch ops only
    _C = None


def merge_into_torch(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """:func:`merge_into` with torch elementwise ops (any float accumulator dtype)."""
    new_lse = torch.logaddexp(lse, block_lse)
    # exp(-inf - -inf) is nan; a row that is -inf on both sides stays 0 / -inf.
    finite = torch.isfinite(new_lse)
    safe_lse = torch.where(finite, new_lse, torch.zeros_like(new_lse))
    keep = torch.where(finite, torch.exp(lse - safe_lse), torch.zeros_like(lse))
    take = torch.where(finite, torch.exp(block_lse - safe_lse), torch.zeros_like(lse))
    out.mul_(keep.transpose(1, 2).unsqueeze(-1)).add_(
        block_out.to(out.dtype) * take.transpose(1, 2).unsqueeze(-1)
    )
    lse.copy_(new_lse)


def _fused_applies(out, lse, block_out, block_lse) -> bool:
    if _C is None or out.dtype != torch.float32 or lse.dtype != torch.float32:
        return False
    if block_lse.dtype != torch.float32 or block_out.dtype == torch.float64:
        return False
    return out.device.type == "cpu" or (out.device.type == "cuda" and _C.with_cuda)


def merge_into(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """Merge ``(block_out, block_lse)`` into the accumulators ``(out, lse)`` in place.

    ``out`` ``[B, S, H, D]`` float32 (or float64), ``lse`` ``[B, H, S]`` of the same dtype;
    ``block_out`` has the shape of ``out`` (any float dtype), ``block_lse`` that of ``lse``.
    Views are fine. ``-inf`` entries (rows that saw no key) are handled: merging with them is
    the identity.
    """
    if _fused_applies(out, lse, block_out, block_lse):
        _C.lse_merge_(out, lse, block_out, block_lse)
    else:
        merge_into_torch(out, lse, block_out, block_lse)
