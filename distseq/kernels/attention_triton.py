"""The ``triton`` attention block backend: our own FlashAttention-2 kernels written in Triton.

Forward: one program per (query tile, batch or segment, query head) streams the key tiles with
an online softmax (exp2, float32 accumulators) and writes ``out`` and the natural-log ``lse``.
Backward follows FlashAttention-2: a preprocess kernel computes ``delta = rowsum(dout * out)``
from the *passed* (possibly merged) ``out`` and rescales the passed ``lse``; a dk/dv kernel
owns one key tile of one K/V head and loops over the query tiles of every query head of its
GQA group; a dq kernel owns one query tile and loops over the key tiles. Every output element
is written by exactly one program, so no atomics are needed.

Causal masking is bottom-right aligned; tiles that are fully masked are never visited, tiles
that are fully visible skip the mask. Segments (``cu_seqlens``) are native: the second grid
axis enumerates segments and each program reads its segment's offsets and lengths.

The kernels need a CUDA device, or ``TRITON_INTERPRET=1`` *when this module is imported* to
run them on CPU tensors with Triton's interpreter (slow; meant for tests).
"""

from __future__ import annotations

import math

import torch

from distseq.kernels import triton_common
from distseq.kernels.triton_common import (
    jit,
    launch,
    precision,
    rows_last_contiguous,
    tl,
    triton,
)

