"""Dense single-device references that every kernel and strategy is tested against.

Written for clarity, not speed: they materialise the full score matrix in float64.
"""

from __future__ import annotations

import torch


def _segments(cu_seqlens: torch.Tensor | None, length: int) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, length)]
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def attention_mask(
    seq_q: int,
    seq_k: int,
    *,
    causal: bool,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean ``[Sq, Sk]`` mask, ``True`` where query ``i`` may attend to key ``j``.

    Segment ``n`` of the queries sees only segment ``n`` of the keys; ``causal`` is
    bottom-right aligned within each segment (query ``i`` sees key ``j`` iff
    ``j <= i + len_k - len_q``).
    """
    mask = torch.zeros(seq_q, seq_k, dtype=torch.bool)
    segments_q = _segments(cu_seqlens_q, seq_q)
    segments_k = _segments(cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens_q, seq_k)
    if len(segments_q) != len(segments_k):
        raise ValueError(f"{len(segments_q)} query segments but {len(segments_k)} key segments")
    for (q0, q1), (k0, k1) in zip(segments_q, segments_k):
        block = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
        if causal:
            block = block.tril(diagonal=(k1 - k0) - (q1 - q0))
        mask[q0:q1, k0:k1] = block
    return mask


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention in float64, differentiable.

    ``q`` ``[B, Sq, Hq, D]``, ``k``/``v`` ``[B, Sk, Hkv, D]`` (GQA when ``Hkv < Hq``).
    Returns ``out`` ``[B, Sq, Hq, D]`` and ``lse`` ``[B, Hq, Sq]``, both float64; rows that see
    no key get ``out = 0`` and ``lse = -inf``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[2] // k.shape[2]
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    k64 = k64.repeat_interleave(group, dim=1)
    v64 = v64.repeat_interleave(group, dim=1)
    mask = attention_mask(
        q.shape[1], k.shape[1], causal=causal, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k
    )
    scores = (q64 @ k64.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).masked_fill(~torch.isfinite(lse).unsqueeze(-1), 0))
    out = (probs @ v64).transpose(1, 2)
    return out, lse


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decayed linear recurrence token by token, in float64, differentiable.

    ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t`` per head, ``S_0`` =
    ``initial_state`` (zeros if ``None``). ``q``/``k`` ``[B, S, H, Dk]``, ``v`` ``[B, S, H, Dv]``,
    ``log_decay`` ``[B, S, H]`` (``g_t <= 0``; ``None`` = no decay). With ``cu_seqlens`` (int
    ``[N + 1]``, ``B == 1``) the state restarts at every segment start, segment ``n`` starting
    from ``initial_state[n]``. ``initial_state`` is ``[N, H, Dk, Dv]`` with ``N = B`` (or the
    segment count). Returns ``o`` ``[B, S, H, Dv]`` and the final states ``[N, H, Dk, Dv]``,
    both float64.
    """

    def add(state, b, t):
        return state + k64[b, t].unsqueeze(-1) * v64[b, t].unsqueeze(-2)

    k64, v64 = k.double(), v.double()
    return _token_recurrence(q, k, v, add, log_decay, scale, initial_state, cu_seqlens)


def delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule token by token, in float64, differentiable.

    ``S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T``, ``o_t = scale q_t S_t``
    (flash-linear-attention's ``fused_recurrent_gated_delta_rule`` without its in-kernel
    L2 norm). ``beta`` ``[B, S, H]``; everything else as :func:`linear_attention_reference`.
    """

    def correct(state, b, t):
        kt, bt = k64[b, t], beta64[b, t][:, None]  # [H, Dk], [H, 1]
        new_value = bt * (v64[b, t] - torch.einsum("hk,hkv->hv", kt, state))
        return state + kt.unsqueeze(-1) * new_value.unsqueeze(-2)

    k64, v64, beta64 = k.double(), v.double(), beta.double()
    return _token_recurrence(q, k, v, correct, log_decay, scale, initial_state, cu_seqlens)


def _token_recurrence(q, k, v, update, log_decay, scale, initial_state, cu_seqlens):
    """``state = update(exp(g_t) state, b, t)`` over each row/segment; ``o_t = scale q_t S_t``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    if cu_seqlens is None:
        rows = [(b, 0, length) for b in range(batch)]
    else:
        rows = [(0, s, e) for s, e in _segments(cu_seqlens, length)]
    q64 = q.double()
    g64 = None if log_decay is None else log_decay.double()
    pieces: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    finals = []
    for n, (b, start, end) in enumerate(rows):
        state = torch.zeros(heads, dk, dv, dtype=torch.float64, device=q.device)
        if initial_state is not None:
            state = initial_state[n].double()
        for t in range(start, end):
            if g64 is not None:
                state = state * g64[b, t].exp()[:, None, None]
            state = update(state, b, t)
            pieces[b].append(scale * torch.einsum("hk,hkv->hv", q64[b, t], state))
        finals.append(state)
    empty = q64.new_zeros(0, heads, dv)
    outputs = torch.stack([torch.stack(p) if p else empty for p in pieces])
    return outputs, torch.stack(finals)
