"""The ``torch`` linear-attention backend: the chunked algorithm in plain PyTorch (any device).

Every segment (a batch row, or a ``cu_seqlens`` segment) is cut into chunks of ``chunk_size``
tokens, padded with tokens that have ``k = v = 0`` and ``g = 0`` (which leave the state
untouched), so all chunks of all segments form one ``[N, chunks, C, H, D]`` tensor. Within a
chunk the output is the quadratic form ``scale · (q kᵀ ⊙ exp(b_i - b_j))_{j<=i} v``; across
chunks a recurrence of ``N`` states carries ``S ← exp(b_C) S + Σ_j exp(b_C - b_j) k_jᵀ v_j``,
``b`` being the in-chunk cumulative log decay (float32, so every exponent is ``<= 0``).

The backward differentiates the same chunked forward (recomputed under autograd), which is
exact; it does not store activations between forward and backward.
"""

from __future__ import annotations

import functools

import torch

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def is_available(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in _SUPPORTED_DTYPES:
        return f"unsupported dtype {dtype}"
    return None


@functools.lru_cache(maxsize=64)
def _pack_plan(
    batch: int, length: int, bounds: tuple[int, ...] | None, chunk: int
) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """Index maps between tokens ``[B*S]`` and padded chunk slots ``[N*chunks*C]``.

    Returns ``(N, chunks, gather, scatter)``: ``gather[slot]`` is the token of a slot (``B*S``,
    a zero row, for padding); ``scatter[token]`` is the slot holding the token.
    """
    if bounds is None:
        spans = [(b * length, (b + 1) * length) for b in range(batch)]
    else:
        spans = list(zip(bounds[:-1], bounds[1:]))
    chunks = max(1, max(-(-(end - start) // chunk) for start, end in spans))
    width = chunks * chunk
    gather = torch.full((len(spans), width), batch * length, dtype=torch.long)
    scatter = torch.empty(batch * length, dtype=torch.long)
    for n, (start, end) in enumerate(spans):
        gather[n, : end - start] = torch.arange(start, end)
        scatter[start:end] = torch.arange(n * width, n * width + end - start)
    return len(spans), chunks, gather.flatten(), scatter


class _Packing:
    """Moves ``[B, S, ...]`` tensors into padded chunks ``[N, chunks, C, ...]`` and back."""

    def __init__(self, batch: int, length: int, cu_seqlens: torch.Tensor | None, chunk: int):
        self.batch, self.length, self.chunk = batch, length, chunk
        # Whole rows that split evenly need no index maps: a view does it.
        self.plain = cu_seqlens is None and length % chunk == 0 and length > 0
        if self.plain:
            self.n, self.chunks = batch, length // chunk
        else:
            bounds = None if cu_seqlens is None else tuple(cu_seqlens.tolist())
            self.n, self.chunks, self.gather, self.scatter = _pack_plan(
                batch, length, bounds, chunk
            )

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        tail = x.shape[2:]
        if self.plain:
            return x.reshape(self.n, self.chunks, self.chunk, *tail)
        flat = torch.cat([x.reshape(-1, *tail), x.new_zeros(1, *tail)])
        packed = flat.index_select(0, self.gather.to(x.device))
        return packed.view(self.n, self.chunks, self.chunk, *tail)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        tail = x.shape[3:]
        if self.plain:
            return x.reshape(self.batch, self.length, *tail)
        flat = x.reshape(-1, *tail).index_select(0, self.scatter.to(x.device))
        return flat.view(self.batch, self.length, *tail)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked linear attention; see :mod:`distseq.kernels` for the contract.

    ``q``/``k`` ``[B, S, H, Dk]``, ``v`` ``[B, S, H, Dv]``, ``log_decay`` ``[B, S, H]`` or
    ``None``, ``initial_state`` ``[N, H, Dk, Dv]``. Returns ``o`` ``[B, S, H, Dv]`` (``q.dtype``)
    and the final states ``[N, H, Dk, Dv]`` (float32; float64 for float64 inputs).
    """
    batch, length, heads, _ = q.shape
    work = _compute_dtype(q.dtype)
    packing = _Packing(batch, length, cu_seqlens, chunk_size)
    # [N, H, chunks, C, D]
    qc, kc, vc = (packing.pack(t.to(work)).permute(0, 3, 1, 2, 4) for t in (q, k, v))
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    scores = (qc @ kc.transpose(-1, -2)) * scale
    if log_decay is None:
        scores = scores.masked_fill(~causal, 0.0)
        q_decay, k_decay, chunk_decay = qc, kc, None
    else:
        b = packing.pack(log_decay.to(work)).permute(0, 3, 1, 2).cumsum(-1)  # [N, H, chunks, C]
        # Mask before exp: only exponents <= 0 are ever evaluated.
        diff = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
        scores = scores * diff.exp()
        last = b[..., -1:]
        q_decay = qc * b.exp().unsqueeze(-1)
        k_decay = kc * (last - b).exp().unsqueeze(-1)
        chunk_decay = last.squeeze(-1).exp()  # [N, H, chunks]
    intra = scores @ vc
    memories = k_decay.transpose(-1, -2) @ vc  # [N, H, chunks, Dk, Dv]
    state = (
        torch.zeros(packing.n, heads, k.shape[-1], v.shape[-1], dtype=work, device=q.device)
        if initial_state is None
        else initial_state.to(work)
    )
    incoming = []
    for c in range(packing.chunks):
        incoming.append(state)
        decayed = state if chunk_decay is None else state * chunk_decay[:, :, c, None, None]
        state = decayed + memories[:, :, c]
    out = intra + (q_decay @ torch.stack(incoming, dim=2)) * scale  # [N, H, chunks, C, Dv]
    out = packing.unpack(out.permute(0, 2, 3, 1, 4))
    return out.to(q.dtype), state


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
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor
]:
    """Gradients ``(dq, dk, dv, dlog_decay, dinitial_state)`` of :func:`forward`.

    ``do`` ``[B, S, H, Dv]``, ``dfinal_state`` ``[N, H, Dk, Dv]`` or ``None`` (zeros).
    ``dlog_decay`` is ``None`` iff ``log_decay`` is; ``dinitial_state`` is always returned.
    """
    work = _compute_dtype(q.dtype)
    if initial_state is None:
        n = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        initial_state = q.new_zeros(n, q.shape[2], k.shape[-1], v.shape[-1], dtype=work)
    inputs = [q, k, v, initial_state] + ([] if log_decay is None else [log_decay])
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in inputs]
        g = None if log_decay is None else leaves[4]
        out, final = forward(
            *leaves[:3], g, scale=scale, initial_state=leaves[3], cu_seqlens=cu_seqlens,
            chunk_size=chunk_size,
        )  # fmt: skip
        outputs, grads = [out], [do]
        if dfinal_state is not None:
            outputs.append(final)
            grads.append(dfinal_state.to(final.dtype))
        dq, dk, dv, dinit, *dg = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
    return dq, dk, dv, dg[0] if dg else None, dinit
