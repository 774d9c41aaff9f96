"""The chunked torch linear-attention kernel against the float64 token recurrence, and the
linear backend selector."""

from __future__ import annotations

import pytest
import torch

from distseq.kernels import linear_torch, select_linear_backend
from distseq.reference import linear_attention_reference

TOL = 1e-5

# (batch, seq, cu_seqlens, chunk_size): chunk sizes not dividing segments, empty segments.
SHAPES = [
    (2, 37, None, 8),
    (2, 32, None, 16),
    (1, 45, [0, 5, 5, 20, 45], 8),
    (1, 9, [0, 0, 9, 9], 4),
    (1, 13, [0, 13], 64),
]


def _relative(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("with_final_grad", (True, False))
@pytest.mark.parametrize("decay", (None, "data"))
@pytest.mark.parametrize("batch, seq, bounds, chunk", SHAPES)
def test_forward_backward_match_reference(batch, seq, bounds, chunk, decay, with_final_grad):
    gen = torch.Generator().manual_seed(seq + chunk)
    cu = None if bounds is None else torch.tensor(bounds, dtype=torch.int32)
    n = batch if cu is None else len(bounds) - 1
    heads, dk, dv = 2, 6, 5
    q, k = (torch.randn(batch, seq, heads, dk, generator=gen) for _ in range(2))
    v = torch.randn(batch, seq, heads, dv, generator=gen)
    g = -torch.rand(batch, seq, heads, generator=gen) * 2 if decay else None
    h0 = torch.randn(n, heads, dk, dv, generator=gen)
    scale = 0.3
    o, final = linear_torch.forward(
        q, k, v, g, scale=scale, initial_state=h0, cu_seqlens=cu, chunk_size=chunk
    )
    assert o.dtype == q.dtype and final.dtype == torch.float32
    leaves = [t.double().requires_grad_() for t in (q, k, v, h0)]
    g64 = None if g is None else g.double().requires_grad_()
    ref_o, ref_final = linear_attention_reference(
        *leaves[:3], log_decay=g64, scale=scale, initial_state=leaves[3], cu_seqlens=cu
    )
    assert _relative(o, ref_o) <= TOL and _relative(final, ref_final) <= TOL
    do = torch.randn_like(o)
    dfinal = torch.randn_like(final) if with_final_grad else None
    loss = (ref_o * do.double()).sum()
    if dfinal is not None:
        loss = loss + (ref_final * dfinal.double()).sum()
    loss.backward()
    dq, dk_, dv_, dg, dinit = linear_torch.backward(
        do, dfinal, q, k, v, g, scale=scale, initial_state=h0, cu_seqlens=cu, chunk_size=chunk
    )
    assert (dg is None) == (g is None)
    assert dinit.dtype == torch.float32 and dinit.shape == h0.shape
    expected = [leaf.grad for leaf in leaves] + ([] if g is None else [g64.grad])
    for got, want in zip([dq, dk_, dv_, dinit] + ([] if g is None else [dg]), expected):
        assert _relative(got, want) <= TOL


def test_zero_initial_state_when_none():
    q = torch.randn(2, 10, 1, 4)
    o, final = linear_torch.forward(q, q, q, None, scale=1.0, chunk_size=4)
    o0, final0 = linear_torch.forward(
        q, q, q, None, scale=1.0, initial_state=torch.zeros(2, 1, 4, 4), chunk_size=4
    )
    assert torch.equal(o, o0) and torch.equal(final, final0)
    *_, dinit = linear_torch.backward(torch.ones_like(o), None, q, q, q, None, scale=1.0)
    assert dinit.shape == (2, 1, 4, 4) and dinit.abs().sum() > 0


def test_strong_decay_stays_finite():
    """Cumulative decays far below float32's exp range: no inf/nan (only exp of <= 0)."""
    q = torch.randn(1, 130, 2, 4)
    g = torch.full((1, 130, 2), -30.0)
    o, final = linear_torch.forward(q, q, q, g, scale=0.5)
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    grads = linear_torch.backward(
        torch.randn_like(o), torch.randn_like(final), q, q, q, g, scale=0.5
    )
    assert all(torch.isfinite(t).all() for t in grads)


def test_backend_selection():
    cpu = torch.device("cpu")
    assert select_linear_backend("auto", cpu, torch.float32) is linear_torch
    assert select_linear_backend("torch", cpu, torch.bfloat16) is linear_torch
    with pytest.raises(ValueError, match="backend 'fla' cannot run"):
        select_linear_backend("fla", cpu, torch.float32)
    with pytest.raises(ValueError, match="unknown backend 'cuda_magic'"):
        select_linear_backend("cuda_magic", cpu, torch.float32)


def test_triton_backend_resolves_on_cpu_under_the_interpreter():
    pytest.importorskip("triton")  # conftest sets TRITON_INTERPRET=1 without CUDA
    module = select_linear_backend("triton", torch.device("cpu"), torch.float32)
    assert module.__name__ == "distseq.kernels.linear_triton"
