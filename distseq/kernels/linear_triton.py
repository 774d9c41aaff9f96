"""Chunked causal linear attention with scalar decay, forward and backward, in Triton.

Per head: ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``, ``S_0`` = the initial
state; with ``cu_seqlens`` the state restarts at each segment start.

Design: one program per (Dv block, batch row or segment, head) walks its row's chunks of
``chunk_size`` tokens in order and keeps the state block ``S`` ``[Dk, BLOCK_DV]`` in float32
registers. Inside a chunk, with ``b_t`` the chunk-local cumulative log decay (fp32),

    o_t   = scale (exp(b_t) q_t S + sum_{s <= t} exp(b_t - b_s) (q_t . k_s) v_s)
    S_new = exp(b_C) S + sum_s exp(b_C - b_s) k_s^T v_s            (b_C: the chunk's total)

so every exponent is ``<= 0`` (the causal mask is applied to the exponent, before ``exp``).
Backward is two kernels of the same shape, nothing saved from the forward:

- ``_bwd_dq_kernel`` walks forward again, recomputing ``S`` for ``dq``, and at the end
  returns ``sum(S_T * dS_T)`` for the decay gradient.
- ``_bwd_dkdv_kernel`` walks backward carrying ``dS`` (from ``dS_T``) for ``dk``/``dv``:
  ``dS_prev = exp(b_C) dS + scale sum_t exp(b_t) q_t^T do_t``; what it holds after the first
  chunk is the gradient of the initial state.

``dq``/``dk`` sum over Dv, so programs of different Dv blocks write float32 partials that
torch adds up. With ``G`` the cumulative log decay of a segment, ``dL/dG_t = q_t . dq_t -
k_t . dk_t`` (+ ``sum(S_T * dS_T)`` at the segment's last token; ``exp(G_t) S_0`` already lives
in ``q_t . dq_t``), and ``dg`` is its reverse cumulative sum within the segment (float64, in
torch).

The kernels need a CUDA device, or ``TRITON_INTERPRET=1`` *when this module is imported* to
run them on CPU tensors with Triton's interpreter (slow; meant for tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distseq.kernels import attention_triton
from distseq.kernels.attention_triton import (
    _jit,
    _launch,
    _precision,
    _rows_last_contiguous,
    tl,
    triton,
)
from distseq.validation import check_cu_seqlens, check_scale

MAX_HEAD_DIM = 256

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@_jit
def _row_bounds(CU, pid_n, seqlen, VARLEN: tl.constexpr):
    """(batch, first token, length) of batch row / segment ``pid_n``; offsets in int64."""
    if VARLEN:
        start = tl.load(CU + pid_n)
        return 0, start.to(tl.int64), tl.load(CU + pid_n + 1) - start
    else:
        return pid_n.to(tl.int64), 0, seqlen


@_jit
def _chunk_decay(g_base, stride_gs, rows, row_mask, HAS_DECAY: tl.constexpr, CHUNK: tl.constexpr):
    """Chunk-local inclusive cumulative log decay ``b`` ``[CHUNK]`` and the chunk total.

    Padding rows add 0, so the total is ``b`` at the last real token.
    """
    if HAS_DECAY:
        g = tl.load(g_base + rows.to(tl.int64) * stride_gs, mask=row_mask, other=0.0)
        return tl.cumsum(g, 0), tl.sum(g, 0)
    else:
        b = tl.zeros([CHUNK], tl.float32)
        return b, tl.sum(b, 0)


@_jit
def _load_rows(base, stride_s, rows, row_mask, cols, col_mask):
    ptrs = base + rows.to(tl.int64)[:, None] * stride_s + cols[None, :]
    return tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@_jit
def _store_rows(base, stride_s, rows, row_mask, cols, col_mask, value):
    ptrs = base + rows.to(tl.int64)[:, None] * stride_s + cols[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@_jit
def _state_ptrs(base, pid_n, head, n_heads, offs_k, offs_v, DK: tl.constexpr, DV: tl.constexpr):
    """Pointers and mask of this program's ``[Dk, BLOCK_DV]`` block of an ``[N, H, Dk, Dv]``."""
    first = (pid_n * n_heads + head).to(tl.int64) * DK * DV
    ptrs = base + first + offs_k[:, None] * DV + offs_v[None, :]
    return ptrs, (offs_k[:, None] < DK) & (offs_v[None, :] < DV)


