"""distseq.delta_rule: every strategy x decay x (batch or packed documents) x layout x world
size, forward, backward (dbeta included), final state and its gradient, against the float64
token recurrence; bytes against each strategy's traffic(); bad inputs on every rank."""

from __future__ import annotations

import itertools

import pytest
import torch

import distseq
import linear_cases
from distseq.strategies import DELTA_STRATEGIES
from test_comm_bytes import assert_busiest_rank_matches
from test_linear_attention import FP32_TOL, assert_close

WORLD_SIZES = (1, 2, 3, 4)
DECAYS = ("none", "data")


def make_case(strategy, layout, decay, varlen, world):
    parts = world * (2 if layout == "zigzag" else 1)
    case = {"op": "delta", "strategy": strategy, "layout": layout, "decay": decay,
            "seed": world + len(decay), "seq": parts * 3, "dk": 4, "dv": 3}  # fmt: skip
    if varlen:  # four documents, one of them empty
        case["docs"] = [parts * 2, 0, parts, parts * 2]
    return case


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("strategy", sorted(DELTA_STRATEGIES))
def test_matches_float64_recurrence(pools, strategy, world):
    layouts = DELTA_STRATEGIES.get(strategy).layouts
    cases = [
        make_case(strategy, layout, decay, varlen, world)
        for layout, decay, varlen in itertools.product(layouts, DECAYS, (False, True))
    ]
    assert_close(pools(world).run(linear_cases.linear_vs_reference, cases), cases, FP32_TOL)


def test_several_kernel_chunks_per_shard(pools):
    """Shards longer than the kernel's 64-token chunk (not a multiple of it), bigger heads."""
    cases = [
        {"op": "delta", "strategy": s, "decay": "data", "seq": 2 * 70, "batch": 1, "heads": 2,
         "dk": 16, "dv": 8}
        for s in sorted(DELTA_STRATEGIES)
    ]  # fmt: skip
    assert_close(pools(2).run(linear_cases.linear_vs_reference, cases), cases, FP32_TOL)


def test_strategies_are_registered():
    assert distseq.available_strategies()["delta_rule"] == ["allscan", "lasp2", "ring"]


@pytest.mark.parametrize("world", (2, 3, 4))
@pytest.mark.parametrize(
    "strategy, layout",
    [(s, layout) for s in sorted(DELTA_STRATEGIES) for layout in DELTA_STRATEGIES.get(s).layouts],
)
def test_bytes_are_the_strategys_traffic(pools, strategy, layout, world):
    case = {"op": "delta", "batch": 2, "seq_local": 8, "heads": 2, "dk": 4, "dv": 3,
            "layout": layout}  # fmt: skip
    traffic = DELTA_STRATEGIES.get(strategy).traffic(world, 2, 2, 4, 3, layout)
    counted = pools(world).run(linear_cases.count_linear_bytes, strategy, case)
    assert traffic.forward > 0
    assert_busiest_rank_matches(counted, traffic, keys=("forward_sent", "backward_sent"))


@pytest.mark.parametrize("strategy", ("lasp2", "allscan"))
def test_exchange_is_posted_before_the_query_side(pools, strategy):
    """Forward: lasp2's all-gather, allscan's receives and its head's sends are in flight
    while the query-side matmuls run; backward: posted before the local backward."""
    for events in pools(3).run(linear_cases.delta_comm_compute_order, strategy):
        split = events.index("|")
        for phase, local in ((events[:split], "outputs"), (events[split + 1 :], "backward")):
            assert phase[0] == "post" and phase.count(local) == 1, events


def test_lasp2_bytes_formula():
    """The issue's pin: (P-1)·H·(Dk² + Dk·Dv)·4 per rank per pass (one document)."""
    p, heads, dk, dv = 4, 3, 16, 8
    t = DELTA_STRATEGIES.get("lasp2").traffic(p, 1, heads, dk, dv, "contiguous")
    assert t.forward == t.backward == (p - 1) * heads * (dk * dk + dk * dv) * 4


