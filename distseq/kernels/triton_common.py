"""What our Triton kernel modules share: the optional import, availability, launch helpers and
the row-tile loads and stores of their kernels.

The kernels need a CUDA device, or ``TRITON_INTERPRET=1`` set *before* the kernel module is
imported to run them on CPU tensors with Triton's interpreter (slow; meant for tests).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as _exc:  # the backends are optional; is_available() reports why
    triton = None
    tl = None
    IMPORT_ERROR: str | None = f"triton is not installed ({_exc})"
else:
    IMPORT_ERROR = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Tiles hold a whole head dim (attention) or a Dk row (linear attention) in registers.
MAX_HEAD_DIM = 256


def jit(fn):
    # Without triton the modules must still import; the kernels are then never called.
    return fn if triton is None else triton.jit(fn)


def interpreted(kernel) -> bool:
    """Whether ``kernel`` was built for Triton's CPU interpreter (decided at import time)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def unavailable_reason(device: torch.device, dtype: torch.dtype, module: str, kernel) -> str | None:
    """``None`` when ``module``'s kernels (``kernel`` is one of them) can run, else why not."""
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    if dtype not in SUPPORTED_DTYPES:
        return f"unsupported dtype {dtype} (supported: float32, float16, bfloat16)"
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1)"
        if not interpreted(kernel):
            return (
                f"TRITON_INTERPRET=1 was not set when {module} was imported, so its kernels "
                "were compiled for the GPU"
            )
        return None
    return f"device type {device.type!r} is not supported (needs cuda)"


def rows_last_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any batch/seq/head strides but assume unit stride along head_dim.
    return t if t.stride(-1) == 1 else t.contiguous()


def precision(dtype: torch.dtype) -> str:
    # float32 inputs get true fp32 dots (not tf32) so the backend matches the fp32 contract.
    return "ieee" if dtype == torch.float32 else "tf32"


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """Launch ``kernel`` unless the grid is empty (Triton rejects zero-sized grids)."""
    if all(g > 0 for g in grid):
        kernel[grid](*args, **meta)


def strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, sequence and head strides of a ``[B, S, H, D]`` tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


@jit
def load_rows(base, stride_s, rows, row_mask, cols, col_mask):
    """The ``[rows, cols]`` tile at ``base`` (row stride ``stride_s``, unit column stride);
    masked-off elements read 0."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_s + cols[None, :]
    return tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@jit
def store_rows(base, stride_s, rows, row_mask, cols, col_mask, value):
    """Store ``value`` into the ``[rows, cols]`` tile at ``base``, cast to its element type."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_s + cols[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
