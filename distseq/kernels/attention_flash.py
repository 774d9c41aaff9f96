"""The ``flash`` attention block backend: flash-attn 2 (>= 2.7) kernels on CUDA.

Wraps flash-attn's internal forward/backward entry points (the public functions hide the
log-sum-exp and cannot take an externally merged ``out``/``lse``). flash-attn marks a row
that sees no key with ``lse = +inf``; the backend contract says ``-inf``, so values are
translated at the boundary. Heads of K/V may be fewer than those of Q (flash-attn does GQA
natively); head dims that are not a multiple of 8 are zero-padded as flash-attn requires.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distseq.kernels.common import lse_for_backward

try:
    from flash_attn import flash_attn_interface as _fa
except ImportError as _exc:  # optional dependency: is_available() reports why
    _fa = None
    _IMPORT_ERROR: str | None = f"flash-attn is not installed ({_exc})"
else:
    _IMPORT_ERROR = None

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_NO_WINDOW = -1


def is_available(device: torch.device, dtype: torch.dtype) -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if torch.device(device).type != "cuda":
        return "flash-attn needs CUDA tensors"
    if dtype not in _SUPPORTED_DTYPES:
        return f"flash-attn supports float16/bfloat16, not {dtype}"
    return None


def _pad_head_dim(t: torch.Tensor) -> torch.Tensor:
    extra = -t.shape[-1] % 8
    return F.pad(t, (0, extra)) if extra else t


def _varlen(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_q, max_k) -> tuple:
    """flash-attn's ``cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k`` arguments
    (the maxima read from the device, a host sync, only when the caller did not give them)."""
    cu_q, cu_k = (cu.to(dtype=torch.int32).contiguous() for cu in (cu_seqlens_q, cu_seqlens_k))
    if max_q is not None and max_k is not None:
        return cu_q, cu_k, max_q, max_k
    return cu_q, cu_k, *(int(cu.diff().max()) if cu.numel() > 1 else 0 for cu in (cu_q, cu_k))


def _options(scale: float, causal: bool) -> tuple:
    """flash-attn's trailing arguments, the same for all four entry points: no dropout,
    ``scale``, ``causal``, no sliding window, no softcap, no ALiBi, and ``False`` (forward: no
    softmax returned; backward: not deterministic)."""
    return 0.0, scale, causal, _NO_WINDOW, _NO_WINDOW, 0.0, None, False


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``[1, S, H, D]`` -> ``[S, H, D]`` (flash-attn's varlen layout)."""
    return t.squeeze(0)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``[B, Sq, Hq, D]``, ``k``/``v`` ``[B, Sk, Hkv, D]``; returns ``out`` and ``lse``
    ``[B, Hq, Sq]`` (see :mod:`distseq.kernels`)."""
    dim = q.shape[-1]
    qp, kp, vp = (_pad_head_dim(t) for t in (q, k, v))
    if cu_seqlens_q is None:
        out, lse, _, _ = _fa._flash_attn_forward(qp, kp, vp, *_options(scale, causal))
    else:
        out, lse, _, _ = _fa._flash_attn_varlen_forward(
            _flat(qp), _flat(kp), _flat(vp),
            *_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
            *_options(scale, causal),
        )  # fmt: skip
        out, lse = out.unsqueeze(0), lse.unsqueeze(0)  # lse [H, total] -> [1, H, total]
    lse = torch.where(torch.isposinf(lse), torch.full_like(lse, float("-inf")), lse)
    return out[..., :dim], lse


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block gradients given the final (possibly merged) ``out``/``lse``: ``(dq, dk, dv)``."""
    dim = q.shape[-1]
    # flash-attn reads dout, q, k, v, out in one dtype; the merged out may be float32.
    qp, kp, vp, dop, outp = (_pad_head_dim(t.to(q.dtype)) for t in (q, k, v, dout, out))
    lse = lse_for_backward(lse).float().contiguous()
    dq, dk, dv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
    if cu_seqlens_q is None:
        _fa._flash_attn_backward(dop, qp, kp, vp, outp, lse, dq, dk, dv, *_options(scale, causal))
    else:
        _fa._flash_attn_varlen_backward(
            _flat(dop), _flat(qp), _flat(kp), _flat(vp), _flat(outp), lse.squeeze(0),
            _flat(dq), _flat(dk), _flat(dv),
            *_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
            *_options(scale, causal),
        )  # fmt: skip
    return dq[..., :dim], dk[..., :dim], dv[..., :dim]
