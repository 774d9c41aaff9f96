"""The ``torch`` linear-attention backend: the chunked algorithm in plain PyTorch (any device).

Every segment (a batch row, or a ``cu_seqlens`` segment) is cut into chunks of ``chunk_size``
tokens, padded with tokens that have ``k = v = 0`` and ``g = 0`` (which leave the state
untouched), so all chunks of all segments form one ``[N, H, chunks, C, D]`` tensor. Within a
chunk the output is the quadratic form ``scale · (q kᵀ ⊙ exp(b_i - b_j))_{j<=i} v``; across
chunks a recurrence of ``N`` states carries ``S ← exp(b_C) S + Σ_j exp(b_C - b_j) k_jᵀ v_j``,
``b`` being the in-chunk cumulative log decay (float32, so every exponent is ``<= 0``).

The backward is written out by hand (no autograd): it recomputes the chunks and the states
entering them (nothing is stored between forward and backward), runs the state gradient's
recurrence in reverse, then forms ``dq``, ``dk``, ``dv`` and ``dlog_decay`` chunk by chunk.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch

from distseq.kernels.common import accumulator_dtype, chunk_scan, host_bounds

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def is_available(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in _SUPPORTED_DTYPES:
        return f"unsupported dtype {dtype}"
    return None


# A batch's layers share one entry; few entries, since each holds O(tokens) device memory.
@functools.lru_cache(maxsize=16)
def _pack_plan(
    batch: int, length: int, bounds: tuple[int, ...] | None, chunk: int, device: torch.device
) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """Index maps between tokens ``[B*S]`` and padded chunk slots ``[N*chunks*C]`` on ``device``.

    Returns ``(N, chunks, gather, scatter)``: ``gather[slot]`` is the token of a slot (``B*S``,
    a zero row, for padding); ``scatter[token]`` is the slot holding the token. Built on the
    host and copied once per shape and device: a copy per call would stall a GPU's stream once
    per layer. Shared: never modify them in place.
    """
    if bounds is None:
        spans = [(b * length, (b + 1) * length) for b in range(batch)]
    else:
        spans = list(itertools.pairwise(bounds))
    chunks = max(1, max(-(-(end - start) // chunk) for start, end in spans))
    width = chunks * chunk
    gather = torch.full((len(spans), width), batch * length, dtype=torch.long)
    scatter = torch.empty(batch * length, dtype=torch.long)
    for n, (start, end) in enumerate(spans):
        gather[n, : end - start] = torch.arange(start, end)
        scatter[start:end] = torch.arange(n * width, n * width + end - start)
    return len(spans), chunks, gather.flatten().to(device), scatter.to(device)


class _Packing:
    """Moves ``[B, S, H, ...]`` tensors into padded chunks ``[N, H, chunks, C, ...]`` and back.

    ``bounds``: the host-side segment boundaries (``cu_seqlens``'s), ``None`` for whole rows.
    """

    def __init__(
        self,
        batch: int,
        length: int,
        bounds: tuple[int, ...] | None,
        chunk: int,
        device: torch.device,
    ):
        self.batch, self.length, self.chunk = batch, length, chunk
        # Whole rows that split evenly need no index maps: a view does it.
        self.plain = bounds is None and length % chunk == 0 and length > 0
        if self.plain:
            self.n, self.chunks = batch, length // chunk
        else:
            self.n, self.chunks, self.gather, self.scatter = _pack_plan(
                batch, length, bounds, chunk, device
            )

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        tail = x.shape[2:]
        if self.plain:
            packed = x.reshape(self.n, self.chunks, self.chunk, *tail)
        else:
            flat = torch.cat([x.reshape(-1, *tail), x.new_zeros(1, *tail)])
            packed = flat.index_select(0, self.gather)
            packed = packed.view(self.n, self.chunks, self.chunk, *tail)
        return packed.movedim(3, 1)  # heads first, so that chunk products batch over them

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(1, 3)
        tail = x.shape[3:]
        if self.plain:
            return x.reshape(self.batch, self.length, *tail)
        flat = x.reshape(-1, *tail).index_select(0, self.scatter)
        return flat.view(self.batch, self.length, *tail)


def chunk_decay_mask(
    packing: _Packing, log_decay: torch.Tensor, causal: torch.Tensor, work: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``b``, the in-chunk cumulative log decay ``[N, H, chunks, C]`` of ``log_decay``
    ``[B, S, H]``, and ``exp(b_i - b_j)`` for ``j <= i`` (0 above the diagonal) ``[N, H,
    chunks, C, C]``, both in ``work``; ``causal`` is the ``[C, C]`` lower-triangular mask."""
    b = packing.pack(log_decay.to(work)).cumsum(-1)
    # Mask before exp: only exponents <= 0 are ever evaluated.
    diff = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
    return b, diff.exp()


class _Chunks:
    """The inputs in chunks ``[N, H, chunks, C, D]`` and everything both passes reuse.

    ``mask`` ``[N|1, H|1, chunks|1, C, C]`` is ``exp(b_i - b_j)`` for ``j <= i`` (0 above the
    diagonal), ``b`` the in-chunk cumulative log decay; ``q_decay = exp(b) q``,
    ``k_decay = exp(b_C - b) k`` (``to_end = b_C - b``) and ``chunk_decay = exp(b_C)``
    ``[N, H, chunks]`` (``None``
    without decay). ``incoming`` ``[N, H, chunks, Dk, Dv]`` are the states entering each chunk
    and ``final`` the state after the last one.
    """

    def __init__(self, q, k, v, log_decay, initial_state, bounds, chunk_size):
        batch, length, heads, _ = q.shape
        self.work = work = accumulator_dtype(q.dtype)
        self.packing = packing = _Packing(batch, length, bounds, chunk_size, q.device)
        self.q, self.k, self.v = (packing.pack(t.to(work)) for t in (q, k, v))
        causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
        if log_decay is None:
            self.b = self.to_end = self.chunk_decay = None
            self.mask = causal.to(work)
            self.q_decay, self.k_decay = self.q, self.k
        else:
            b, self.mask = chunk_decay_mask(packing, log_decay, causal, work)
            self.b, last = b, b[..., -1:]
            self.to_end = last - b
            self.q_decay = self.q * b.exp().unsqueeze(-1)
            self.k_decay = self.k * self.to_end.exp().unsqueeze(-1)
            self.chunk_decay = last.squeeze(-1).exp()
        memories = self.k_decay.transpose(-1, -2) @ self.v  # [N, H, chunks, Dk, Dv]
        state = (
            q.new_zeros(packing.n, heads, k.shape[-1], v.shape[-1], dtype=work)
            if initial_state is None
            else initial_state.to(work)
        )
        self.incoming, self.final = chunk_scan(
            state, lambda s, c: self._decay(s, c) + memories[:, :, c], packing.chunks
        )

    def masked(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``(a bᵀ) ⊙ mask`` ``[N, H, chunks, C, C]`` for chunked ``a``, ``b`` of one head dim."""
        return (a @ b.transpose(-1, -2)) * self.mask

    def _decay(self, state: torch.Tensor, c: int) -> torch.Tensor:
        if self.chunk_decay is None:
            return state
        return state * self.chunk_decay[:, :, c, None, None]


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    bounds: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked linear attention; see :mod:`distseq.kernels` for the contract.

    ``q``/``k`` ``[B, S, H, Dk]``, ``v`` ``[B, S, H, Dv]``, ``log_decay`` ``[B, S, H]`` or
    ``None``, ``initial_state`` ``[N, H, Dk, Dv]``. Returns ``o`` ``[B, S, H, Dv]`` (``q.dtype``)
    and the final states ``[N, H, Dk, Dv]`` (float32; float64 for float64 inputs).
    """
    ch = _Chunks(q, k, v, log_decay, initial_state, host_bounds(cu_seqlens, bounds), chunk_size)
    out = (ch.masked(ch.q, ch.k) @ ch.v + ch.q_decay @ ch.incoming) * scale  # [N, H, chunks, C, Dv]
    return ch.packing.unpack(out).to(q.dtype), ch.final


def backward(
    do: torch.Tensor,
    dfinal_state: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    bounds: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Gradients ``(dq, dk, dv, dlog_decay, dinitial_state)`` of :func:`forward`.

    ``do`` ``[B, S, H, Dv]``, ``dfinal_state`` ``[N, H, Dk, Dv]`` or ``None`` (zeros).
    ``dlog_decay`` is ``None`` iff ``log_decay`` is; ``dinitial_state`` is always returned.

    The state gradient runs the recurrence backwards, ``dS_{c-1} = exp(b_C) dS_c +
    scale·q_decayᵀ do``; ``dq, dk, dv`` then follow chunk by chunk as in the forward. For the
    decay, with ``G`` the cumulative log decay of a segment, ``dL/dG_t = q_t·dq_t - k_t·dk_t``
    (plus ``S_T·dS_T`` at its end) and ``dL/dg_t`` is the reverse cumulative sum of that.
    """
    ch = _Chunks(q, k, v, log_decay, initial_state, host_bounds(cu_seqlens, bounds), chunk_size)
    packing = ch.packing
    dout = packing.pack(do.to(ch.work)) * scale
    reaching = ch.q_decay.transpose(-1, -2) @ dout  # each chunk's outputs -> its incoming state
    dfinal = torch.zeros_like(ch.final) if dfinal_state is None else dfinal_state.to(ch.work)
    # the gradient of the state leaving each chunk
    outgoing, grad = chunk_scan(
        dfinal, lambda g, c: ch._decay(g, c) + reaching[:, :, c], packing.chunks, reverse=True
    )
    dscores = ch.masked(dout, ch.v)
    scores = ch.masked(ch.q, ch.k)
    dq = dscores @ ch.k + (dout @ ch.incoming.transpose(-1, -2)) * _exp_or_one(ch.b)
    dk = dscores.transpose(-1, -2) @ ch.q
    dk = dk + (ch.v @ outgoing.transpose(-1, -2)) * _exp_or_one(ch.to_end)
    dv = scores.transpose(-1, -2) @ dout + ch.k_decay @ outgoing
    dlog_decay = None
    if log_decay is not None:
        dcum = (ch.q * dq).sum(-1) - (ch.k * dk).sum(-1)  # [N, H, chunks, C]
        dcum = dcum.flatten(2)
        dcum[..., -1] += (ch.final * dfinal).sum((-1, -2))  # padding keeps G flat to the end
        dg = dcum.flip(-1).cumsum(-1).flip(-1).unflatten(2, (packing.chunks, -1))
        dlog_decay = packing.unpack(dg).to(log_decay.dtype)
    dq, dk, dv = (packing.unpack(t) for t in (dq, dk, dv))
    # grad, the initial state's gradient, is in the accumulator dtype already.
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dlog_decay, grad


def _exp_or_one(x: torch.Tensor | None) -> torch.Tensor | float:
    return 1.0 if x is None else x.exp().unsqueeze(-1)
