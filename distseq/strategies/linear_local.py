"""The per-segment state algebra shared by every linear-attention strategy (no communication).

Tensors here are in the *kernel view* ``[B', S', H, D]`` of a shard: one segment per batch
row, or per ``cu_seqlens`` span. With ``G_t`` the cumulative log decay of a segment up to and
including token ``t`` and ``G_T`` its total:

* memory ``M = Σ_t exp(G_T - G_t) k_tᵀ v_t`` — the segment's final state from a zero state;
* incoming-state contribution to the output ``o_t += scale · exp(G_t) q_t S_in``;
* its adjoint, the gradient reaching ``S_in`` from the outputs ``Σ_t scale · exp(G_t) q_tᵀ do_t``;
* the gradients that ``S_in`` and the outgoing state's gradient ``dS_out`` add to a zero-state
  backward (:func:`state_gradients`).

All exponents are ``<= 0`` (``g <= 0``); sums run in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from distseq.kernels.common import accumulator_dtype


class Segments:
    """Splits kernel-view tensors into segments: whole rows, or ``cu_seqlens`` spans of row 0."""

    def __init__(self, bounds: Sequence[int] | None) -> None:
        """``bounds``: the host-side ``cu_seqlens`` (a device tensor's ``.tolist()`` would
        sync), or ``None`` for whole rows."""
        self.spans = None if bounds is None else list(itertools.pairwise(bounds))

    def split(self, x: torch.Tensor | None) -> list[torch.Tensor | None]:
        """``[n_i, L_i, ...]`` pieces: ``[x]`` for rows, one ``[1, L, ...]`` per span."""
        if self.spans is None:
            return [x]
        return [None if x is None else x[:, s:e] for s, e in self.spans]

    def split_states(self, states: torch.Tensor) -> list[torch.Tensor]:
        """``[N, ...]`` per-segment states, grouped like :meth:`split`."""
        if self.spans is None:
            return [states]
        return list(states.split(1))

    def join_tokens(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        return pieces[0] if self.spans is None else torch.cat(pieces, dim=1)


def _work(x: torch.Tensor) -> torch.Tensor:
    return x.to(accumulator_dtype(x.dtype))


def _cumulative(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``G`` ``[n, L, H]`` (cumsum of ``g`` along the segment), in ``like``'s dtype."""
    return None if g is None else g.to(like.dtype).cumsum(1)


def memories(
    k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, segments: Segments
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each segment's memory ``[N, H, Dk, Dv]`` and total log decay ``G_T`` ``[N, H]``."""
    states, totals = [], []
    for kk, vv, gg in zip(segments.split(k), segments.split(v), segments.split(g)):
        kk, vv = _work(kk), _work(vv)
        big_g = _cumulative(gg, kk)
        n, length, heads = kk.shape[:3]
        if big_g is None or length == 0:
            total = kk.new_zeros(n, heads)
        else:
            total = big_g[:, -1]
            kk = kk * (total.unsqueeze(1) - big_g).exp().unsqueeze(-1)
        states.append(torch.einsum("bshk,bshv->bhkv", kk, vv))
        totals.append(total)
    return torch.cat(states), torch.cat(totals)


def apply_incoming(
    q: torch.Tensor, states: torch.Tensor, g: torch.Tensor | None, segments: Segments, scale: float
) -> torch.Tensor:
    """``scale · exp(G_t) q_t S_in`` ``[B', S', H, Dv]`` for incoming states ``[N, H, Dk, Dv]``."""
    outs = []
    for qq, gg, ss in zip(segments.split(q), segments.split(g), segments.split_states(states)):
        qq = _weighted_queries(qq, gg, scale)
        outs.append(torch.einsum("bshk,bhkv->bshv", qq, ss.to(qq.dtype)))
    return segments.join_tokens(outs)


def incoming_gradient(
    q: torch.Tensor, do: torch.Tensor, g: torch.Tensor | None, segments: Segments, scale: float
) -> torch.Tensor:
    """Adjoint of :func:`apply_incoming`: ``Σ_t scale · exp(G_t) q_tᵀ do_t`` ``[N, H, Dk, Dv]``."""
    grads = []
    for qq, dd, gg in zip(segments.split(q), segments.split(do), segments.split(g)):
        qq = _weighted_queries(qq, gg, scale)
        grads.append(torch.einsum("bshk,bshv->bhkv", qq, dd.to(qq.dtype)))
    return torch.cat(grads)


def state_gradients(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    do: torch.Tensor,
    incoming: torch.Tensor,
    outgoing: torch.Tensor,
    segments: Segments,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What ``S_in`` and ``dS_out`` ``[N, H, Dk, Dv]`` add to ``dq, dk, dv, dg`` ``[B', S', ...]``.

    ``dq_t += scale · exp(G_t) do_t S_inᵀ``; ``dk_t += exp(G_T - G_t) v_t dS_outᵀ``;
    ``dv_t += exp(G_T - G_t) k_t dS_out``. For the decay, ``dL/dG_t = q_t·dq_t - k_t·dk_t``
    (plus ``S_T·dS_out`` at the last token), which is linear, so these terms' share is the
    reverse cumulative sum of ``q_t·Δdq_t - k_t·Δdk_t`` and ``(exp(G_T) S_in + M)·dS_out``.
    """
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    pieces = zip(
        segments.split(q), segments.split(k), segments.split(v), segments.split(g),
        segments.split(do), segments.split_states(incoming), segments.split_states(outgoing),
    )  # fmt: skip
    for qq, kk, vv, gg, dd, s_in, ds_out in pieces:
        qq, kk, vv, dd = _work(qq), _work(kk), _work(vv), _work(dd)
        big_g = _cumulative(gg, qq)
        dq = torch.einsum("bshv,bhkv->bshk", dd, s_in.to(qq.dtype)) * scale
        ds_out = ds_out.to(qq.dtype)
        dk = torch.einsum("bshv,bhkv->bshk", vv, ds_out)
        dv = torch.einsum("bshk,bhkv->bshv", kk, ds_out)
        if big_g is not None and qq.shape[1] > 0:
            total = big_g[:, -1:]
            dq = dq * big_g.exp().unsqueeze(-1)
            to_end = (total - big_g).exp().unsqueeze(-1)
            dk, dv = dk * to_end, dv * to_end
            dcum = (qq * dq).sum(-1) - (kk * dk).sum(-1)  # [n, L, H]
            s_out = total.squeeze(1).exp()[..., None, None] * s_in.to(qq.dtype)
            s_out = s_out + torch.einsum("bshk,bshv->bhkv", kk * to_end, vv)
            dcum[:, -1] += (s_out * ds_out).sum((-1, -2))
            parts[3].append(dcum.flip(1).cumsum(1).flip(1))
        elif big_g is not None:
            parts[3].append(big_g)
        for index, t in enumerate((dq, dk, dv)):
            parts[index].append(t)
    joined = [segments.join_tokens(p) for p in parts[:3]]
    return (*joined, segments.join_tokens(parts[3]) if g is not None else None)


def _weighted_queries(q: torch.Tensor, g: torch.Tensor | None, scale: float) -> torch.Tensor:
    q = _work(q) * scale
    big_g = _cumulative(g, q)
    return q if big_g is None else q * big_g.exp().unsqueeze(-1)
