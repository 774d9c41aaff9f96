"""Chunked causal linear attention with scalar decay, forward and backward, in Triton.

Per head: ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``, ``S_0`` = the initial
state; with ``cu_seqlens`` the state restarts at each segment start.

Chunks of ``chunk_size`` tokens start at each row's (batch entry's or segment's) first token.
With ``b_t`` the chunk-local inclusive cumulative log decay (fp32) and ``S`` the state entering
the chunk,

    o_t   = scale (exp(b_t) q_t S + sum_{s <= t} exp(b_t - b_s) (q_t . k_s) v_s)
    S_new = exp(b_C) S + sum_s exp(b_C - b_s) k_s^T v_s            (b_C: the chunk's total)

so every exponent is ``<= 0`` (the causal mask is applied to the exponent, before ``exp``).
Three kernels, as in flash-linear-attention's chunk algorithm:

- ``_recurrence_kernel``: one program per (``[BLOCK_K, BLOCK_V]`` state block, row, head) walks
  the row's chunks with the block in float32 registers; it is the only sequential part and
  does one ``[BLOCK_K, C] @ [C, BLOCK_V]`` product per chunk. Forward it runs the state
  recurrence, storing the state entering each chunk (``[chunks, H, Dk, Dv]``) and the final
  state; backward (``REVERSE``) it runs the mirror-image ``dS_prev = exp(b_C) dS + scale
  sum_t exp(b_t) q_t^T do_t`` from ``dS_T``, storing the gradient of the state leaving each
  chunk and, after the first chunk, the initial state's gradient.
- ``_output_kernel``: one program per (Dv tile, chunk, head), independent of the others.
- ``_grads_kernel``: one program per (chunk, head) computes ``dq``, ``dk``, ``dv`` from the
  entering state and the leaving state's gradient, looping over Dv tiles so that the Dv sums
  of ``dq``/``dk`` stay in registers.

Backward recomputes the entering states (nothing is saved between calls). With ``G`` the
cumulative log decay of a segment, ``dL/dG_t = q_t . dq_t - k_t . dk_t`` (+ ``sum(S_T * dS_T)``
at the segment's last token; ``exp(G_t) S_0`` already lives in ``q_t . dq_t``): the gradient
kernel writes the first part per token from its float32 ``dq``/``dk``, and ``dg``, the reverse
cumulative sum within each segment, is taken in float64 by torch.

Where the kernels can run (CUDA, or CPU under Triton's interpreter): :mod:`.triton_common`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from distseq.kernels import triton_common
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
from distseq.validation import check_cu_seqlens, check_scale

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@jit
def _row_bounds(CU, CHUNK_OFFSETS, pid_n, seqlen, VARLEN: tl.constexpr):
    """(batch, first token, length, first global chunk) of batch row / segment ``pid_n``."""
    first_chunk = tl.load(CHUNK_OFFSETS + pid_n)
    if VARLEN:
        start = tl.load(CU + pid_n)
        # int64 so that token * stride cannot overflow on long sequences.
        return 0, start.to(tl.int64), tl.load(CU + pid_n + 1) - start, first_chunk
    else:
        return pid_n.to(tl.int64), 0, seqlen, first_chunk


@jit
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


@jit
def _state_ptrs(base, index, head, n_heads, offs_k, offs_v, DK: tl.constexpr, DV: tl.constexpr):
    """Pointers and mask of the ``[offs_k, offs_v]`` block of state ``[index, head]`` of an
    ``[N, H, Dk, Dv]`` tensor."""
    first = (index.to(tl.int64) * n_heads + head) * DK * DV
    ptrs = base + first + offs_k[:, None] * DV + offs_v[None, :]
    return ptrs, (offs_k[:, None] < DK) & (offs_v[None, :] < DV)


@jit
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


@jit
def _chunk_bounds(
    CU, CHUNK_ROW, CHUNK_START, pid_c, seqlen, VARLEN: tl.constexpr, CHUNK: tl.constexpr
):
    """(batch, first token, valid tokens) of global chunk ``pid_c``."""
    row = tl.load(CHUNK_ROW + pid_c)
    start = tl.load(CHUNK_START + pid_c)
    if VARLEN:
        batch = 0
        end = tl.load(CU + row + 1)
    else:
        batch = row.to(tl.int64)
        end = seqlen
    return batch, start.to(tl.int64), tl.minimum(end - start, CHUNK)


@jit
def _state_block_offsets(DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """Dk and Dv offsets of this program's state block (grid axis 0 enumerates the blocks)."""
    n_v = tl.cdiv(DV, BLOCK_V)
    offs_k = (tl.program_id(0) // n_v) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_v = (tl.program_id(0) % n_v) * BLOCK_V + tl.arange(0, BLOCK_V)
    return offs_k, offs_v


@jit
def _recurrence_kernel(
    X, Y, G, S_INIT, S_ALL, S_END, CU, CHUNK_OFFSETS,
    stride_xb, stride_xs, stride_xh, stride_yb, stride_ys, stride_yh,
    stride_gb, stride_gs, stride_gh, seqlen, n_heads, scale,
    REVERSE: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_INIT: tl.constexpr,
    VARLEN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """One row's chunk walk for one ``[BLOCK_K, BLOCK_V]`` state block: per chunk
    ``S <- exp(b_C) S + sum_t w_t x_t^T y_t``, from ``S_INIT`` (zeros without ``HAS_INIT``).

    Stores ``S`` as the walk reaches every chunk into ``S_ALL`` ``[chunks, H, Dk, Dv]`` and the
    last ``S`` into ``S_END`` (float32). Forward, ``x, y = k, v`` and ``w_t = exp(b_C - b_t)``:
    the states entering the chunks (``q.dtype``: they only feed dots with q) and the final
    state. ``REVERSE`` (last chunk first), ``x, y = q, do`` and ``w_t = scale exp(b_t)`` from
    ``dS_T``: the gradients of the states leaving the chunks and the initial state's gradient.
    """
    offs_k, offs_v = _state_block_offsets(DV, BLOCK_K, BLOCK_V)
    pid_n = tl.program_id(1)
    head = tl.program_id(2)
    batch, start, length, first = _row_bounds(CU, CHUNK_OFFSETS, pid_n, seqlen, VARLEN)
    offs_c = tl.arange(0, CHUNK)
    x_base = X + batch * stride_xb + head * stride_xh + start * stride_xs
    y_base = Y + batch * stride_yb + head * stride_yh + start * stride_ys
    g_base = G + batch * stride_gb + head * stride_gh + start * stride_gs
    init_ptrs, state_mask = _state_ptrs(S_INIT, pid_n, head, n_heads, offs_k, offs_v, DK, DV)
    if HAS_INIT:
        state = tl.load(init_ptrs, mask=state_mask, other=0.0)
    else:
        state = tl.zeros([BLOCK_K, BLOCK_V], tl.float32)

    n_chunks = tl.cdiv(length, CHUNK)
    for i in range(n_chunks):
        chunk = n_chunks - 1 - i if REVERSE else i
        s_ptrs, _ = _state_ptrs(S_ALL, first + chunk, head, n_heads, offs_k, offs_v, DK, DV)
        tl.store(s_ptrs, state.to(S_ALL.dtype.element_ty), mask=state_mask)
        rows = chunk * CHUNK + offs_c
        row_mask = rows < length
        x = load_rows(x_base, stride_xs, rows, row_mask, offs_k, offs_k < DK)
        y = load_rows(y_base, stride_ys, rows, row_mask, offs_v, offs_v < DV)
        b, b_last = _chunk_decay(g_base, stride_gs, rows, row_mask, HAS_DECAY, CHUNK)
        weight = tl.exp(b) * scale if REVERSE else tl.exp(b_last - b)
        x_weighted = (x * weight[:, None]).to(x.dtype)
        state = state * tl.exp(b_last)
        state = _dot(tl.trans(x_weighted), y, state, PRECISION, UPCAST)

    end_ptrs, _ = _state_ptrs(S_END, pid_n, head, n_heads, offs_k, offs_v, DK, DV)
    tl.store(end_ptrs, state, mask=state_mask)


@jit
def _causal_decay(b, rows):
    """``[t, s]`` ``exp(b_t - b_s)`` for ``s <= t``, else 0 (masked before ``exp``)."""
    return tl.exp(tl.where(rows[:, None] >= rows[None, :], b[:, None] - b[None, :], float("-inf")))


@jit
def _output_kernel(
    Q, K, V, G, H_ALL, O, CU, CHUNK_ROW, CHUNK_START,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_gb, stride_gs, stride_gh,
    stride_ob, stride_os, stride_oh, seqlen, n_heads, scale,
    HAS_DECAY: tl.constexpr, VARLEN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_V: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``o`` of one chunk and Dv block: intra-chunk scores plus the entering state's term."""
    pid_v = tl.program_id(0)
    pid_c = tl.program_id(1)
    head = tl.program_id(2)
    batch, start, count = _chunk_bounds(CU, CHUNK_ROW, CHUNK_START, pid_c, seqlen, VARLEN, CHUNK)
    rows = tl.arange(0, CHUNK)
    row_mask = rows < count
    offs_k = tl.arange(0, BLOCK_DK)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    k_mask = offs_k < DK
    v_mask = offs_v < DV
    q_base = Q + batch * stride_qb + head * stride_qh + start * stride_qs
    q = load_rows(q_base, stride_qs, rows, row_mask, offs_k, k_mask)
    k_base = K + batch * stride_kb + head * stride_kh + start * stride_ks
    k = load_rows(k_base, stride_ks, rows, row_mask, offs_k, k_mask)
    v_base = V + batch * stride_vb + head * stride_vh + start * stride_vs
    v = load_rows(v_base, stride_vs, rows, row_mask, offs_v, v_mask)
    g_base = G + batch * stride_gb + head * stride_gh + start * stride_gs
    b, _ = _chunk_decay(g_base, stride_gs, rows, row_mask, HAS_DECAY, CHUNK)
    h_ptrs, state_mask = _state_ptrs(H_ALL, pid_c, head, n_heads, offs_k, offs_v, DK, DV)
    h = tl.load(h_ptrs, mask=state_mask, other=0.0)

    scores = _dot(q, tl.trans(k), None, PRECISION, UPCAST) * _causal_decay(b, rows)
    out = _dot(q, h, None, PRECISION, UPCAST) * tl.exp(b)[:, None]
    out = _dot(scores.to(v.dtype), v, out, PRECISION, UPCAST)
    o_base = O + batch * stride_ob + head * stride_oh + start * stride_os
    store_rows(o_base, stride_os, rows, row_mask, offs_v, v_mask, out * scale)


@jit
def _grads_kernel(
    Q, K, V, G, DO, H_ALL, DH_ALL, DQ, DK_OUT, DV_OUT, DG, CU, CHUNK_ROW, CHUNK_START,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_gb, stride_gs, stride_gh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    seqlen, n_heads, scale,
    HAS_DECAY: tl.constexpr, VARLEN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_V: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``dq``, ``dk``, ``dv`` (and ``dL/dG`` per token) of one chunk, all Dv blocks in turn.

    Given the state entering the chunk (``H_ALL``) and the gradient of the state leaving it
    (``DH_ALL``), the chunk is independent of the others. Looping over Dv inside the program
    keeps the Dv-sums of ``dq``/``dk`` in registers.
    """
    pid_c = tl.program_id(0)
    head = tl.program_id(1)
    batch, start, count = _chunk_bounds(CU, CHUNK_ROW, CHUNK_START, pid_c, seqlen, VARLEN, CHUNK)
    rows = tl.arange(0, CHUNK)
    row_mask = rows < count
    offs_k = tl.arange(0, BLOCK_DK)
    k_mask = offs_k < DK
    q_base = Q + batch * stride_qb + head * stride_qh + start * stride_qs
    q = load_rows(q_base, stride_qs, rows, row_mask, offs_k, k_mask)
    k_base = K + batch * stride_kb + head * stride_kh + start * stride_ks
    k = load_rows(k_base, stride_ks, rows, row_mask, offs_k, k_mask)
    v_base = V + batch * stride_vb + head * stride_vh + start * stride_vs
    do_base = DO + batch * stride_dob + head * stride_doh + start * stride_dos
    dv_base = DV_OUT + batch * stride_dvb + head * stride_dvh + start * stride_dvs
    g_base = G + batch * stride_gb + head * stride_gh + start * stride_gs
    b, b_last = _chunk_decay(g_base, stride_gs, rows, row_mask, HAS_DECAY, CHUNK)

    weight = _causal_decay(b, rows) * scale  # [t, s]
    # [s, t]: dv accumulates as scores^T @ do without transposing a score tile per Dv block.
    scores_t = _dot(k, tl.trans(q), None, PRECISION, UPCAST) * tl.trans(weight)
    from_start = tl.exp(b)[:, None] * scale  # decay from the chunk's entering state to t
    to_end = tl.exp(b_last - b)[:, None]  # decay from token s to the chunk's last token
    dq = tl.zeros([CHUNK, BLOCK_DK], tl.float32)
    dk = tl.zeros([CHUNK, BLOCK_DK], tl.float32)
    for v0 in range(0, DV, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < DV
        v = load_rows(v_base, stride_vs, rows, row_mask, offs_v, v_mask)
        do = load_rows(do_base, stride_dos, rows, row_mask, offs_v, v_mask)
        h_ptrs, state_mask = _state_ptrs(H_ALL, pid_c, head, n_heads, offs_k, offs_v, DK, DV)
        h = tl.load(h_ptrs, mask=state_mask, other=0.0)
        dh_ptrs, _ = _state_ptrs(DH_ALL, pid_c, head, n_heads, offs_k, offs_v, DK, DV)
        dh = tl.load(dh_ptrs, mask=state_mask, other=0.0)

        dv = _dot(k, dh, None, PRECISION, UPCAST) * to_end
        dv = _dot(scores_t.to(do.dtype), do, dv, PRECISION, UPCAST)
        store_rows(dv_base, stride_dvs, rows, row_mask, offs_v, v_mask, dv)
        dscores = _dot(do, tl.trans(v), None, PRECISION, UPCAST) * weight  # [t, s]
        dq += _dot(do, tl.trans(h), None, PRECISION, UPCAST) * from_start
        dq = _dot(dscores.to(k.dtype), k, dq, PRECISION, UPCAST)
        dk += _dot(v, tl.trans(dh), None, PRECISION, UPCAST) * to_end
        dk = _dot(tl.trans(dscores).to(q.dtype), q, dk, PRECISION, UPCAST)

    dq_base = DQ + batch * stride_dqb + head * stride_dqh + start * stride_dqs
    store_rows(dq_base, stride_dqs, rows, row_mask, offs_k, k_mask, dq)
    dk_base = DK_OUT + batch * stride_dkb + head * stride_dkh + start * stride_dks
    store_rows(dk_base, stride_dks, rows, row_mask, offs_k, k_mask, dk)
    if HAS_DECAY:
        # dL/dG_t without the final-state term, from the float32 gradients (before rounding).
        token_dot = tl.sum(q.to(tl.float32) * dq, 1) - tl.sum(k.to(tl.float32) * dk, 1)
        dg_ptrs = DG + batch * stride_gb + head * stride_gh + (start + rows) * stride_gs
        tl.store(dg_ptrs, token_dot, mask=row_mask)


# --------------------------------------------------------------------------------------------
# Python wrappers
# --------------------------------------------------------------------------------------------


def _kernels_interpreted() -> bool:
    return triton_common.interpreted(_recurrence_kernel)


def is_available(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` when the Triton kernels can run on ``device`` with ``dtype``, else the reason."""
    return triton_common.unavailable_reason(device, dtype, __name__, _recurrence_kernel)


def _tile_sizes(block_dk: int, dv: int) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_V, num_warps)``: state blocks ``[BLOCK_K, BLOCK_V]`` of the recurrences
    and the Dv tile of the chunk kernels (which hold all of Dk).

    Untuned defaults; 8 warps for wide heads because the gradient kernel keeps ``dq`` and
    ``dk`` ``[C, Dk]`` in float32 registers. Tests monkeypatch this to force several blocks.
    """
    warps = 8 if block_dk >= 128 else 4
    return min(block_dk, 64), min(max(16, triton.next_power_of_2(dv)), 64), warps


class _Problem:
    """Validated inputs, the chunk tables, launch geometry and constexprs shared by the kernels.

    Chunks are numbered globally, row after row (``row`` = batch entry or segment); each row's
    chunks start at its first token, so segments need not be chunk-aligned.
    """

    def __init__(
        self, q, k, v, log_decay, scale, initial_state, cu_seqlens, chunk_size, bounds
    ) -> None:
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
            lengths = check_cu_seqlens(cu_seqlens, batch, seqlen, 1, "contiguous", bounds)
            self.cu = _int32_on(cu_seqlens, q.device)
        else:
            lengths = (seqlen,) * batch
            self.cu = torch.zeros(1, dtype=torch.int32, device=q.device)
        self.rows = len(lengths)
        state_shape = (self.rows, heads, dk, dv)
        if initial_state is not None and tuple(initial_state.shape) != state_shape:
            what = "segments" if self.varlen else "batch rows"
            raise ValueError(
                f"initial_state has shape {tuple(initial_state.shape)}; expected {state_shape} "
                f"([{what}, heads, Dk, Dv])"
            )
        self.q, self.k, self.v = (rows_last_contiguous(t) for t in (q, k, v))
        self.has_decay = log_decay is not None
        # A dummy pointer when there is no decay; HAS_DECAY=False never reads it.
        self.g = log_decay.float().contiguous() if self.has_decay else self.cu
        self.h0 = None if initial_state is None else initial_state.float().contiguous()
        self.state_shape = state_shape
        self.chunk_offsets, self.chunk_row, self.chunk_start = _chunk_tables(
            lengths, self.varlen, chunk_size, q.device
        )
        self.n_chunks = self.chunk_row.numel()
        block_dk = max(16, triton.next_power_of_2(dk))
        block_k, self.block_v, warps = _tile_sizes(block_dk, dv)
        n_kv = triton.cdiv(dk, block_k) * triton.cdiv(dv, self.block_v)
        self.row_grid = (n_kv, self.rows, heads)
        common = {
            "VARLEN": self.varlen, "DK": dk, "DV": dv, "CHUNK": chunk_size,
            "BLOCK_V": self.block_v, "PRECISION": precision(q.dtype), "num_warps": warps,
            "UPCAST": q.dtype == torch.bfloat16 and _kernels_interpreted(),
        }  # fmt: skip
        self.row_meta = {**common, "BLOCK_K": block_k}
        self.chunk_meta = {**common, "BLOCK_DK": block_dk}

    def g_strides(self) -> tuple[int, int, int]:
        return strides(self.g) if self.has_decay else (0, 0, 0)

    def states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The state entering every chunk ``[chunks, H, Dk, Dv]`` and the final states."""
        entering = torch.empty(
            (self.n_chunks, *self.state_shape[1:]), dtype=self.q.dtype, device=self.q.device
        )
        final = torch.empty(self.state_shape, dtype=torch.float32, device=self.q.device)
        self.recurrence(self.k, self.v, self.h0, entering, final, reverse=False)
        return entering, final

    def recurrence(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        init: torch.Tensor | None,
        every: torch.Tensor,
        end: torch.Tensor,
        reverse: bool,
    ) -> None:
        """Run :func:`_recurrence_kernel` into ``every`` and ``end`` (``init`` ``None``: zeros)."""
        # Without init, end stands in as a pointer that HAS_INIT=False never reads.
        launch(
            _recurrence_kernel, self.row_grid, x, y, self.g, init if init is not None else end,
            every, end, self.cu, self.chunk_offsets, *strides(x), *strides(y),
            *self.g_strides(), self.q.shape[1], self.q.shape[2], self.scale, REVERSE=reverse,
            HAS_DECAY=self.has_decay, HAS_INIT=init is not None, **self.row_meta,
        )  # fmt: skip


def _int32_on(cu_seqlens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``cu_seqlens`` as contiguous int32 on ``device``; as given when it already is (a
    strategy's, cached on the device), so that no call copies it again."""
    if cu_seqlens.device == device and cu_seqlens.dtype == torch.int32:
        return cu_seqlens.contiguous()
    return cu_seqlens.to(device=device, dtype=torch.int32).contiguous()


@functools.lru_cache(maxsize=256)
def _chunk_tables(
    lengths: tuple[int, ...], varlen: bool, chunk: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int32 ``[rows + 1]`` first global chunk of each row, and per global chunk its row and
    first token (within its batch row). Cached per shape and device (shared: never modify
    them in place): a copy per call would stall a GPU's stream once per layer."""
    # Built on the host (whatever the default device), then copied once.
    lengths_t = torch.tensor(lengths, dtype=torch.int64, device="cpu")
    per_row = (lengths_t + chunk - 1) // chunk
    offsets = F.pad(per_row.cumsum(0), (1, 0))
    row = torch.repeat_interleave(torch.arange(len(lengths), device="cpu"), per_row)
    # Varlen rows are segments of one batch row; otherwise each row starts at token 0.
    row_start = F.pad(lengths_t.cumsum(0), (1, 0))[:-1] if varlen else torch.zeros_like(per_row)
    start = row_start[row] + (torch.arange(row.numel(), device="cpu") - offsets[row]) * chunk
    tables = torch.cat([offsets, row, start]).to(device=device, dtype=torch.int32)
    return tables.split([offsets.numel(), row.numel(), start.numel()])


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
    bounds: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention with optional scalar decay.

    ``q``/``k`` ``[B, S, H, Dk]``, ``v`` ``[B, S, H, Dv]`` (float32, float16 or bfloat16),
    ``log_decay`` ``[B, S, H]`` (``g_t <= 0``, natural log; ``None`` = no decay),
    ``initial_state`` ``[N, H, Dk, Dv]`` (``None`` = zeros) with ``N = B``, or the number of
    segments of ``cu_seqlens`` (int32 ``[N + 1]`` from 0 to ``S``, ``B == 1``; segments may be
    empty and need not align with chunks; ``bounds``, the same boundaries as host ints, spare
    reading them back). Returns ``o`` ``[B, S, H, Dv]`` in ``q.dtype`` and the final states
    ``[N, H, Dk, Dv]`` float32.
    """
    p = _Problem(q, k, v, log_decay, scale, initial_state, cu_seqlens, chunk_size, bounds)
    entering, final = p.states()
    out = torch.empty_like(p.v)
    launch(
        _output_kernel, (triton.cdiv(v.shape[3], p.block_v), p.n_chunks, q.shape[2]),
        p.q, p.k, p.v, p.g, entering, out, p.cu, p.chunk_row, p.chunk_start,
        *strides(p.q), *strides(p.k), *strides(p.v), *p.g_strides(), *strides(out),
        q.shape[1], q.shape[2], p.scale, HAS_DECAY=p.has_decay, **p.chunk_meta,
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
    bounds: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Gradients of :func:`forward` given ``do`` ``[B, S, H, Dv]`` and ``dfinal_state``.

    ``dfinal_state`` ``[N, H, Dk, Dv]`` (``None`` = zeros); other arguments as in
    :func:`forward`, which is recomputed as needed. Returns ``dq``/``dk`` ``[B, S, H, Dk]`` and
    ``dv`` ``[B, S, H, Dv]`` in ``q.dtype``, ``dlog_decay`` ``[B, S, H]`` in ``log_decay``'s
    dtype (``None`` iff ``log_decay`` is ``None``) and ``dinitial_state`` ``[N, H, Dk, Dv]``
    float32.
    """
    p = _Problem(q, k, v, log_decay, scale, initial_state, cu_seqlens, chunk_size, bounds)
    if do.shape != v.shape:
        raise ValueError(f"do {tuple(do.shape)} must have v's shape {tuple(v.shape)}")
    if dfinal_state is not None and tuple(dfinal_state.shape) != p.state_shape:
        raise ValueError(
            f"dfinal_state has shape {tuple(dfinal_state.shape)}; expected {p.state_shape}"
        )
    # do meets v and k in tl.dot, whose operands must share a dtype.
    do = rows_last_contiguous(do.to(q.dtype))
    dht = None if dfinal_state is None else dfinal_state.float().contiguous()
    entering, final = p.states()
    leaving_grad = torch.empty_like(entering)
    dh0 = torch.empty(p.state_shape, dtype=torch.float32, device=q.device)
    p.recurrence(p.q, do, dht, leaving_grad, dh0, reverse=True)
    dq, dk, dv = torch.empty_like(p.q), torch.empty_like(p.k), torch.empty_like(p.v)
    token_dot = torch.empty_like(p.g)  # dL/dG_t without the final-state term
    launch(
        _grads_kernel, (p.n_chunks, q.shape[2]), p.q, p.k, p.v, p.g, do, entering,
        leaving_grad, dq, dk, dv, token_dot, p.cu, p.chunk_row, p.chunk_start,
        *strides(p.q), *strides(p.k), *strides(p.v), *p.g_strides(), *strides(do),
        *strides(dq), *strides(dk), *strides(dv), q.shape[1], q.shape[2], p.scale,
        HAS_DECAY=p.has_decay, **p.chunk_meta,
    )  # fmt: skip
    dg = None
    if p.has_decay:
        state_dot = (
            (final * dht).sum((-1, -2)) if dht is not None else final.new_zeros(final.shape[:2])
        )
        dg = _decay_grad(token_dot, state_dot, p.cu if p.varlen else None)
        dg = dg.to(log_decay.dtype)
    return dq, dk, dv, dg, dh0


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