ALL_RANKS_BAD = {
    "beta_range": ["beta must lie in [0, 1]", "sigmoid"],
    "beta_shape": ["beta has shape (1, 8, 3)", "(1, 8, 2)"],
    "allscan_zigzag": ["allscan needs layout='contiguous'", "lasp2"],
    "qk_shape": ["q and k must have the same shape"],
    "unknown_strategy": ["unknown delta rule strategy 'lasp3'", "lasp2"],
}


@pytest.mark.parametrize("kind", sorted(ALL_RANKS_BAD))
def test_bad_input_raises_on_every_rank(pools, kind):
    for outcome in pools(2).run_raw(linear_cases.bad_delta_call, kind, timeout=60):
        assert not outcome.ok and outcome.error_type == "ValueError", outcome.traceback
        for word in ALL_RANKS_BAD[kind]:
            assert word in outcome.message, f"{word!r} not in {outcome.message!r}"


def test_one_bad_rank_makes_all_raise_without_hang(pools):
    world = 3
    outcomes = pools(world).run_raw(linear_cases.bad_delta_call, "one_rank_beta", timeout=60)
    assert all(not o.ok and o.error_type == "ValueError" for o in outcomes), outcomes
    assert "beta must lie in [0, 1]" in outcomes[-1].message
    assert all(f"rank(s) [{world - 1}]" in o.message for o in outcomes[:-1]), outcomes


