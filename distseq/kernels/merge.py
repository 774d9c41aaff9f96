"""Merge of partial attention results by their log-sum-exp (the online-softmax step).

Two partial results over disjoint key sets, ``(out, lse)`` and ``(block_out, block_lse)``,
combine exactly into the result over the union of the keys. The accumulator is float32
whatever the input dtype, so errors do not grow with the number of merged blocks.
"""

from __future__ import annotations

import torch


def merge_into(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """Merge ``(block_out, block_lse)`` into the float32 accumulators ``(out, lse)`` in place.

    ``out`` ``[B, S, H, D]`` float32, ``lse`` ``[B, H, S]`` float32; ``block_out`` has the
    shape of ``out`` (any float dtype), ``block_lse`` that of ``lse``. ``-inf`` entries (rows
    that saw no key) are handled: merging with them is the identity.
    """
    new_lse = torch.logaddexp(lse, block_lse)
    # exp(-inf - -inf) is nan; a row that is -inf on both sides stays 0 / -inf.
    finite = torch.isfinite(new_lse)
    safe_lse = torch.where(finite, new_lse, torch.zeros_like(new_lse))
    keep = torch.where(finite, torch.exp(lse - safe_lse), torch.zeros_like(lse))
    take = torch.where(finite, torch.exp(block_lse - safe_lse), torch.zeros_like(lse))
    out.mul_(keep.transpose(1, 2).unsqueeze(-1)).add_(
        block_out.float() * take.transpose(1, 2).unsqueeze(-1)
    )
    lse.copy_(new_lse)
