"""PyTorch's own fused CUDA attention kernels behind the ``torch`` backend (no extra package).

``torch.ops.aten._flash_attention_forward`` / ``_flash_attention_backward`` (FlashAttention-2
as vendored by PyTorch) return the log-sum-exp and take an externally merged ``out``/``lse``
in the backward, which is what the strategies need; ``cu_seqlens`` make them varlen, and their
causal mask is bottom-right aligned per segment, the convention of :mod:`distseq.kernels`, so
one call serves a whole block. They run fp16/bf16 with ``head_dim % 8 == 0``, ``<= 256`` on
sm80+; GQA is native. ``torch.ops.aten._scaled_dot_product_cudnn_attention`` (and its
backward) is used for whole (non-varlen) blocks where flash cannot run but cuDNN can.
Everything else (float32/float64, other head sizes, older GPUs) falls back to the exact
matmul path of :mod:`distseq.kernels.attention_torch`, which keeps ``S×S`` scores in memory.

Conventions the ops differ in, fixed here: a row that sees no key gets ``lse = +inf`` from
flash (``-inf`` in distseq); rows outside every segment are left unwritten (zeroed here);
the varlen ``lse`` is ``[H, total_q]`` or, in older builds, padded ``[n, H, max_q]`` (both
handled). No call reads a device tensor on the host: the longest segments come from the
caller (the strategies know them on the host) or are bounded by the block's rows.
"""

from __future__ import annotations

import functools

import torch

from distseq.kernels.common import lse_for_backward, no_key_result

FUSED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
_INF = float("inf")


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _kind(device: torch.device, dtype: torch.dtype, head_dim: int, varlen: bool) -> str | None:
    if device.type != "cuda" or dtype not in FUSED_DTYPES:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if head_dim % 8 or head_dim > MAX_HEAD_DIM or _capability(index) < (8, 0):
        return None
    if torch.backends.cuda.is_flash_attention_available():
        return "flash"
    if not varlen and torch.backends.cudnn.is_available():
        return "cudnn"
    return None


def fused_kind(q: torch.Tensor, varlen: bool) -> str | None:
    """``"flash"``, ``"cudnn"`` or ``None`` (use the exact matmul path) for a block like
    ``q`` ``[B, S, H, D]``; ``varlen`` blocks need flash."""
    return _kind(q.device, q.dtype, q.shape[-1], varlen)


def describe_torch_path(device: torch.device, dtype: torch.dtype, head_dim: int = 64) -> str:
    """What the ``torch`` backend runs on ``device``/``dtype`` (for logs)."""
    if device.type == "cpu":
        return "cpu fused flash"
    kind = _kind(device, dtype, head_dim, varlen=True) or _kind(device, dtype, head_dim, False)
    return f"cuda fused {kind}" if kind else f"exact matmul fallback ({dtype})"


def _no_key_to_neg_inf(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isposinf(lse), torch.full_like(lse, -_INF), lse)