MAX_HEAD_DIM = 256
_LOG2E = math.log2(math.e)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@jit
def _segment_bounds(CU_Q, CU_K, pid_z, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(batch, first q row, first k row, len_q, len_k) of the batch entry / segment ``pid_z``."""
    if VARLEN:
        q_start = tl.load(CU_Q + pid_z)
        k_start = tl.load(CU_K + pid_z)
        len_q = tl.load(CU_Q + pid_z + 1) - q_start
        len_k = tl.load(CU_K + pid_z + 1) - k_start
        # int64 so that row * row_stride cannot overflow on long sequences.
        return 0, q_start.to(tl.int64), k_start.to(tl.int64), len_q, len_k
    else:
        return pid_z.to(tl.int64), 0, 0, seqlen_q, seqlen_k


@jit
def _fwd_inner(
    acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs,
    rows, offs_n, offs_d, lo, hi, len_k, diag, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    d_mask = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < len_k) & d_mask
        cols64 = cols.to(tl.int64)[:, None]
        k = tl.load(k_base + cols64 * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols64 * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            visible = cols[None, :] < len_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + diag)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key so far has m = -inf; exp2(-inf - -inf) would be nan.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@jit
def _fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
    seqlen_q, seqlen_k, n_heads, group, qk_scale,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_z = tl.program_id(1)
    head = tl.program_id(2)
    batch, q_start, k_start, len_q, len_k = _segment_bounds(
        CU_Q, CU_K, pid_z, seqlen_q, seqlen_k, VARLEN
    )
    start_m = pid_m * BLOCK_M
    if start_m < len_q:
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_mask = rows < len_q
        rows64 = rows.to(tl.int64)[:, None]
        kv_head = head // group
        q_ptrs = Q + batch * stride_qb + head * stride_qh + (q_start + rows64) * stride_qs
        io_mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_ptrs + offs_d[None, :], mask=io_mask, other=0.0)
        k_base = K + batch * stride_kb + kv_head * stride_kh + k_start * stride_ks
        v_base = V + batch * stride_vb + kv_head * stride_vh + k_start * stride_vs

        if CAUSAL:
            diag = len_k - len_q  # query i sees key j iff j <= i + diag
            hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), len_k)
            full = tl.minimum(tl.maximum(start_m + diag + 1, 0), len_k)
        else:
            diag = 0
            hi = len_k
            full = len_k
        full = (full // BLOCK_N) * BLOCK_N  # key tiles below this need no mask at all

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d,
            0, full, len_k, diag, qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION,
        )  # fmt: skip
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d,
            full, hi, len_k, diag, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION,
        )  # fmt: skip

        empty = l_i == 0.0  # the row saw no key: out = 0, lse = -inf, no nan
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        o_ptrs = O + batch * stride_ob + head * stride_oh + (q_start + rows64) * stride_os
        tl.store(o_ptrs + offs_d[None, :], out.to(O.dtype.element_ty), mask=io_mask)
        lse_ptrs = LSE + (batch * n_heads + head) * seqlen_q + q_start + rows
        tl.store(lse_ptrs, lse, mask=row_mask)


@jit
def _bwd_preprocess_kernel(
    O, DO, LSE, DELTA, LSE2,
    stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh, stride_ls, seqlen_q, n_heads,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    batch = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = rows < seqlen_q
    mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows64 = rows.to(tl.int64)[:, None]
    o = tl.load(
        O + batch * stride_ob + head * stride_oh + rows64 * stride_os + offs_d[None, :],
        mask=mask, other=0.0,
    ).to(tl.float32)  # fmt: skip
    do = tl.load(
        DO + batch * stride_db + head * stride_dh + rows64 * stride_ds + offs_d[None, :],
        mask=mask, other=0.0,
    ).to(tl.float32)  # fmt: skip
    lse = tl.load(
        LSE + batch * stride_lb + head * stride_lh + rows.to(tl.int64) * stride_ls,
        mask=row_mask, other=0.0,
    )  # fmt: skip
    # P = exp2(s - lse2); +inf for a row that saw no key makes its P exactly 0 (not inf/nan).
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    offs = (batch * n_heads + head) * seqlen_q + rows
    tl.store(DELTA + offs, tl.sum(o * do, 1), mask=row_mask)
    tl.store(LSE2 + offs, lse2, mask=row_mask)


@jit
def _dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse2_base, delta_base, stride_qs, stride_dos,
    cols, offs_d, lo, hi, len_q, diag, qk_scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    d_mask = offs_d[None, :] < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_mask = rows < len_q
        rows64 = rows.to(tl.int64)[:, None]
        mask = row_mask[:, None] & d_mask
        q = tl.load(q_base + rows64 * stride_qs + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(do_base + rows64 * stride_dos + offs_d[None, :], mask=mask, other=0.0)
        # Padding rows get lse2 = +inf, hence P = 0 and no contribution.
        lse2 = tl.load(lse2_base + rows, mask=row_mask, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=row_mask, other=0.0)
        # Work transposed ([keys, queries]) so that dk, dv accumulate without transposing P.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        p_t = tl.exp2(s_t - lse2[None, :])
        if MASKED:
            p_t = tl.where(cols[:, None] <= rows[None, :] + diag, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE2, DELTA, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    seqlen_q, seqlen_k, n_heads, group, qk_scale, scale,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_z = tl.program_id(1)
    kv_head = tl.program_id(2)
    batch, q_start, k_start, len_q, len_k = _segment_bounds(
        CU_Q, CU_K, pid_z, seqlen_q, seqlen_k, VARLEN
    )
    start_n = pid_n * BLOCK_N
    # No early exit on len_q == 0: keys no query sees must still get dk = dv = 0 written.
    if start_n < len_k:
        cols = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (cols[:, None] < len_k) & (offs_d[None, :] < HEAD_DIM)
        cols64 = (k_start + cols.to(tl.int64))[:, None]
        k = tl.load(
            K + batch * stride_kb + kv_head * stride_kh + cols64 * stride_ks + offs_d[None, :],
            mask=mask, other=0.0,
        )  # fmt: skip
        v = tl.load(
            V + batch * stride_vb + kv_head * stride_vh + cols64 * stride_vs + offs_d[None, :],
            mask=mask, other=0.0,
        )  # fmt: skip

        q_tiles_end = tl.cdiv(len_q, BLOCK_M) * BLOCK_M
        if CAUSAL:
            diag = len_k - len_q
            # First query tile with a row that sees a key of this tile (i >= j - diag) ...
            lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
            # ... and the first whose rows all see every key of the tile.
            full = tl.maximum(start_n + BLOCK_N - 1 - diag, 0)
            full = tl.minimum(tl.cdiv(full, BLOCK_M) * BLOCK_M, q_tiles_end)
        else:
            diag = 0
            lo = 0
            full = 0

        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        # GQA: this K/V head's gradient is the sum over its query heads, done in registers.
        for g in range(0, group):
            head = kv_head * group + g
            q_base = Q + batch * stride_qb + head * stride_qh + q_start * stride_qs
            do_base = DO + batch * stride_dob + head * stride_doh + q_start * stride_dos
            row_base = (batch * n_heads + head) * seqlen_q + q_start
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, LSE2 + row_base, DELTA + row_base,
                stride_qs, stride_dos, cols, offs_d, lo, full, len_q, diag, qk_scale,
                True, HEAD_DIM, BLOCK_M, PRECISION,
            )  # fmt: skip
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, LSE2 + row_base, DELTA + row_base,
                stride_qs, stride_dos, cols, offs_d, tl.maximum(lo, full), q_tiles_end,
                len_q, diag, qk_scale, False, HEAD_DIM, BLOCK_M, PRECISION,
            )  # fmt: skip
        dk = dk * scale
        tl.store(
            DK + batch * stride_dkb + kv_head * stride_dkh + cols64 * stride_dks + offs_d[None, :],
            dk.to(DK.dtype.element_ty), mask=mask,
        )  # fmt: skip
        tl.store(
            DV + batch * stride_dvb + kv_head * stride_dvh + cols64 * stride_dvs + offs_d[None, :],
            dv.to(DV.dtype.element_ty), mask=mask,
        )  # fmt: skip


@jit
def _dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs,
    rows, offs_n, offs_d, lo, hi, len_k, diag, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    d_mask = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < len_k) & d_mask
        cols64 = cols.to(tl.int64)[:, None]
        k = tl.load(k_base + cols64 * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols64 * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            # Padding keys must be masked here (not only causally hidden ones): their P could
            # overflow and ds @ k would turn inf * 0 into nan for real rows.
            visible = cols[None, :] < len_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + diag)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE2, DELTA, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    seqlen_q, seqlen_k, n_heads, group, qk_scale, scale,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_z = tl.program_id(1)
    head = tl.program_id(2)
    batch, q_start, k_start, len_q, len_k = _segment_bounds(
        CU_Q, CU_K, pid_z, seqlen_q, seqlen_k, VARLEN
    )
    start_m = pid_m * BLOCK_M
    if start_m < len_q:
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_mask = rows < len_q
        rows64 = (q_start + rows.to(tl.int64))[:, None]
        mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(
            Q + batch * stride_qb + head * stride_qh + rows64 * stride_qs + offs_d[None, :],
            mask=mask, other=0.0,
        )  # fmt: skip
        do = tl.load(
            DO + batch * stride_dob + head * stride_doh + rows64 * stride_dos + offs_d[None, :],
            mask=mask, other=0.0,
        )  # fmt: skip
        row_offs = (batch * n_heads + head) * seqlen_q + q_start + rows
        lse2 = tl.load(LSE2 + row_offs, mask=row_mask, other=float("inf"))
        delta = tl.load(DELTA + row_offs, mask=row_mask, other=0.0)
        kv_head = head // group
        k_base = K + batch * stride_kb + kv_head * stride_kh + k_start * stride_ks
        v_base = V + batch * stride_vb + kv_head * stride_vh + k_start * stride_vs

        if CAUSAL:
            diag = len_k - len_q
            hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), len_k)
            full = tl.minimum(tl.maximum(start_m + diag + 1, 0), len_k)
        else:
            diag = 0
            hi = len_k
            full = len_k
        full = (full // BLOCK_N) * BLOCK_N

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        dq = _dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d,
            0, full, len_k, diag, qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION,
        )  # fmt: skip
        dq = _dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d,
            full, hi, len_k, diag, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION,
        )  # fmt: skip
        dq = dq * scale
        tl.store(
            DQ + batch * stride_dqb + head * stride_dqh + rows64 * stride_dqs + offs_d[None, :],
            dq.to(DQ.dtype.element_ty), mask=mask,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Python wrappers
# --------------------------------------------------------------------------------------------


def _kernels_interpreted() -> bool:
    return triton_common.interpreted(_fwd_kernel)


def is_available(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` when the Triton kernels can run on ``device`` with ``dtype``, else the reason."""
    return triton_common.unavailable_reason(device, dtype, __name__, _fwd_kernel)


def _tile_sizes(head_dim_padded: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for a padded head dim and input dtype.

    Untuned conservative defaults: float32 tiles hold twice the bytes, so they are smaller.
    Tests monkeypatch this to force small tiles.
    """
    wide = dtype == torch.float32
    if head_dim_padded <= 64:
        return (64, 64, 4, 3) if not wide else (64, 32, 4, 2)
    if head_dim_padded <= 128:
        return (64, 64, 8, 2) if not wide else (32, 32, 4, 2)
    return (32, 32, 8, 2) if not wide else (16, 16, 4, 1)


def _interpreter_upcasts(dtype: torch.dtype) -> bool:
    """Whether to run a low-precision call in float32: Triton 3.9's interpreter computes
    ``tl.dot`` of bfloat16/float16 operands wrongly (garbage of order 1e10), so on CPU the
    kernels see float32 copies of the (already rounded) inputs. GPUs run the real dtype."""
    return dtype != torch.float32 and _kernels_interpreted()


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [batch, seq, heads, head_dim]")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch/head_dim")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of K/V heads {k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    reason = is_available(q.device, q.dtype)
    if reason is not None:
        raise ValueError(f"triton attention backend cannot run: {reason}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[3]} > {MAX_HEAD_DIM} is not supported")


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


class _Segments:
    """Grid axis 1 (batch entries or segments), their max lengths and the cu_seqlens pointers."""

    def __init__(self, q, k, cu_seqlens_q, cu_seqlens_k) -> None:
        self.varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
        if not self.varlen:
            self.count, self.max_q, self.max_k = q.shape[0], q.shape[1], k.shape[1]
            self.cu_q = self.cu_k = torch.zeros(1, dtype=torch.int32, device=q.device)
            return
        cu_q = cu_seqlens_q if cu_seqlens_q is not None else cu_seqlens_k
        cu_k = cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens_q
        if q.shape[0] != 1:
            raise ValueError(f"cu_seqlens needs batch 1, got batch {q.shape[0]}")
        if cu_q.dim() != 1 or cu_q.shape != cu_k.shape or cu_q.numel() < 1:
            raise ValueError(
                f"cu_seqlens_q {tuple(cu_q.shape)} / cu_seqlens_k {tuple(cu_k.shape)} "
                "must both be [n_segments + 1]"
            )
        self.cu_q = cu_q.to(device=q.device, dtype=torch.int32).contiguous()
        self.cu_k = cu_k.to(device=q.device, dtype=torch.int32).contiguous()
        self.count = cu_q.numel() - 1
        # One host sync for the grid size (the contract carries no max_seqlen).
        lengths = torch.stack([self.cu_q.diff(), self.cu_k.diff()]).cpu() if self.count else None
        self.max_q = int(lengths[0].max()) if self.count else 0
        self.max_k = int(lengths[1].max()) if self.count else 0


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None,
    causal: bool,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block attention with the Triton kernels.

    ``q`` ``[B, Sq, Hq, D]``, ``k``/``v`` ``[B, Sk, Hkv, D]`` (``Hq % Hkv == 0``), float32,
    float16 or bfloat16, ``D <= 256``. Returns ``out`` ``[B, Sq, Hq, D]`` in ``q.dtype`` and
    ``lse`` ``[B, Hq, Sq]`` float32 (natural log; ``-inf`` for rows that see no key). Causal is
    bottom-right aligned; ``cu_seqlens_q``/``cu_seqlens_k`` (int32 ``[n + 1]``, ``B == 1``)
    make ``n`` independent segments.
    """
    _check_inputs(q, k, v)
    if _interpreter_upcasts(q.dtype):
        out, lse = forward(
            q.float(), k.float(), v.float(), scale=scale, causal=causal,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        )  # fmt: skip
        return out.to(q.dtype), lse
    q, k, v = (rows_last_contiguous(t) for t in (q, k, v))
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else float(scale)
    seg = _Segments(q, k, cu_seqlens_q, cu_seqlens_k)
    # Segments need not cover every row; rows outside all of them keep out = 0, lse = -inf.
    if seg.varlen:
        out = torch.zeros_like(q)
        lse = torch.full((batch, heads, seq_q), float("-inf"), dtype=torch.float32, device=q.device)
    else:
        out = torch.empty_like(q)
        lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(dim))
    block_m, block_n, warps, stages = _tile_sizes(block_d, q.dtype)
    grid = (triton.cdiv(seg.max_q, block_m), seg.count, heads)
    launch(
        _fwd_kernel, grid, q, k, v, out, lse, seg.cu_q, seg.cu_k,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        seq_q, seq_k, heads, heads // kv_heads, scale * _LOG2E,
        CAUSAL=bool(causal), VARLEN=seg.varlen, HEAD_DIM=dim, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, lse


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float | None,
    causal: bool,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the block given the *final* ``out``/``lse`` of the rows.

    ``dout``/``out`` ``[B, Sq, Hq, D]`` (``out`` may be float32 for low-precision ``q``),
    ``lse`` ``[B, Hq, Sq]`` (natural log, ``-inf`` for rows that saw no key anywhere), other
    arguments as in :func:`forward`. ``delta = rowsum(dout * out)`` uses the passed ``out``, so
    ``out``/``lse`` may come from merging several blocks. Returns ``dq`` ``[B, Sq, Hq, D]`` and
    ``dk``/``dv`` ``[B, Sk, Hkv, D]`` (summed over each K/V head's query group), in ``q.dtype``.
    """
    _check_inputs(q, k, v)
    if out.shape != q.shape or dout.shape != q.shape:
        raise ValueError(f"out {tuple(out.shape)} / dout {tuple(dout.shape)} must match q")
    if lse.shape != (q.shape[0], q.shape[2], q.shape[1]):
        raise ValueError(f"lse {tuple(lse.shape)} must be [batch, heads_q, seq_q]")
    if _interpreter_upcasts(q.dtype):
        grads = backward(
            dout.float(), q.float(), k.float(), v.float(), out.float(), lse, scale=scale,
            causal=causal, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        )  # fmt: skip
        return tuple(g.to(q.dtype) for g in grads)
    # dout feeds tl.dot together with q/v, whose operands must share a dtype.
    dout = dout.to(q.dtype)
    q, k, v, dout, out = (rows_last_contiguous(t) for t in (q, k, v, dout, out))
    lse = lse.float()
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else float(scale)
    seg = _Segments(q, k, cu_seqlens_q, cu_seqlens_k)
    block_d = max(16, triton.next_power_of_2(dim))
    block_m, block_n, warps, stages = _tile_sizes(block_d, q.dtype)

    delta = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    launch(
        _bwd_preprocess_kernel, (triton.cdiv(seq_q, 64), batch, heads),
        out, dout, lse, delta, lse2, *_strides(out), *_strides(dout),
        lse.stride(0), lse.stride(1), lse.stride(2), seq_q, heads,
        HEAD_DIM=dim, BLOCK_M=64, BLOCK_D=block_d,
    )  # fmt: skip

    alloc = torch.zeros_like if seg.varlen else torch.empty_like
    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    common = dict(
        CAUSAL=bool(causal), VARLEN=seg.varlen, HEAD_DIM=dim, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    group = heads // kv_heads
    launch(
        _bwd_dkdv_kernel, (triton.cdiv(seg.max_k, block_n), seg.count, kv_heads),
        q, k, v, dout, dk, dv, lse2, delta, seg.cu_q, seg.cu_k,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk),
        *_strides(dv), seq_q, seq_k, heads, group, scale * _LOG2E, scale, **common,
    )  # fmt: skip
    launch(
        _bwd_dq_kernel, (triton.cdiv(seg.max_q, block_m), seg.count, heads),
        q, k, v, dout, dq, lse2, delta, seg.cu_q, seg.cu_k,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
        seq_q, seq_k, heads, group, scale * _LOG2E, scale, **common,
    )  # fmt: skip
    return dq, dk, dv
