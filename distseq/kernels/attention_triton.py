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

Where the kernels can run (CUDA, or CPU under Triton's interpreter): :mod:`.triton_common`.
"""

from __future__ import annotations

import math

import torch

from distseq.kernels import triton_common
from distseq.kernels.common import no_key_result
from distseq.kernels.triton_common import (
    MAX_HEAD_DIM,
    jit,
    launch,
    load_rows,
    precision,
    rows_last_contiguous,
    store_rows,
    strides,
    tl,
    triton,
)

_LOG2E = math.log2(math.e)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@jit
def _program(CU_Q, CU_K, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(tile, head, batch, first q row, first k row, len_q, len_k) of this program.

    Grid axis 0 enumerates tiles, axis 1 batch entries or segments, axis 2 heads.
    """
    tile = tl.program_id(0)
    pid_z = tl.program_id(1)
    head = tl.program_id(2)
    if VARLEN:
        q_start = tl.load(CU_Q + pid_z)
        k_start = tl.load(CU_K + pid_z)
        len_q = tl.load(CU_Q + pid_z + 1) - q_start
        len_k = tl.load(CU_K + pid_z + 1) - k_start
        # int64 so that row * row_stride cannot overflow on long sequences.
        return tile, head, 0, q_start.to(tl.int64), k_start.to(tl.int64), len_q, len_k
    else:
        return tile, head, pid_z.to(tl.int64), 0, 0, seqlen_q, seqlen_k


@jit
def _key_range(
    start_m, len_q, len_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """``(diag, full, hi)`` for the query tile at ``start_m``: query ``i`` sees key ``j`` iff
    ``j <= i + diag``; keys below ``full`` (whole tiles) need no mask, keys from ``hi`` on are
    hidden from every row of the tile."""
    if CAUSAL:
        diag = len_k - len_q
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), len_k)
        full = tl.minimum(tl.maximum(start_m + diag + 1, 0), len_k)
    else:
        diag = 0
        hi = len_k
        full = len_k
    return diag, (full // BLOCK_N) * BLOCK_N, hi


@jit
def _key_tile(
    q, k_base, v_base, stride_ks, stride_vs, cols, offs_d, len_k, qk_scale,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The K and V tiles of key rows ``cols`` and the log2-scaled scores ``q k^T``."""
    d_mask = offs_d < HEAD_DIM
    k = load_rows(k_base, stride_ks, cols, cols < len_k, offs_d, d_mask)
    v = load_rows(v_base, stride_vs, cols, cols < len_k, offs_d, d_mask)
    return k, v, tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale


@jit
def _visible(rows, cols, len_k, diag, CAUSAL: tl.constexpr):
    """``[rows, cols]`` mask of the real keys each query row may see."""
    visible = cols[None, :] < len_k
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + diag)
    return visible


@jit
def _fwd_inner(
    acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs,
    rows, offs_n, offs_d, lo, hi, len_k, diag, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k, v, s = _key_tile(
            q, k_base, v_base, stride_ks, stride_vs, cols, offs_d, len_k, qk_scale,
            HEAD_DIM, PRECISION,
        )  # fmt: skip
        if MASKED:
            s = tl.where(_visible(rows, cols, len_k, diag, CAUSAL), s, float("-inf"))
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
    pid_m, head, batch, q_start, k_start, len_q, len_k = _program(
        CU_Q, CU_K, seqlen_q, seqlen_k, VARLEN
    )
    start_m = pid_m * BLOCK_M
    if start_m < len_q:
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_mask = rows < len_q
        d_mask = offs_d < HEAD_DIM
        kv_head = head // group
        q_base = Q + batch * stride_qb + head * stride_qh + q_start * stride_qs
        q = load_rows(q_base, stride_qs, rows, row_mask, offs_d, d_mask)
        k_base = K + batch * stride_kb + kv_head * stride_kh + k_start * stride_ks
        v_base = V + batch * stride_vb + kv_head * stride_vh + k_start * stride_vs
        diag, full, hi = _key_range(start_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)

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
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        o_base = O + batch * stride_ob + head * stride_oh + q_start * stride_os
        store_rows(o_base, stride_os, rows, row_mask, offs_d, d_mask, acc / l_safe[:, None])
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
    d_mask = offs_d < HEAD_DIM
    o_base = O + batch * stride_ob + head * stride_oh
    o = load_rows(o_base, stride_os, rows, row_mask, offs_d, d_mask).to(tl.float32)
    do_base = DO + batch * stride_db + head * stride_dh
    do = load_rows(do_base, stride_ds, rows, row_mask, offs_d, d_mask).to(tl.float32)
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
    d_mask = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_mask = rows < len_q
        q = load_rows(q_base, stride_qs, rows, row_mask, offs_d, d_mask)
        do = load_rows(do_base, stride_dos, rows, row_mask, offs_d, d_mask)
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
    pid_n, kv_head, batch, q_start, k_start, len_q, len_k = _program(
        CU_Q, CU_K, seqlen_q, seqlen_k, VARLEN
    )
    start_n = pid_n * BLOCK_N
    # No early exit on len_q == 0: keys no query sees must still get dk = dv = 0 written.
    if start_n < len_k:
        cols = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        col_mask = cols < len_k
        d_mask = offs_d < HEAD_DIM
        k_base = K + batch * stride_kb + kv_head * stride_kh + k_start * stride_ks
        k = load_rows(k_base, stride_ks, cols, col_mask, offs_d, d_mask)
        v_base = V + batch * stride_vb + kv_head * stride_vh + k_start * stride_vs
        v = load_rows(v_base, stride_vs, cols, col_mask, offs_d, d_mask)

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
        dk_base = DK + batch * stride_dkb + kv_head * stride_dkh + k_start * stride_dks
        store_rows(dk_base, stride_dks, cols, col_mask, offs_d, d_mask, dk * scale)
        dv_base = DV + batch * stride_dvb + kv_head * stride_dvh + k_start * stride_dvs
        store_rows(dv_base, stride_dvs, cols, col_mask, offs_d, d_mask, dv)


@jit
def _dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs,
    rows, offs_n, offs_d, lo, hi, len_k, diag, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k, v, s = _key_tile(
            q, k_base, v_base, stride_ks, stride_vs, cols, offs_d, len_k, qk_scale,
            HEAD_DIM, PRECISION,
        )  # fmt: skip
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            # Padding keys must be masked here (not only causally hidden ones): their P could
            # overflow and ds @ k would turn inf * 0 into nan for real rows.
            p = tl.where(_visible(rows, cols, len_k, diag, CAUSAL), p, 0.0)
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
    pid_m, head, batch, q_start, k_start, len_q, len_k = _program(
        CU_Q, CU_K, seqlen_q, seqlen_k, VARLEN
    )
    start_m = pid_m * BLOCK_M
    if start_m < len_q:
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_mask = rows < len_q
        d_mask = offs_d < HEAD_DIM
        q_base = Q + batch * stride_qb + head * stride_qh + q_start * stride_qs
        q = load_rows(q_base, stride_qs, rows, row_mask, offs_d, d_mask)
        do_base = DO + batch * stride_dob + head * stride_doh + q_start * stride_dos
        do = load_rows(do_base, stride_dos, rows, row_mask, offs_d, d_mask)
        row_offs = (batch * n_heads + head) * seqlen_q + q_start + rows
        lse2 = tl.load(LSE2 + row_offs, mask=row_mask, other=float("inf"))
        delta = tl.load(DELTA + row_offs, mask=row_mask, other=0.0)
        kv_head = head // group
        k_base = K + batch * stride_kb + kv_head * stride_kh + k_start * stride_ks
        v_base = V + batch * stride_vb + kv_head * stride_vh + k_start * stride_vs
        diag, full, hi = _key_range(start_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        dq = _dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d,
            0, full, len_k, diag, qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION,
        )  # fmt: skip
        dq = _dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d,
            full, hi, len_k, diag, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION,
        )  # fmt: skip
        dq_base = DQ + batch * stride_dqb + head * stride_dqh + q_start * stride_dqs
        store_rows(dq_base, stride_dqs, rows, row_mask, offs_d, d_mask, dq * scale)


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


class _Segments:
    """Grid axis 1 (batch entries or segments), their max lengths and the cu_seqlens pointers."""

    def __init__(self, q, k, cu_seqlens_q, cu_seqlens_k, max_q=None, max_k=None) -> None:
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
        if max_q is not None and max_k is not None:  # the caller knows them on the host
            self.max_q, self.max_k = max_q, max_k
            return
        # Otherwise one host sync for the grid size.
        lengths = torch.stack([self.cu_q.diff(), self.cu_k.diff()]).cpu() if self.count else None
        self.max_q = int(lengths[0].max()) if self.count else 0
        self.max_k = int(lengths[1].max()) if self.count else 0


class _Launch:
    """Sizes, segments, tile sizes and constexprs that every kernel launch of one call shares."""

    def __init__(self, q, k, scale, causal, cu_seqlens_q, cu_seqlens_k, max_q, max_k) -> None:
        self.batch, self.seq_q, self.heads, self.dim = q.shape
        self.kv_heads = k.shape[2]
        self.scale = self.dim**-0.5 if scale is None else float(scale)
        self.seg = _Segments(q, k, cu_seqlens_q, cu_seqlens_k, max_q, max_k)
        self.block_d = max(16, triton.next_power_of_2(self.dim))
        self.block_m, self.block_n, warps, stages = _tile_sizes(self.block_d, q.dtype)
        # The (seqlen_q, seqlen_k, n_heads, group, qk_scale) arguments of the main kernels.
        self.sizes = (
            self.seq_q, k.shape[1], self.heads, self.heads // self.kv_heads, self.scale * _LOG2E
        )  # fmt: skip
        self.meta = dict(
            CAUSAL=bool(causal), VARLEN=self.seg.varlen, HEAD_DIM=self.dim,
            BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_D=self.block_d,
            PRECISION=precision(q.dtype), num_warps=warps, num_stages=stages,
        )  # fmt: skip


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None,
    causal: bool,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
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
    p = _Launch(q, k, scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if p.seg.varlen:
        # Segments need not cover every row; rows outside all of them keep out = 0, lse = -inf.
        out, lse = no_key_result(q)
    else:
        out = torch.empty_like(q)
        lse = torch.empty((p.batch, p.heads, p.seq_q), dtype=torch.float32, device=q.device)
    launch(
        _fwd_kernel, (triton.cdiv(p.seg.max_q, p.block_m), p.seg.count, p.heads),
        q, k, v, out, lse, p.seg.cu_q, p.seg.cu_k,
        *strides(q), *strides(k), *strides(v), *strides(out), *p.sizes, **p.meta,
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
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
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
    p = _Launch(q, k, scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

    delta = torch.empty((p.batch, p.heads, p.seq_q), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    launch(
        _bwd_preprocess_kernel, (triton.cdiv(p.seq_q, 64), p.batch, p.heads),
        out, dout, lse, delta, lse2, *strides(out), *strides(dout), *lse.stride(),
        p.seq_q, p.heads, HEAD_DIM=p.dim, BLOCK_M=64, BLOCK_D=p.block_d,
    )  # fmt: skip

    alloc = torch.zeros_like if p.seg.varlen else torch.empty_like
    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    launch(
        _bwd_dkdv_kernel, (triton.cdiv(p.seg.max_k, p.block_n), p.seg.count, p.kv_heads),
        q, k, v, dout, dk, dv, lse2, delta, p.seg.cu_q, p.seg.cu_k,
        *strides(q), *strides(k), *strides(v), *strides(dout), *strides(dk), *strides(dv),
        *p.sizes, p.scale, **p.meta,
    )  # fmt: skip
    launch(
        _bwd_dq_kernel, (triton.cdiv(p.seg.max_q, p.block_m), p.seg.count, p.heads),
        q, k, v, dout, dq, lse2, delta, p.seg.cu_q, p.seg.cu_k,
        *strides(q), *strides(k), *strides(v), *strides(dout), *strides(dq),
        *p.sizes, p.scale, **p.meta,
    )  # fmt: skip
    return dq, dk, dv