def _rows(cu: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of a varlen block: its segment, its position in it, and whether any segment
    covers it (all on the device)."""
    rows = torch.arange(total, device=cu.device, dtype=cu.dtype)
    segment = torch.searchsorted(cu[1:], rows, right=True).clamp_(max=cu.numel() - 2)
    return segment, (rows - cu[segment]).long(), rows < cu[-1]


def _lse_to_rows(lse: torch.Tensor, cu: torch.Tensor, total: int) -> torch.Tensor:
    """The op's varlen ``lse`` -> ``[H, total]``."""
    if lse.dim() == 2:
        return lse
    segment, position, _ = _rows(cu, total)
    return lse[segment.long(), :, position.clamp(max=lse.shape[-1] - 1)].T


def _lse_from_rows(lse: torch.Tensor, cu: torch.Tensor, total: int, max_q: int, padded: bool):
    """``[H, total]`` -> the layout the op's varlen backward reads (padded: ``[n, H, max_q]``)."""
    if not padded:
        return lse.contiguous()
    segment, position, covered = _rows(cu, total)
    # Uncovered rows write to a scratch column (a boolean mask would sync to count them).
    position = torch.where(covered, position, max_q)
    out = lse.new_full((cu.numel() - 1, lse.shape[0], max_q + 1), _INF)
    out[segment.long(), :, position] = lse.T
    return out[..., :max_q].contiguous()


def _maxima(max_q: int | None, max_k: int | None, sq: int, sk: int) -> tuple[int, int]:
    """The longest segments, as the caller knows them on the host; else the block's rows, an
    upper bound the kernels accept (tiles past a segment's end do nothing) that costs memory
    in builds with a padded lse, but no device-to-host read."""
    if max_q is None or max_k is None:
        return sq, sk
    return max_q, max_k


@functools.cache
def _padded_varlen_lse(device: torch.device) -> bool:
    """Whether this build's varlen flash returns a padded ``[n, H, max_q]`` lse (shapes only:
    a tiny forward, once per process and device)."""
    x = torch.zeros(2, 1, 8, dtype=torch.float16, device=device)
    cu = torch.tensor([0, 2], dtype=torch.int32, device=device)
    _, lse, *_ = torch.ops.aten._flash_attention_forward(x, x, x, cu, cu, 2, 2, 0.0, False, False)
    return lse.dim() == 3


def flash_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    cu_q: torch.Tensor | None,
    cu_k: torch.Tensor | None,
    max_q: int | None = None,
    max_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The :mod:`distseq.kernels` ``forward`` contract on flash: ``(out, lse)``."""
    sq, sk = q.shape[1], k.shape[1]
    if sq == 0 or sk == 0:
        return no_key_result(q)
    if cu_q is not None:  # a no-op when the strategy already placed them on the device
        cu_q, cu_k = cu_q.to(q.device, torch.int32), cu_k.to(q.device, torch.int32)
    if cu_q is None:
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, None, None, sq, sk, 0.0, causal, False, scale=scale
        )
        return out, _no_key_to_neg_inf(lse)
    max_q, max_k = _maxima(max_q, max_k, sq, sk)
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q[0], k[0], v[0], cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale
    )
    lse = _no_key_to_neg_inf(_lse_to_rows(lse, cu_q, sq))
    _, _, covered = _rows(cu_q, sq)
    out = torch.where(covered[:, None, None], out, 0)
    lse = torch.where(covered, lse, -_INF)
    return out.unsqueeze(0), lse.unsqueeze(0)


def flash_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    causal: bool,
    cu_q: torch.Tensor | None,
    cu_k: torch.Tensor | None,
    max_q: int | None = None,
    max_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The :mod:`distseq.kernels` ``backward`` contract on flash: ``(dq, dk, dv)``."""
    sq, sk = q.shape[1], k.shape[1]
    if sq == 0 or sk == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dout, out = dout.contiguous(), out.to(q.dtype).contiguous()
    if cu_q is not None:
        cu_q, cu_k = cu_q.to(q.device, torch.int32), cu_k.to(q.device, torch.int32)
    lse = lse_for_backward(lse.float())
    unused = torch.empty(0, dtype=torch.int64, device=q.device)  # dropout's RNG state
    if cu_q is None:
        return torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse.contiguous(), None, None, sq, sk, 0.0, causal, unused,
            unused, scale=scale,
        )  # fmt: skip
    padded = _padded_varlen_lse(q.device)
    max_q, max_k = _maxima(max_q, max_k, sq, sk)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout[0], q[0], k[0], v[0], out[0], _lse_from_rows(lse[0], cu_q, sq, max_q, padded),
        cu_q, cu_k, max_q, max_k, 0.0, causal, unused, unused, scale=scale,
    )  # fmt: skip
    _, _, q_covered = _rows(cu_q, sq)
    _, _, k_covered = _rows(cu_k, sk)
    dq = torch.where(q_covered[:, None, None], dq, 0)
    dk = torch.where(k_covered[:, None, None], dk, 0)
    dv = torch.where(k_covered[:, None, None], dv, 0)
    return dq.unsqueeze(0), dk.unsqueeze(0), dv.unsqueeze(0)


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


def _repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """cuDNN's op wants as many K/V heads as query heads (GQA expanded locally: this is a
    block kernel, nothing extra is communicated)."""
    return t.repeat_interleave(heads // t.shape[2], dim=2)


def cudnn_forward(q, k, v, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One whole block (``causal``: square, top-left = bottom-right) on cuDNN."""
    hq = q.shape[2]
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        *(_heads_first(t) for t in (q, _repeat_heads(k, hq), _repeat_heads(v, hq))),
        None, True, 0.0, causal, False, scale=scale,
    )  # fmt: skip
    b, sq = q.shape[:2]
    return _heads_first(out), _no_key_to_neg_inf(lse.reshape(b, hq, sq).float())


def cudnn_backward(dout, q, k, v, out, lse, scale: float, causal: bool):
    """Gradients of one whole block on cuDNN; K/V gradients summed back to ``Hkv`` heads."""
    b, sq, hq, _ = q.shape
    kr, vr = _repeat_heads(k, hq), _repeat_heads(v, hq)
    unused = torch.empty(0, dtype=torch.int64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        *(_heads_first(t.contiguous()) for t in (dout, q, kr, vr, out.to(q.dtype))),
        lse_for_backward(lse.float()).reshape(b, hq, sq, 1).contiguous(), unused, unused, None,
        None, None, sq, k.shape[1], 0.0, causal, scale=scale,
    )  # fmt: skip
    group = hq // k.shape[2]
    fold = lambda g: _heads_first(g).unflatten(2, (k.shape[2], group)).sum(3)  # noqa: E731
    return _heads_first(dq), fold(dk).to(k.dtype), fold(dv).to(v.dtype)
