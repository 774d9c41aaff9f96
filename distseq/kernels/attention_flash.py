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


def _varlen(cu: torch.Tensor) -> tuple[torch.Tensor, int]:
    cu = cu.to(dtype=torch.int32).contiguous()
    return cu, int(cu.diff().max()) if cu.numel() > 1 else 0


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``[B, Sq, Hq, D]``, ``k``/``v`` ``[B, Sk, Hkv, D]``; returns ``out`` and ``lse``
    ``[B, Hq, Sq]`` (see :mod:`distseq.kernels`)."""
    dim = q.shape[-1]
    qp, kp, vp = (_pad_head_dim(t) for t in (q, k, v))
    if cu_seqlens_q is None:
        out, lse, _, _ = _fa._flash_attn_forward(
            qp, kp, vp, 0.0, scale, causal, _NO_WINDOW, _NO_WINDOW, 0.0, None, False
        )
    else:
        cu_q, max_q = _varlen(cu_seqlens_q)
        cu_k, max_k = _varlen(cu_seqlens_k)
        out, lse, _, _ = _fa._flash_attn_varlen_forward(
            _flat(qp), _flat(kp), _flat(vp), cu_q, cu_k, max_q, max_k, 0.0, scale, causal,
            _NO_WINDOW, _NO_WINDOW, 0.0, None, False,
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block gradients given the final (possibly merged) ``out``/``lse``: ``(dq, dk, dv)``."""
    dim = q.shape[-1]
    # flash-attn reads dout, q, k, v, out in one dtype; the merged out may be float32.
    qp, kp, vp, dop, outp = (_pad_head_dim(t.to(q.dtype)) for t in (q, k, v, dout, out))
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    lse = lse.float().contiguous()
    dq, dk, dv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
    if cu_seqlens_q is None:
        _fa._flash_attn_backward(
            dop, qp, kp, vp, outp, lse, dq, dk, dv, 0.0, scale, causal,
            _NO_WINDOW, _NO_WINDOW, 0.0, None, False,
        )  # fmt: skip
    else:
        cu_q, max_q = _varlen(cu_seqlens_q)
        cu_k, max_k = _varlen(cu_seqlens_k)
        _fa._flash_attn_varlen_backward(
            _flat(dop), _flat(qp), _flat(kp), _flat(vp), _flat(outp), lse.squeeze(0),
            _flat(dq), _flat(dk), _flat(dv), cu_q, cu_k, max_q, max_k, 0.0, scale, causal,
            _NO_WINDOW, _NO_WINDOW, 0.0, None, False,
        )  # fmt: skip
    return dq[..., :dim], dk[..., :dim], dv[..., :dim]