def test_single_process_matches_reference_with_small_chunks():
    """The torch kernel over many chunks (chunk_size 4) and its pieces' affine maps."""
    from distseq.kernels import delta_torch
    from distseq.reference import delta_rule_reference

    case = {"op": "delta", "decay": "data", "docs": [9, 0, 14, 3], "dk": 8, "dv": 4}
    full, cu = linear_cases.linear_inputs(case)
    q, k, v, beta, g, h0 = (full[n] for n in ("q", "k", "v", "beta", "g", "h0"))
    ref_o, ref_h = delta_rule_reference(q, k, v, beta, log_decay=g, initial_state=h0,
                                        cu_seqlens=cu)  # fmt: skip
    f32 = [t.float() for t in (q, k, v, beta, g)]
    o, h = delta_torch.forward(*f32, scale=8**-0.5, initial_state=h0.float(), cu_seqlens=cu,
                               chunk_size=4)  # fmt: skip
    assert linear_cases.relative_error(o, ref_o) <= FP32_TOL
    assert linear_cases.relative_error(h, ref_h) <= FP32_TOL
    prepared = delta_torch.prepare(*f32, scale=8**-0.5, cu_seqlens=cu, chunk_size=4)
    transition, memory = prepared.transitions, prepared.memories
    assert linear_cases.relative_error(transition @ h0.float() + memory, ref_h) <= FP32_TOL
    o0, queries = prepared.outputs()
    segments = [(a, b) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    with_state = torch.cat(
        [o0[:, a:b] + 8**-0.5 * torch.einsum("bshk,hkv->bshv", queries[:, a:b], h0[n].float())
         for n, (a, b) in enumerate(segments)], dim=1,
    )  # fmt: skip
    assert linear_cases.relative_error(with_state, ref_o) <= FP32_TOL


@pytest.mark.parametrize("decay", DECAYS)
def test_kernel_backward_over_many_chunks(decay):
    """delta_torch.backward (chunk_size 4, packed documents) vs the float64 recurrence."""
    from distseq.kernels import delta_torch
    from distseq.reference import delta_rule_reference

    case = {"op": "delta", "decay": decay, "docs": [9, 0, 14, 3], "dk": 8, "dv": 4}
    full, cu = linear_cases.linear_inputs(case)
    names = [n for n in ("q", "k", "v", "beta", "g", "h0") if full[n] is not None]
    leaves = {n: full[n].clone().requires_grad_() for n in names}
    ref_o, ref_h = delta_rule_reference(
        *(leaves[n] for n in ("q", "k", "v", "beta")), log_decay=leaves.get("g"),
        initial_state=leaves["h0"], cu_seqlens=cu,
    )  # fmt: skip
    ((ref_o * full["do"]).sum() + (ref_h * full["dh"]).sum()).backward()
    f32 = {n: full[n].float() for n in names}
    grads = delta_torch.backward(
        full["do"].float(), full["dh"].float(), *(f32[n] for n in ("q", "k", "v", "beta")),
        f32.get("g"), scale=8**-0.5, initial_state=f32["h0"], cu_seqlens=cu, chunk_size=4,
    )  # fmt: skip
    for name, grad in zip(("q", "k", "v", "beta", "g", "h0"), grads):
        if name in leaves:
            assert linear_cases.relative_error(grad, leaves[name].grad) <= FP32_TOL, name
        else:
            assert grad is None, name


@pytest.mark.parametrize("strategy", ("lasp2", "allscan"))
def test_bf16_single_process_close_to_reference(strategy):
    """bf16 inputs: float32 chunk products and states keep the error at bf16 rounding level."""
    from distseq.reference import delta_rule_reference

    case = {"op": "delta", "decay": "data", "seq": 96, "dk": 16, "dv": 16}
    full, _ = linear_cases.linear_inputs(case)
    bf16 = [full[n].to(torch.bfloat16) for n in ("q", "k", "v", "beta")]
    leaves = [t.clone().requires_grad_() for t in (*bf16, full["g"].float())]
    out = distseq.delta_rule(*leaves[:4], log_decay=leaves[4], strategy=strategy)
    assert out.dtype == torch.bfloat16
    out.backward(full["do"].to(torch.bfloat16))
    ref = [t.detach().double().requires_grad_() for t in leaves]
    ref_out, _ = delta_rule_reference(*ref[:4], log_decay=ref[4])
    ref_out.backward(full["do"])
    assert linear_cases.relative_error(out, ref_out) <= 2e-2
    for got, want in zip(leaves, ref):
        assert got.grad.dtype == got.dtype
        assert linear_cases.relative_error(got.grad, want.grad) <= 3e-2


def test_fla_backend_needs_cuda():
    from distseq.kernels import DELTA_BACKENDS, unavailable_reason

    reason = unavailable_reason("fla", torch.device("cpu"), torch.float32, DELTA_BACKENDS)
    assert reason is not None and ("CUDA" in reason or "not usable" in reason)
    with pytest.raises(ValueError, match="backend 'fla' cannot run"):
        distseq.delta_rule(*(torch.randn(1, 4, 1, 2) for _ in range(3)), torch.rand(1, 4, 1),
                           backend="fla")  # fmt: skip


@pytest.mark.parametrize("decay", DECAYS)
def test_explicit_backward_is_autograd_of_the_chunked_form(decay):
    """float64, packed documents over several chunks: the hand-written backward equals
    autograd through ``forward`` to rounding (a wrong term would show far above 1e-10)."""
    from distseq.kernels import delta_torch

    case = {"op": "delta", "decay": decay, "docs": [9, 0, 14, 3], "dk": 8, "dv": 4}
    full, cu = linear_cases.linear_inputs(case)
    names = [n for n in ("q", "k", "v", "beta", "g", "h0") if full[n] is not None]
    leaves = [full[n].clone().requires_grad_() for n in names]
    named = dict(zip(names, leaves))
    o, h = delta_torch.forward(
        *(named[n] for n in ("q", "k", "v", "beta")), named.get("g"), scale=0.3,
        initial_state=named["h0"], cu_seqlens=cu, chunk_size=4,
    )  # fmt: skip
    expected = torch.autograd.grad([o, h], leaves, [full["do"], full["dh"]])
    got = delta_torch.backward(
        full["do"], full["dh"], *(full[n] for n in ("q", "k", "v", "beta", "g")), scale=0.3,
        initial_state=full["h0"], cu_seqlens=cu, chunk_size=4,
    )  # fmt: skip
    got = [g for g in got if g is not None]
    assert len(got) == len(expected)
    for name, a, b in zip(names, got, expected):
        assert linear_cases.relative_error(a, b) <= 1e-10, name