@_jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b (+ acc)`` accumulated in float32.

    ``UPCAST``: Triton's interpreter multiplies the raw bit patterns of bfloat16 operands
    (triton-lang/triton#11584), so there the already bf16-rounded operands are widened to
    float32 first, which gives the same products as bf16 tensor cores.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@_jit
def _fwd_kernel(
    Q, K, V, G, H0, O, HT, CU,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_gb, stride_gs, stride_gh,
    stride_ob, stride_os, stride_oh, seqlen, n_heads, scale,
    HAS_DECAY: tl.constexpr, HAS_INIT: tl.constexpr, VARLEN: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    pid_v = tl.program_id(0)
    pid_n = tl.program_id(1)
    head = tl.program_id(2)
    batch, start, length = _row_bounds(CU, pid_n, seqlen, VARLEN)
    offs_c = tl.arange(0, CHUNK)
    offs_k = tl.arange(0, BLOCK_DK)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    k_mask = offs_k < DK
    v_mask = offs_v < DV
    causal = offs_c[:, None] >= offs_c[None, :]  # [t, s]
    q_base = Q + batch * stride_qb + head * stride_qh + start * stride_qs
    k_base = K + batch * stride_kb + head * stride_kh + start * stride_ks
    v_base = V + batch * stride_vb + head * stride_vh + start * stride_vs
    g_base = G + batch * stride_gb + head * stride_gh + start * stride_gs
    o_base = O + batch * stride_ob + head * stride_oh + start * stride_os
    h0_ptrs, state_mask = _state_ptrs(H0, pid_n, head, n_heads, offs_k, offs_v, DK, DV)
    if HAS_INIT:
        state = tl.load(h0_ptrs, mask=state_mask, other=0.0)
    else:
        state = tl.zeros([BLOCK_DK, BLOCK_DV], tl.float32)

    for c0 in range(0, length, CHUNK):
        rows = c0 + offs_c
        row_mask = rows < length
        q = _load_rows(q_base, stride_qs, rows, row_mask, offs_k, k_mask)
        k = _load_rows(k_base, stride_ks, rows, row_mask, offs_k, k_mask)
        v = _load_rows(v_base, stride_vs, rows, row_mask, offs_v, v_mask)
        b, b_last = _chunk_decay(g_base, stride_gs, rows, row_mask, HAS_DECAY, CHUNK)
        weight = tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
        scores = _dot(q, tl.trans(k), None, PRECISION, UPCAST) * weight
        out = _dot(q, state.to(q.dtype), None, PRECISION, UPCAST) * tl.exp(b)[:, None]
        out = _dot(scores.to(v.dtype), v, out, PRECISION, UPCAST)
        _store_rows(o_base, stride_os, rows, row_mask, offs_v, v_mask, out * scale)
        k_decayed = (k * tl.exp(b_last - b)[:, None]).to(k.dtype)
        state = state * tl.exp(b_last)
        state = _dot(tl.trans(k_decayed), v, state, PRECISION, UPCAST)

    ht_ptrs, _ = _state_ptrs(HT, pid_n, head, n_heads, offs_k, offs_v, DK, DV)
    tl.store(ht_ptrs, state, mask=state_mask)


@_jit
def _bwd_dq_kernel(
    K, V, G, H0, DO, DHT, DQ, STATE_DOT, CU,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_gb, stride_gs, stride_gh, stride_dob, stride_dos, stride_doh,
    stride_dqv, stride_dqb, stride_dqs, stride_dqh, seqlen, n_heads, n_rows, scale,
    HAS_DECAY: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
    VARLEN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """Partial ``dq`` of one Dv block into ``DQ[pid_v]`` and ``sum(S_T * dS_T)`` of the block."""
    pid_v = tl.program_id(0)
    pid_n = tl.program_id(1)
    head = tl.program_id(2)
    batch, start, length = _row_bounds(CU, pid_n, seqlen, VARLEN)
    offs_c = tl.arange(0, CHUNK)
    offs_k = tl.arange(0, BLOCK_DK)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    k_mask = offs_k < DK
    v_mask = offs_v < DV
    causal = offs_c[:, None] >= offs_c[None, :]  # [t, s]
    k_base = K + batch * stride_kb + head * stride_kh + start * stride_ks
    v_base = V + batch * stride_vb + head * stride_vh + start * stride_vs
    g_base = G + batch * stride_gb + head * stride_gh + start * stride_gs
    do_base = DO + batch * stride_dob + head * stride_doh + start * stride_dos
    dq_base = DQ + pid_v * stride_dqv + batch * stride_dqb + head * stride_dqh + start * stride_dqs
    h0_ptrs, state_mask = _state_ptrs(H0, pid_n, head, n_heads, offs_k, offs_v, DK, DV)
    if HAS_INIT:
        state = tl.load(h0_ptrs, mask=state_mask, other=0.0)
    else:
        state = tl.zeros([BLOCK_DK, BLOCK_DV], tl.float32)

    for c0 in range(0, length, CHUNK):
        rows = c0 + offs_c
        row_mask = rows < length
        k = _load_rows(k_base, stride_ks, rows, row_mask, offs_k, k_mask)
        v = _load_rows(v_base, stride_vs, rows, row_mask, offs_v, v_mask)
        do = _load_rows(do_base, stride_dos, rows, row_mask, offs_v, v_mask)
        b, b_last = _chunk_decay(g_base, stride_gs, rows, row_mask, HAS_DECAY, CHUNK)
        weight = tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
        dscores = _dot(do, tl.trans(v), None, PRECISION, UPCAST) * weight
        dq = _dot(do, tl.trans(state).to(do.dtype), None, PRECISION, UPCAST)
        dq = dq * tl.exp(b)[:, None]
        dq = _dot(dscores.to(k.dtype), k, dq, PRECISION, UPCAST)
        _store_rows(dq_base, stride_dqs, rows, row_mask, offs_k, k_mask, dq * scale)
        k_decayed = (k * tl.exp(b_last - b)[:, None]).to(k.dtype)
        state = state * tl.exp(b_last)
        state = _dot(tl.trans(k_decayed), v, state, PRECISION, UPCAST)

    if HAS_DFINAL:
        dht_ptrs, _ = _state_ptrs(DHT, pid_n, head, n_heads, offs_k, offs_v, DK, DV)
        dfinal = tl.load(dht_ptrs, mask=state_mask, other=0.0)
        state_dot = tl.sum(tl.sum(state * dfinal, 1), 0)
    else:
        state_dot = 0.0
    tl.store(STATE_DOT + (pid_v * n_rows + pid_n) * n_heads + head, state_dot)


@_jit
def _bwd_dkdv_kernel(
    Q, K, V, G, DO, DHT, DK_PART, DV_OUT, DH0, CU,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_gb, stride_gs, stride_gh,
    stride_dob, stride_dos, stride_doh, stride_dkv, stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh, seqlen, n_heads, scale,
    HAS_DECAY: tl.constexpr, HAS_DFINAL: tl.constexpr, VARLEN: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """Reverse walk: ``dv``, partial ``dk`` of one Dv block, and the initial state's gradient."""
    pid_v = tl.program_id(0)
    pid_n = tl.program_id(1)
    head = tl.program_id(2)
    batch, start, length = _row_bounds(CU, pid_n, seqlen, VARLEN)
    offs_c = tl.arange(0, CHUNK)
    offs_k = tl.arange(0, BLOCK_DK)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    k_mask = offs_k < DK
    v_mask = offs_v < DV
    # Transposed ([s, t]) so that dk, dv accumulate without transposing the score tiles.
    causal_t = offs_c[:, None] <= offs_c[None, :]
    q_base = Q + batch * stride_qb + head * stride_qh + start * stride_qs
    k_base = K + batch * stride_kb + head * stride_kh + start * stride_ks
    v_base = V + batch * stride_vb + head * stride_vh + start * stride_vs
    g_base = G + batch * stride_gb + head * stride_gh + start * stride_gs
    do_base = DO + batch * stride_dob + head * stride_doh + start * stride_dos
    dk_base = (
        DK_PART + pid_v * stride_dkv + batch * stride_dkb + head * stride_dkh + start * stride_dks
    )
    dv_base = DV_OUT + batch * stride_dvb + head * stride_dvh + start * stride_dvs
    dht_ptrs, state_mask = _state_ptrs(DHT, pid_n, head, n_heads, offs_k, offs_v, DK, DV)
    if HAS_DFINAL:
        dstate = tl.load(dht_ptrs, mask=state_mask, other=0.0)
    else:
        dstate = tl.zeros([BLOCK_DK, BLOCK_DV], tl.float32)

    n_chunks = tl.cdiv(length, CHUNK)
    for i in range(n_chunks):
        rows = (n_chunks - 1 - i) * CHUNK + offs_c
        row_mask = rows < length
        q = _load_rows(q_base, stride_qs, rows, row_mask, offs_k, k_mask)
        k = _load_rows(k_base, stride_ks, rows, row_mask, offs_k, k_mask)
        v = _load_rows(v_base, stride_vs, rows, row_mask, offs_v, v_mask)
        do = _load_rows(do_base, stride_dos, rows, row_mask, offs_v, v_mask)
        b, b_last = _chunk_decay(g_base, stride_gs, rows, row_mask, HAS_DECAY, CHUNK)
        weight_t = tl.exp(tl.where(causal_t, b[None, :] - b[:, None], float("-inf"))) * scale
        to_end = tl.exp(b_last - b)[:, None]  # decay from token s to the chunk's last token
        scores_t = _dot(k, tl.trans(q), None, PRECISION, UPCAST) * weight_t
        dv = _dot(k, dstate.to(k.dtype), None, PRECISION, UPCAST) * to_end
        dv = _dot(scores_t.to(do.dtype), do, dv, PRECISION, UPCAST)
        _store_rows(dv_base, stride_dvs, rows, row_mask, offs_v, v_mask, dv)
        dscores_t = _dot(v, tl.trans(do), None, PRECISION, UPCAST) * weight_t
        dk = _dot(v, tl.trans(dstate).to(v.dtype), None, PRECISION, UPCAST) * to_end
        dk = _dot(dscores_t.to(q.dtype), q, dk, PRECISION, UPCAST)
        _store_rows(dk_base, stride_dks, rows, row_mask, offs_k, k_mask, dk)
        q_decayed = (q * (tl.exp(b) * scale)[:, None]).to(q.dtype)
        dstate = dstate * tl.exp(b_last)
        dstate = _dot(tl.trans(q_decayed), do, dstate, PRECISION, UPCAST)

    dh0_ptrs, _ = _state_ptrs(DH0, pid_n, head, n_heads, offs_k, offs_v, DK, DV)
    tl.store(dh0_ptrs, dstate, mask=state_mask)


# --------------------------------------------------------------------------------------------
# Python wrappers
# --------------------------------------------------------------------------------------------


def _kernels_interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (decided at import time)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_fwd_kernel, InterpretedFunction)


def is_available(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` when the Triton kernels can run on ``device`` with ``dtype``, else the reason."""
    # Same requirements as the attention kernels (triton, dtype, CUDA or the interpreter).
    reason = attention_triton.is_available(device, dtype)
    if reason is not None or torch.device(device).type != "cpu":
        return reason
    if not _kernels_interpreted():
        return (
            "TRITON_INTERPRET=1 was not set when distseq.kernels.linear_triton was imported, "
            "so its kernels were compiled for the GPU"
        )
    return None


def _tile_sizes(block_dk: int, dv: int) -> tuple[int, int]:
    """``(BLOCK_DV, num_warps)``: the state block ``[Dk, BLOCK_DV]`` lives in registers.

    Untuned conservative defaults; tests monkeypatch this to force several Dv blocks.
    """
    block_dv = min(max(16, triton.next_power_of_2(dv)), 64 if block_dk <= 64 else 32)
    return block_dv, 4


class _Problem:
    """Validated inputs, the launch geometry and the constexpr flags shared by all kernels."""

    def __init__(self, q, k, v, log_decay, scale, initial_state, cu_seqlens, chunk_size) -> None:
        _check_tensors(q, k, v, log_decay)
        batch, seqlen, heads, dk = q.shape
        dv = v.shape[3]
        self.scale = check_scale(scale, dk)
        if not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size & (chunk_size - 1):
            raise ValueError(
                f"chunk_size must be a power of two >= 16 (tl.dot tiles), got {chunk_size!r}"
            )
        self.varlen = cu_seqlens is not None
        if self.varlen:
            check_cu_seqlens(cu_seqlens, batch, seqlen, 1, "contiguous")
            self.cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
            self.rows = self.cu.numel() - 1
        else:
            self.cu = torch.zeros(1, dtype=torch.int32, device=q.device)
            self.rows = batch
        state_shape = (self.rows, heads, dk, dv)
        if initial_state is not None and tuple(initial_state.shape) != state_shape:
            what = "segments" if self.varlen else "batch rows"
            raise ValueError(
                f"initial_state has shape {tuple(initial_state.shape)}; expected {state_shape} "
                f"([{what}, heads, Dk, Dv])"
            )
        self.q, self.k, self.v = (_rows_last_contiguous(t) for t in (q, k, v))
        self.has_decay = log_decay is not None
        # A dummy pointer when there is no decay; HAS_DECAY=False never reads it.
        self.g = log_decay.float() if self.has_decay else self.cu
        self.h0 = None if initial_state is None else initial_state.float().contiguous()
        self.state_shape = state_shape
        self.chunk = chunk_size
        block_dk = max(16, triton.next_power_of_2(dk))
        block_dv, self.warps = _tile_sizes(block_dk, dv)
        self.grid = (triton.cdiv(dv, block_dv), self.rows, heads)
        self.meta = {
            "VARLEN": self.varlen, "DK": dk, "DV": dv, "CHUNK": chunk_size, "BLOCK_DK": block_dk,
            "BLOCK_DV": block_dv, "PRECISION": _precision(q.dtype), "num_warps": self.warps,
            "UPCAST": q.dtype == torch.bfloat16 and _kernels_interpreted(),
        }  # fmt: skip

    def g_strides(self) -> tuple[int, int, int]:
        return (
            (self.g.stride(0), self.g.stride(1), self.g.stride(2)) if self.has_decay else (0,) * 3
        )


def _check_tensors(q, k, v, log_decay) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, seq, heads, head_dim]")
    if q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: q and k must match, "
            "and v must agree with them in [batch, seq, heads]"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them")
    if max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(
            f"head dims Dk={q.shape[3]}, Dv={v.shape[3]}: at most {MAX_HEAD_DIM} is supported"
        )
    if log_decay is not None and (
        not isinstance(log_decay, torch.Tensor) or tuple(log_decay.shape) != tuple(q.shape[:3])
    ):
        got = tuple(log_decay.shape) if isinstance(log_decay, torch.Tensor) else log_decay
        raise ValueError(f"log_decay {got} must be a tensor [batch, seq, heads] = {q.shape[:3]}")
    reason = is_available(q.device, q.dtype)
    if reason is not None:
        raise ValueError(f"triton linear attention cannot run: {reason}")


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    *,
    scale: float | None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention with optional scalar decay.

    ``q``/``k`` ``[B, S, H, Dk]``, ``v`` ``[B, S, H, Dv]`` (float32, float16 or bfloat16),
    ``log_decay`` ``[B, S, H]`` (``g_t <= 0``, natural log; ``None`` = no decay),
    ``initial_state`` ``[N, H, Dk, Dv]`` (``None`` = zeros) with ``N = B``, or the number of
    segments of ``cu_seqlens`` (int32 ``[N + 1]`` from 0 to ``S``, ``B == 1``; segments may be
    empty and need not align with chunks). Returns ``o`` ``[B, S, H, Dv]`` in ``q.dtype`` and
    the final states ``[N, H, Dk, Dv]`` float32.
    """
    p = _Problem(q, k, v, log_decay, scale, initial_state, cu_seqlens, chunk_size)
    out = torch.empty_like(p.v)
    final = torch.empty(p.state_shape, dtype=torch.float32, device=q.device)
    _launch(
        _fwd_kernel, p.grid, p.q, p.k, p.v, p.g, p.h0 if p.h0 is not None else final,
        out, final, p.cu, *_strides(p.q), *_strides(p.k), *_strides(p.v), *p.g_strides(),
        *_strides(out), q.shape[1], q.shape[2], p.scale, HAS_DECAY=p.has_decay,
        HAS_INIT=p.h0 is not None, **p.meta,
    )  # fmt: skip
    return out, final


def backward(
    do: torch.Tensor,
    dfinal_state: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    *,
    scale: float | None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Gradients of :func:`forward` given ``do`` ``[B, S, H, Dv]`` and ``dfinal_state``.

    ``dfinal_state`` ``[N, H, Dk, Dv]`` (``None`` = zeros); other arguments as in
    :func:`forward`, which is recomputed as needed. Returns ``dq``/``dk`` ``[B, S, H, Dk]`` and
    ``dv`` ``[B, S, H, Dv]`` in ``q.dtype``, ``dlog_decay`` ``[B, S, H]`` in ``log_decay``'s
    dtype (``None`` iff ``log_decay`` is ``None``) and ``dinitial_state`` ``[N, H, Dk, Dv]``
    float32.
    """
    p = _Problem(q, k, v, log_decay, scale, initial_state, cu_seqlens, chunk_size)
    if do.shape != v.shape:
        raise ValueError(f"do {tuple(do.shape)} must have v's shape {tuple(v.shape)}")
    if dfinal_state is not None and tuple(dfinal_state.shape) != p.state_shape:
        raise ValueError(
            f"dfinal_state has shape {tuple(dfinal_state.shape)}; expected {p.state_shape}"
        )
    # do meets v and k in tl.dot, whose operands must share a dtype.
    do = _rows_last_contiguous(do.to(q.dtype))
    dht = None if dfinal_state is None else dfinal_state.float().contiguous()
    n_v, rows, heads = p.grid
    dq_part = torch.empty((n_v, *q.shape), dtype=torch.float32, device=q.device)
    dk_part = torch.empty_like(dq_part)
    dv = torch.empty_like(p.v)
    dh0 = torch.empty(p.state_shape, dtype=torch.float32, device=q.device)
    state_dot = torch.empty((n_v, rows, heads), dtype=torch.float32, device=q.device)
    flags = {"HAS_DECAY": p.has_decay, "HAS_DFINAL": dht is not None, **p.meta}
    _launch(
        _bwd_dq_kernel, p.grid, p.k, p.v, p.g, p.h0 if p.h0 is not None else dh0, do,
        dht if dht is not None else dh0, dq_part, state_dot, p.cu, *_strides(p.k),
        *_strides(p.v), *p.g_strides(), *_strides(do), *dq_part.stride()[:4], q.shape[1],
        heads, rows, p.scale, HAS_INIT=p.h0 is not None, **flags,
    )  # fmt: skip
    _launch(
        _bwd_dkdv_kernel, p.grid, p.q, p.k, p.v, p.g, do, dht if dht is not None else dh0,
        dk_part, dv, dh0, p.cu, *_strides(p.q), *_strides(p.k), *_strides(p.v),
        *p.g_strides(), *_strides(do), *dk_part.stride()[:4], *_strides(dv), q.shape[1],
        heads, p.scale, **flags,
    )  # fmt: skip
    dq, dk = dq_part.sum(0), dk_part.sum(0)
    dg = None
    if p.has_decay:
        token_dot = (p.q.float() * dq).sum(-1) - (p.k.float() * dk).sum(-1)
        dg = _decay_grad(token_dot, state_dot.sum(0), p.cu if p.varlen else None)
        dg = dg.to(log_decay.dtype)
    return dq.to(q.dtype), dk.to(q.dtype), dv, dg, dh0


def _decay_grad(
    token_dot: torch.Tensor, state_dot: torch.Tensor, cu_seqlens: torch.Tensor | None
) -> torch.Tensor:
    """``dg`` ``[B, S, H]`` from ``dL/dG_t`` without its state term (``token_dot``) and the
    per-row ``sum(S_T * dS_T)`` ``[N, H]``.

    ``dg_t = sum_{u >= t in t's segment} dL/dG_u``; the suffix sums run in float64 so that
    subtracting the part beyond a segment does not cancel precision away.
    """
    suffix = token_dot.double().flip(1).cumsum(1).flip(1)
    if cu_seqlens is None:
        return suffix + state_dot.double()[:, None, :]
    lengths = cu_seqlens.diff().long()
    segment = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=lengths.device), lengths,
        output_size=token_dot.shape[1],
    )  # fmt: skip
    beyond = F.pad(suffix, (0, 0, 0, 1))[:, cu_seqlens[1:].long()[segment]]
    return suffix - beyond + state_dot.double()[segment][None]
