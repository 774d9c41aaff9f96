"""The ``torch`` attention block backend: runs anywhere PyTorch runs.

On CPU it calls aten's fused flash-attention kernel for CPU, which returns the log-sum-exp
and has a matching backward that accepts an externally merged ``out``/``lse``. On CUDA it
calls PyTorch's fused flash (or cuDNN) kernels where they apply (fp16/bf16; see
:mod:`distseq.kernels.attention_cuda`); otherwise (float32/float64, unsupported head sizes or
GPUs) it falls back to an exact matmul-softmax implementation. Outside the fused CUDA flash
path, segments (``cu_seqlens``) run one by one, and bottom-right causal blocks that are not
square are split into a fully visible key prefix and a square causal part, merged by their
log-sum-exp.
"""

from __future__ import annotations

import torch

from distseq.kernels import attention_cuda
from distseq.kernels.common import accumulator_dtype, lse_for_backward, no_key_result
from distseq.kernels.merge import merge_into

_cpu_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def is_available(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return f"unsupported dtype {dtype}"
    return None


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


def _square_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block where ``causal`` (if set) is the square top-left mask; ``Sq == Sk`` then."""
    if q.device.type == "cpu":
        out, lse = _cpu_forward(
            _heads_first(q), _heads_first(k), _heads_first(v), 0.0, causal, scale=scale
        )
        return _heads_first(out), lse.to(accumulator_dtype(q.dtype))
    if attention_cuda.fused_kind(q, varlen=False) == "cudnn":
        return attention_cuda.cudnn_forward(q, k, v, scale, causal)
    scores, _, vh = _scores(q, k, v, scale, causal)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ vh
    return _heads_first(out).to(q.dtype), lse.to(accumulator_dtype(q.dtype))


def _square_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lse = lse_for_backward(lse)
    if q.device.type == "cpu":
        grads = _cpu_backward(
            *(_heads_first(t) for t in (dout, q, k, v, out.to(q.dtype))),
            lse.to(accumulator_dtype(q.dtype)).contiguous(),
            0.0,
            causal,
            scale=scale,
        )
        return tuple(_heads_first(g) for g in grads)
    if attention_cuda.fused_kind(q, varlen=False) == "cudnn":
        return attention_cuda.cudnn_backward(dout, q, k, v, out, lse, scale, causal)
    scores, kh, vh = _scores(q, k, v, scale, causal)
    probs = torch.exp(scores - lse.unsqueeze(-1).to(scores.dtype))
    do = _heads_first(dout).to(scores.dtype)
    delta = (do * _heads_first(out).to(scores.dtype)).sum(-1, keepdim=True)
    dv = probs.transpose(-1, -2) @ do
    dscores = probs * (do @ vh.transpose(-1, -2) - delta) * scale
    dq = dscores @ kh
    dk = dscores.transpose(-1, -2) @ _heads_first(q).to(scores.dtype)
    return _heads_first(dq).to(q.dtype), _fold_heads(dk, k), _fold_heads(dv, k)


def _scores(q, k, v, scale, causal):
    """Scaled (masked) scores ``[B, Hq, Sq, Sk]`` and K, V ``[B, Hq, Sk, D]`` repeated per query
    head, all in the accumulator dtype."""
    group = q.shape[2] // k.shape[2]
    compute = accumulator_dtype(q.dtype)
    qh = _heads_first(q).to(compute)
    kh = _heads_first(k).repeat_interleave(group, dim=1).to(compute)
    vh = _heads_first(v).repeat_interleave(group, dim=1).to(compute)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores, kh, vh


def _fold_heads(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B, Hq, S, D]`` per-query-head K/V gradients summed into ``like``'s ``Hkv`` heads."""
    b, hq, s, d = grad.shape
    hkv = like.shape[2]
    return _heads_first(grad.view(b, hkv, hq // hkv, s, d).sum(2)).to(like.dtype)


def _segment_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    offset = sk - sq
    if sq == 0 or sk == 0:
        return no_key_result(q)
    if not causal or offset == 0:
        return _square_forward(q, k, v, scale, causal)
    if offset < 0:  # the first -offset queries see no key at all
        out, lse = no_key_result(q)
        out[:, -offset:], lse[:, :, -offset:] = _square_forward(q[:, -offset:], k, v, scale, True)
        return out, lse
    out, lse = _square_forward(q, k[:, :offset], v[:, :offset], scale, False)
    acc, acc_lse = out.to(accumulator_dtype(out.dtype)), lse.clone()
    o, l = _square_forward(q, k[:, offset:], v[:, offset:], scale, True)
    merge_into(acc, acc_lse, o, l)
    return acc.to(q.dtype), acc_lse


def _segment_backward(dout, q, k, v, out, lse, scale, causal):
    sq, sk = q.shape[1], k.shape[1]
    offset = sk - sq
    if sq == 0 or sk == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if not causal or offset == 0:
        return _square_backward(dout, q, k, v, out, lse, scale, causal)
    if offset < 0:
        rows = slice(-offset, None)
        dq = torch.zeros_like(q)
        dq[:, rows], dk, dv = _square_backward(
            dout[:, rows], q[:, rows], k, v, out[:, rows], lse[:, :, rows], scale, True
        )
        return dq, dk, dv
    dq_a, dk_a, dv_a = _square_backward(
        dout, q, k[:, :offset], v[:, :offset], out, lse, scale, False
    )
    dq_b, dk_b, dv_b = _square_backward(
        dout, q, k[:, offset:], v[:, offset:], out, lse, scale, True
    )
    return dq_a + dq_b, torch.cat([dk_a, dk_b], 1), torch.cat([dv_a, dv_b], 1)


def _segments(
    cu_q: torch.Tensor | None, cu_k: torch.Tensor | None, sq: int, sk: int
) -> list[tuple[slice, slice]] | None:
    """Each segment's ``(q rows, k rows)``, or ``None`` when the block is one whole segment."""
    if cu_q is None:
        return None
    bq, bk = cu_q.tolist(), cu_k.tolist()
    segments = [(slice(a, b), slice(c, d)) for a, b, c, d in zip(bq[:-1], bq[1:], bk[:-1], bk[1:])]
    return None if segments == [(slice(0, sq), slice(0, sk))] else segments


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
    """Block attention: ``q`` ``[B, Sq, Hq, D]``, ``k``/``v`` ``[B, Sk, Hkv, D]``.

    Returns ``out`` ``[B, Sq, Hq, D]`` and ``lse`` ``[B, Hq, Sq]`` (see :mod:`distseq.kernels`).
    """
    if attention_cuda.fused_kind(q, varlen=cu_seqlens_q is not None) == "flash":
        return attention_cuda.flash_forward(
            q, k, v, scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
        )
    segments = _segments(cu_seqlens_q, cu_seqlens_k, q.shape[1], k.shape[1])
    if segments is None:
        return _segment_forward(q, k, v, scale, causal)
    out, lse = no_key_result(q)
    for rows, cols in segments:
        if rows.stop > rows.start:
            o, l = _segment_forward(q[:, rows], k[:, cols], v[:, cols], scale, causal)
            out[:, rows] = o
            lse[:, :, rows] = l
    return out, lse


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
    """Block gradients given the final ``out``/``lse`` of the rows: ``(dq, dk, dv)``."""
    if attention_cuda.fused_kind(q, varlen=cu_seqlens_q is not None) == "flash":
        return attention_cuda.flash_backward(
            dout, q, k, v, out, lse, scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            max_seqlen_k,
        )  # fmt: skip
    segments = _segments(cu_seqlens_q, cu_seqlens_k, q.shape[1], k.shape[1])
    if segments is None:
        return _segment_backward(dout, q, k, v, out, lse, scale, causal)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rows, cols in segments:
        if rows.stop > rows.start:
            dq[:, rows], dk[:, cols], dv[:, cols] = _segment_backward(
                dout[:, rows],
                q[:, rows],
                k[:, cols],
                v[:, cols],
                out[:, rows],
                lse[:, :, rows],
                scale,
                causal,
            )
    return dq, dk, dv
