"""The ``torch`` delta-rule backend: the chunked (WY / UT-transform) gated delta rule in PyTorch.

Per head ``S_t = exp(g_t)(I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``, ``o_t = scale · q_t S_t``.
Segments are cut into chunks of ``C`` tokens as in :mod:`distseq.kernels.linear_torch` (padding
tokens have ``k = v = 0``, ``β = g = 0``: identity transitions). Within a chunk, with ``b`` the
in-chunk cumulative log decay and ``D_ij = exp(b_i - b_j)`` (``j <= i``), the state after
token ``i`` is ``exp(b_i) S + Σ_{j<=i} D_ij k_j u_jᵀ``, where the corrected values ``u``
solve the unit lower-triangular system (the UT transform)

    ``(I + L) U = β ⊙ V - (β exp(b) ⊙ K) S``,  ``L_ij = β_i D_ij k_i·k_j`` (``j < i``),

i.e. ``U = W_v - W_k S`` with ``W_v = (I+L)⁻¹(β ⊙ V)``, ``W_k = (I+L)⁻¹(β exp(b) ⊙ K)``. So a
chunk maps its incoming state affinely, ``S' = A_c S + M_c`` with
``A_c = exp(b_C) I - K̄ᵀ W_k``, ``M_c = K̄ᵀ W_v`` (``K̄ = exp(b_C - b) ⊙ K``), and its outputs
are ``scale · (Q Kᵀ ⊙ D) W_v + scale · q̃ S`` with ``q̃ = exp(b) ⊙ Q - (Q Kᵀ ⊙ D) W_k``. Only the
``Dk × Dk`` / ``Dk × Dv`` chunk recurrence is sequential; everything else is batched matmuls
and one batched triangular solve, accumulated in float32 (float64 for float64 inputs).

A *piece* (a row, or a ``cu_seqlens`` segment) is the product of its chunks: ``A`` (the
ordered product of the ``A_c``), ``M`` (its final state from zero) and per token
``q̃_t P_{c-1}`` (``P`` the product of the chunks before), which is what sequence parallelism
exchanges and applies (:func:`prepare`).

The backward is written out (:func:`backward`): it recomputes the chunks and the states entering
them (nothing is stored between the passes), runs the state gradient's chunk recurrence in
reverse, then forms every gradient chunk-batched, back through the triangular solve. The
forward stays differentiable too; the tests compare the two in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distseq.kernels import linear_torch
from distseq.kernels.common import accumulator_dtype, chunk_scan, host_bounds
from distseq.kernels.linear_torch import _Packing, chunk_decay_mask

is_available = linear_torch.is_available  # the same chunked form, the same dtypes


class _Chunks:
    """Chunk-level quantities ``[N, H, chunks, ...]`` of one call (see the module docstring).

    ``transitions`` ``A_c`` ``[N, H, chunks, Dk, Dk]`` and (given values) ``memories`` ``M_c``
    ``[N, H, chunks, Dk, Dv]``; :meth:`query_side` adds what the queries need.
    """

    def __init__(self, k, v, beta, log_decay, bounds, chunk_size):
        batch, length = k.shape[:2]
        self.work = work = accumulator_dtype(k.dtype)
        self.packing = packing = _Packing(batch, length, bounds, chunk_size, k.device)
        kk = packing.pack(k.to(work))
        beta = packing.pack(beta.to(work)).unsqueeze(-1)  # [N, H, chunks, C, 1]
        causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=k.device).tril()
        eye_k = torch.eye(kk.shape[-1], dtype=work, device=k.device)
        if log_decay is None:
            decay, start_decay, end_decay, chunk_decay = causal.to(work), 1.0, 1.0, 1.0
        else:
            b, decay = chunk_decay_mask(packing, log_decay, causal, work)
            last = b[..., -1:]
            start_decay = b.exp().unsqueeze(-1)
            end_decay = (last - b).exp().unsqueeze(-1)
            chunk_decay = last.exp().unsqueeze(-1)
        lower = (beta * (kk @ kk.transpose(-1, -2)) * decay).tril(-1)
        system = lower + torch.eye(chunk_size, dtype=work, device=k.device)
        self.w_k = torch.linalg.solve_triangular(
            system, beta * start_decay * kk, upper=False, unitriangular=True
        )
        k_end = (end_decay * kk).transpose(-1, -2)
        self.transitions = chunk_decay * eye_k - k_end @ self.w_k
        self._kk, self._decay, self._start_decay = kk, decay, start_decay
        self.beta, self.end_decay, self.chunk_decay, self.system = (
            beta,
            end_decay,
            chunk_decay,
            system,
        )
        self.decayed = log_decay is not None
        self.w_v = self.vv = None
        if v is not None:
            self.vv = vv = packing.pack(v.to(work))
            self.w_v = torch.linalg.solve_triangular(
                system, beta * vv, upper=False, unitriangular=True
            )
            self.memories = k_end @ self.w_v

    def query_side(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``q̃`` ``[N, H, chunks, C, Dk]`` and the zero-state output ``(Q Kᵀ ⊙ D) W_v``
        ``[N, H, chunks, C, Dv]`` (``None`` without values), both unscaled."""
        qq = self.packing.pack(q.to(self.work))
        scores = (qq @ self._kk.transpose(-1, -2)) * self._decay
        queries = self._start_decay * qq - scores @ self.w_k
        return queries, None if self.w_v is None else scores @ self.w_v

    def run(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """States entering every chunk ``[N, H, chunks, Dk, Dv]`` from ``state``, and the last."""
        return chunk_scan(
            state,
            lambda s, c: self.transitions[:, :, c] @ s + self.memories[:, :, c],
            self.packing.chunks,
        )

    def prefixes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Products ``P_{c-1}`` of the transitions before each chunk, and the whole piece's."""
        n, heads, _, dk, _ = self.transitions.shape
        product = torch.eye(dk, dtype=self.work, device=self.transitions.device)
        product = product.expand(n, heads, dk, dk)
        return chunk_scan(product, lambda p, c: self.transitions[:, :, c] @ p, self.packing.chunks)


def _zeros_state(k: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
    work = accumulator_dtype(k.dtype)
    return k.new_zeros(n, k.shape[2], k.shape[3], v.shape[3], dtype=work)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    bounds: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule; see :mod:`distseq.kernels` for the contract (``beta``
    ``[B, S, H]``). Returns ``o`` ``[B, S, H, Dv]`` (``q.dtype``) and the final states
    ``[N, H, Dk, Dv]`` (float32; float64 for float64 inputs). Differentiable."""
    ch = _Chunks(k, v, beta, log_decay, host_bounds(cu_seqlens, bounds), chunk_size)
    state = _zeros_state(k, v, ch.packing.n) if initial_state is None else initial_state
    incoming, final = ch.run(state.to(ch.work))
    queries, local = ch.query_side(q)
    out = (local + queries @ incoming) * scale
    return ch.packing.unpack(out).to(q.dtype), final


class Prepared:
    """A shard's piece maps, and (on demand) what the queries need: see :func:`prepare`."""

    def __init__(self, q, k, v, beta, log_decay, *, scale, bounds, chunk_size):
        self._q, self._scale = q, scale
        self._chunks = ch = _Chunks(k, v, beta, log_decay, bounds, chunk_size)
        self._incoming, self.memories = ch.run(_zeros_state(k, v, ch.packing.n))
        self._before, self.transitions = ch.prefixes()

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The zero-state outputs ``o0`` ``[B, S, H, Dv]`` and effective queries ``q̃``
        ``[B, S, H, Dk]`` (accumulator dtype)."""
        ch = self._chunks
        queries, local = ch.query_side(self._q)
        out = (local + queries @ self._incoming) * self._scale
        return ch.packing.unpack(out), ch.packing.unpack(queries @ self._before)


def prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None,
    *,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    bounds: Sequence[int] | None = None,
) -> Prepared:
    """Every piece's affine map, for sequence parallelism.

    The result's ``memories`` ``M`` ``[N, H, Dk, Dv]`` (final states from zero) and
    ``transitions`` ``A`` ``[N, H, Dk, Dk]`` are ready at once (the chunk recurrence, the
    sequential part); its ``outputs()`` then does the query-side matmuls, which a strategy runs
    while ``(A, M)`` are exchanged. From an incoming state ``S_in`` the outputs are
    ``o0 + scale · q̃_t S_in`` and the final state is ``A S_in + M``.
    """
    return Prepared(
        q, k, v, beta, log_decay, scale=scale, bounds=host_bounds(cu_seqlens, bounds),
        chunk_size=chunk_size,
    )  # fmt: skip


def maps(
    q: torch.Tensor,
    k: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    bounds: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``A`` and ``q̃`` of :func:`prepare` alone (no values): for backends whose kernels
    give only outputs and states."""
    ch = _Chunks(k, None, beta, log_decay, host_bounds(cu_seqlens, bounds), chunk_size)
    before, transition = ch.prefixes()
    queries, _ = ch.query_side(q)
    return transition, ch.packing.unpack(queries @ before)


def backward(
    do: torch.Tensor,
    dfinal_state: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    bounds: Sequence[int] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients ``(dq, dk, dv, dbeta, dlog_decay, dinitial_state)`` of :func:`forward`.

    Written out chunk by chunk (nothing is kept from the forward: it recomputes the chunks
    and the states entering them). With ``dO`` the scaled output gradient, ``S`` a chunk's
    incoming state and ``dS'`` its outgoing state's gradient (the reverse chunk recurrence
    ``dS = A_cᵀ dS' + q̃ᵀ dO``), ``U = W_v - W_k S``:
    ``dU = (QKᵀ⊙D)ᵀ dO + K̄ dS'``; through the UT transform ``dR = (I+L)⁻ᵀ dW`` and
    ``dL = -dR Wᵀ`` (strictly lower); every exponent's gradient is gathered per token as
    ``db`` and ``dlog_decay`` is its reverse cumulative sum within the chunk.
    ``dlog_decay`` is ``None`` iff ``log_decay`` is; ``dinitial_state`` is always returned.
    """
    ch = _Chunks(k, v, beta, log_decay, host_bounds(cu_seqlens, bounds), chunk_size)
    packing = ch.packing
    state = _zeros_state(k, v, packing.n) if initial_state is None else initial_state
    incoming, final = ch.run(state.to(ch.work))
    qq, kk, vv = packing.pack(q.to(ch.work)), ch._kk, ch.vv
    gamma, eps, beta_c = ch._start_decay, ch.end_decay, ch.beta  # exp(b), exp(b_C - b), β
    qk = qq @ kk.transpose(-1, -2)
    scores = qk * ch._decay
    queries = gamma * qq - scores @ ch.w_k
    dout = packing.pack(do.to(ch.work)) * scale
    reaching = queries.transpose(-1, -2) @ dout
    grad = torch.zeros_like(final) if dfinal_state is None else dfinal_state.to(ch.work)
    d_out_state, grad = chunk_scan(  # dS' of every chunk; grad: the initial state's
        grad,
        lambda g, c: ch.transitions[:, :, c].transpose(-1, -2) @ g + reaching[:, :, c],
        packing.chunks,
        reverse=True,
    )
    values = ch.w_v - ch.w_k @ incoming  # U
    k_end = eps * kk
    d_values = scores.transpose(-1, -2) @ dout + k_end @ d_out_state
    d_scores = (dout @ values.transpose(-1, -2)) * ch._decay
    dout_state = dout @ incoming.transpose(-1, -2)  # dO Sᵀ
    values_state = values @ d_out_state.transpose(-1, -2)  # U dS'ᵀ
    dq = d_scores @ kk + gamma * dout_state
    dk = d_scores.transpose(-1, -2) @ qq + eps * values_state
    # Through W = (I+L)⁻¹ R: R_v = β V, R_k = β exp(b) K.
    d_rv = torch.linalg.solve_triangular(ch.system.mT, d_values, upper=True, unitriangular=True)
    d_rk = torch.linalg.solve_triangular(
        ch.system.mT, -d_values @ incoming.transpose(-1, -2), upper=True, unitriangular=True
    )
    d_lower = -(d_rv @ ch.w_v.transpose(-1, -2) + d_rk @ ch.w_k.transpose(-1, -2)).tril(-1)
    kk_t = kk @ kk.transpose(-1, -2)
    dv = beta_c * d_rv
    k_rk = (kk * d_rk).sum(-1, keepdim=True)
    dbeta = (vv * d_rv).sum(-1) + (gamma * k_rk).squeeze(-1)
    dbeta = dbeta + (d_lower * kk_t * ch._decay).sum(-1)
    dk = dk + beta_c * gamma * d_rk
    d_kk = beta_c * d_lower * ch._decay
    dk = dk + (d_kk + d_kk.transpose(-1, -2)) @ kk
    dlog_decay = None
    if ch.decayed:
        d_mask = d_scores * qk + d_kk * kk_t  # dD ⊙ D, from the scores and from L
        db = d_mask.sum(-1) - d_mask.sum(-2)
        db = db + ((qq * dout_state).sum(-1, keepdim=True) + beta_c * k_rk).mul(gamma).squeeze(-1)
        d_eps = (kk * values_state).sum(-1) * eps.squeeze(-1)
        db = db - d_eps
        last = d_eps.sum(-1) + (incoming * d_out_state).sum((-1, -2)) * ch.chunk_decay[..., 0, 0]
        db[..., -1] += last
        dg = db.flip(-1).cumsum(-1).flip(-1)
        dlog_decay = packing.unpack(dg).to(log_decay.dtype)
    dq, dk, dv, dbeta = (packing.unpack(t) for t in (dq, dk, dv, dbeta))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbeta.to(beta.dtype), dlog_decay, grad
