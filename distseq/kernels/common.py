"""Torch-side conventions the kernel backends and the strategies share.

Accumulators and log-sum-exps are float32 (float64 for float64 inputs), so that rounding
errors do not grow with the number of merged blocks or chunks. A row that sees no key has
``out = 0`` and ``lse = -inf``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32/float16/bfloat16 inputs, float64 for float64 ones."""
    return torch.promote_types(dtype, torch.float32)


def host_bounds(
    cu_seqlens: torch.Tensor | None, bounds: Sequence[int] | None
) -> tuple[int, ...] | None:
    """The segment boundaries of ``cu_seqlens`` ``[N + 1]`` on the host, or ``None`` without it.

    ``bounds`` are the same boundaries as host ints when the caller knows them (a strategy
    does, from its shard layout); only without them is ``cu_seqlens`` read back, a host sync
    on a GPU.
    """
    if cu_seqlens is None:
        if bounds is not None:
            raise ValueError(
                f"bounds {list(bounds)} given without cu_seqlens; pass both (the same boundaries)"
            )
        return None
    if bounds is None:
        return tuple(cu_seqlens.tolist())
    if len(bounds) != cu_seqlens.numel():
        raise ValueError(
            f"bounds {list(bounds)} do not match cu_seqlens of {cu_seqlens.numel()} entries; "
            "pass cu_seqlens' boundaries as host ints"
        )
    return tuple(bounds)


def no_key_result(
    q: torch.Tensor, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention result of rows that see no key, for ``q`` ``[B, S, H, D]``.

    ``out`` ``[B, S, H, D]`` zeros in ``out_dtype`` (default ``q.dtype``) and ``lse``
    ``[B, H, S]`` ``-inf`` in :func:`accumulator_dtype`; both contiguous. Merging into this pair
    starts from nothing.
    """
    b, s, h, _ = q.shape
    out = torch.zeros(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=accumulator_dtype(q.dtype), device=q.device)
    return out, lse


def lse_for_backward(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` ``[B, H, S]`` with ``-inf`` (a row that saw no key) replaced by ``+inf``.

    The backward forms ``P = exp(s - lse)``; ``+inf`` makes such a row's ``P`` exactly 0
    instead of nan.
    """
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


FLA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fla_unavailable(
    import_error: str | None, device: torch.device, dtype: torch.dtype
) -> str | None:
    """Why a flash-linear-attention backend cannot run on ``device`` with ``dtype`` (``None``:
    it can), given the error its import left (``None``: it imported)."""
    if import_error is not None:
        return import_error
    if device.type != "cuda":
        return "flash-linear-attention needs a CUDA device"
    if dtype not in FLA_DTYPES:
        return f"unsupported dtype {dtype}"
    return None


def chunk_scan(
    state: torch.Tensor,
    step: Callable[[torch.Tensor, int], torch.Tensor],
    chunks: int,
    *,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked kernels' recurrence over chunks: ``state = step(state, c)`` for
    ``c = 0 .. chunks-1`` (or backwards with ``reverse``). Returns the state *entering* each
    chunk stacked along dim 2 (``[N, H, chunks, ...]`` for ``state`` ``[N, H, ...]``) and the
    state after the last chunk."""
    entering: list[torch.Tensor | None] = [None] * chunks
    for c in reversed(range(chunks)) if reverse else range(chunks):
        entering[c] = state
        state = step(state, c)
    return torch.stack(entering, dim=2), state
