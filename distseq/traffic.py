"""Bytes each rank sends per forward and backward pass, one function per strategy.

These are the formulas the strategies' docstrings state (the most any rank sends; received
bytes are the same), in the units :class:`distseq.comm.CommCounter` counts: a collective
counts what a bandwidth-optimal algorithm puts on the rank's wire. The benchmarks print
them next to the counted bytes; the tests assert equality.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Traffic:
    """The most bytes a rank sends in the forward, in the backward, and in both together
    (``both``; default ``forward + backward``, less when no rank sends in both passes)."""

    forward: int
    backward: int
    both: int | None = None

    @property
    def total(self) -> int:
        return self.forward + self.backward if self.both is None else self.both


def ring_bytes(p: int, s_local: int, hkv: int, head_dim: int, elem: int) -> Traffic:
    """K/V rotate ``P-1`` hops each pass; float32 dK/dV travel ``P`` hops in the backward."""
    if p == 1:
        return Traffic(0, 0)
    kv = 2 * s_local * hkv * head_dim
    return Traffic((p - 1) * kv * elem, (p - 1) * kv * elem + p * kv * 4)


def allgather_bytes(p: int, s_local: int, hkv: int, head_dim: int, elem: int) -> Traffic:
    """One all-gather of K/V per pass; the backward reduce-scatters float32 dK/dV."""
    kv = 2 * s_local * hkv * head_dim
    return Traffic((p - 1) * kv * elem, (p - 1) * kv * elem + (p - 1) * kv * 4)


def ulysses_bytes(p: int, s_local: int, hq: int, hkv: int, head_dim: int, elem: int) -> Traffic:
    """Two all-to-alls per pass: Q/K/V out and O back (dO out, dQ/dK/dV back)."""
    per_head = s_local * head_dim * elem * (p - 1) // p
    return Traffic(per_head * (2 * hq + 2 * hkv), per_head * (2 * hq + 2 * hkv))


def lasp2_bytes(p: int, segments: int, heads: int, dk: int, dv: int) -> Traffic:
    """One all-gather per pass of every local segment's float32 state and log decay
    (``segments``: local pieces, i.e. documents, twice that with the zigzag layout)."""
    per_pass = (p - 1) * segments * heads * (dk * dv + 1) * 4
    return Traffic(per_pass, per_pass)


def allscan_bytes(p: int, docs: int, heads: int, dk: int, dv: int) -> Traffic:
    """One float32 state per document per pass, whatever ``P`` (contiguous layout). The
    forward chain runs ``0 → P-1`` and the backward ``P-1 → 0``, so at ``P = 2`` no rank
    sends in both passes."""
    if p == 1:
        return Traffic(0, 0)
    state = docs * heads * dk * dv * 4
    return Traffic(state, state, state * min(2, p - 1))


def linear_ring_bytes(p: int, pieces: int, heads: int, dk: int, dv: int) -> Traffic:
    """LASP-1: at most one float32 state per local piece (document; two per document with
    the zigzag layout) per pass, unpipelined."""
    per_pass = pieces * heads * dk * dv * 4 if p > 1 else 0
    return Traffic(per_pass, per_pass)


ATTENTION = {"ring": ring_bytes, "allgather": allgather_bytes, "ulysses": ulysses_bytes}
LINEAR = {"lasp2": lasp2_bytes, "allscan": allscan_bytes, "ring": linear_ring_bytes}


def attention_traffic(
    strategy: str, p: int, s_local: int, hq: int, hkv: int, head_dim: int, elem: int
) -> Traffic:
    """Per-rank traffic of one ``distseq.attention`` call (``[1, s_local, H, head_dim]``)."""
    if strategy == "ulysses":
        return ulysses_bytes(p, s_local, hq, hkv, head_dim, elem)
    return ATTENTION[strategy](p, s_local, hkv, head_dim, elem)


def linear_traffic(
    strategy: str, p: int, docs: int, heads: int, dk: int, dv: int, layout: str
) -> Traffic:
    """Per-rank traffic of one ``distseq.linear_attention`` call over ``docs`` documents
    (no final state)."""
    if strategy == "allscan":
        if layout != "contiguous":
            raise ValueError(f"linear strategy 'allscan' needs layout='contiguous', not {layout!r}")
        return allscan_bytes(p, docs, heads, dk, dv)
    # zigzag: each rank holds two pieces of every document
    pieces = docs * (2 if layout == "zigzag" else 1)
    return LINEAR[strategy](p, pieces, heads, dk, dv)
