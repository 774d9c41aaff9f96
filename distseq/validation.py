"""Input checks shared by the public entry points, and the cross-rank agreement on them.

Every check runs before any collective. Then, unless ``DISTSEQ_CHECK_RANKS=0``, the ranks of
the group exchange one small integer vector (their verdict and a signature of shapes and
options) so that a rank rejecting its input makes *every* rank raise instead of leaving the
others blocked in the strategy's first collective, and so that ranks called with different
shapes or options fail loudly rather than exchange mismatched buffers.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from distseq.comm import GroupInfo, agree
from distseq.kernels.common import host_bounds
from distseq.layout import check_divisible, check_layout

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensors(named: dict[str, torch.Tensor], dims: int, shape_doc: str) -> None:
    """Each is a floating tensor with ``dims`` dims; all share one dtype and one device."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {dims} dims {shape_doc}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; use one of {list(_FLOAT_DTYPES)}")
    names, tensors = ", ".join(named), list(named.values())
    if len({t.dtype for t in tensors}) > 1:
        dtypes = ", ".join(str(t.dtype) for t in tensors)
        raise ValueError(f"{names} dtypes differ ({dtypes}); cast them to one dtype")
    if len({t.device for t in tensors}) > 1:
        devices = ", ".join(str(t.device) for t in tensors)
        raise ValueError(f"{names} are on different devices ({devices}); move them to one device")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shapes ``[B, S_local, Hq, D]`` / ``[B, S_local, Hkv, D]``, one dtype and device."""
    check_tensors({"q": q, "k": k, "v": v}, 4, "[batch, seq, heads, head_dim]")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    (bq, sq, hq, dq), (bk, sk, hk, dk) = q.shape, k.shape
    if (bq, sq, dq) != (bk, sk, dk):
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, sequence and "
            "head_dim ([batch, seq, heads, head_dim])"
        )
    if hk == 0 or hq % hk:
        raise ValueError(
            f"{hq} query heads are not a multiple of {hk} key/value heads; GQA needs Hq % Hkv == 0"
        )


def check_cu_seqlens(
    cu_seqlens: torch.Tensor | None,
    batch: int,
    seq_local: int,
    world_size: int,
    layout: str,
    bounds: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """Validate the global ``cu_seqlens`` and return the global document lengths.

    ``bounds``: the same boundaries as host ints, checked instead of reading ``cu_seqlens``
    back (a host sync on a GPU)."""
    check_layout(layout)
    total = seq_local * world_size
    if cu_seqlens is None:
        check_divisible([total], world_size, layout, "sequence")
        return (total,)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be a 1-D integer tensor of document boundaries")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens has dtype {cu_seqlens.dtype}; use torch.int32")
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed documents), got batch {batch}")
    bounds = list(host_bounds(cu_seqlens, bounds))
    if len(bounds) < 2 or bounds[0] != 0 or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"cu_seqlens {bounds} must start at 0 and be non-decreasing, with at least one document"
        )
    if bounds[-1] != total:
        raise ValueError(
            f"cu_seqlens ends at {bounds[-1]} but the global sequence is {total} tokens "
            f"({seq_local} local x {world_size} ranks); cu_seqlens must be the global boundaries"
        )
    lengths = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    check_divisible(lengths, world_size, layout, "cu_seqlens")
    return lengths


def check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if not isinstance(scale, (int, float)) or not scale > 0 or scale == float("inf"):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)


def signature_code(text: str) -> int:
    """A stable (process-independent) integer for a string option."""
    return zlib.crc32(text.encode())


def _agreement_device(info: GroupInfo) -> torch.device:
    if info.group is not None and dist.get_backend(info.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def validate_on_all_ranks(
    op: str, info: GroupInfo, check: Callable[[], list[int]], names: list[str]
) -> None:
    """Run ``check`` (local validation returning a signature) and agree on it across ranks.

    ``names`` labels the signature's entries for error messages. Raises the local
    ``ValueError`` on the rank that failed, and a ``ValueError`` naming the failing ranks (or
    the disagreeing option) on every other rank.
    """
    error: ValueError | None = None
    try:
        signature = check()
    except ValueError as exc:
        error, signature = exc, [0] * len(names)
    if info.world_size == 1 or os.environ.get("DISTSEQ_CHECK_RANKS", "1") == "0":
        if error is not None:
            raise error
        return
    rows = agree([int(error is None), *signature], info, _agreement_device(info))
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(rows) if row[0] == 0]
    if failed:
        raise ValueError(
            f"{op}: rank(s) {failed} of the group rejected their inputs (see the error raised "
            "there); no rank started communicating"
        )
    for index, name in enumerate(names, start=1):
        values = [row[index] for row in rows]
        if len(set(values)) > 1:
            raise ValueError(
                f"{op}: ranks disagree on {name} (per rank: {values}); every rank of the group "
                "must call it with the same shapes and options"
            )
