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
