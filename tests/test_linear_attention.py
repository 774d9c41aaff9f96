"""distseq.linear_attention: every strategy x decay x (varlen or not) x layout x world size,
forward, backward, final state and its gradient, against the float64 token recurrence."""

from __future__ import annotations

import itertools

import pytest
import torch

import distseq
import linear_cases
from tolerance import nan_max

WORLD_SIZES = (1, 2, 3, 4)
FP32_TOL = 1e-4
LAYOUTS = {"lasp2": ("contiguous", "zigzag"), "ring": ("contiguous", "zigzag"),
           "allscan": ("contiguous",)}  # fmt: skip


def make_case(strategy, layout, decay, varlen, world):
    parts = world * (2 if layout == "zigzag" else 1)
    case = {"strategy": strategy, "layout": layout, "decay": decay, "seed": world + len(decay),
                "seq": parts * 5}  # fmt: skip
    if varlen:  # includes an empty document
        case["docs"] = [parts * 3, 0, parts, parts * 2]
    return case


def assert_close(results: list[list[dict[str, float]]], cases: list[dict], tol: float) -> None:
    for index, case in enumerate(cases):
        worst = {name: nan_max(rank[index][name] for rank in results) for name in results[0][index]}
        assert nan_max(worst.values()) <= tol, f"{case}: relative errors {worst} exceed {tol}"


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("strategy", sorted(LAYOUTS))
def test_matches_float64_recurrence(pools, strategy, world):
    cases = [
        make_case(strategy, layout, decay, varlen, world)
        for layout, decay, varlen in itertools.product(
            LAYOUTS[strategy], ("none", "constant", "data"), (False, True)
        )
    ]
    assert_close(pools(world).run(linear_cases.linear_vs_reference, cases), cases, FP32_TOL)


@pytest.mark.parametrize("strategy", sorted(LAYOUTS))
def test_several_kernel_chunks_per_shard(pools, strategy):
    """Shards longer than the kernel's 64-token chunk (not a multiple of it), bigger heads."""
    cases = [
        {
            "strategy": strategy,
            "decay": "data",
            "seq": 2 * 70,
            "batch": 1,
            "heads": 3,
            "dk": 16,
            "dv": 8,
        },
        {"strategy": strategy, "decay": "constant", "docs": [2 * 50, 2 * 33], "dk": 16, "dv": 16},
    ]
    assert_close(pools(2).run(linear_cases.linear_vs_reference, cases), cases, FP32_TOL)


@pytest.mark.parametrize("world", (2, 3))
def test_strategies_with_triton_kernels(pools, world):
    """The strategies run unchanged on our Triton kernels (interpreted on CPU)."""
    from distseq.kernels import unavailable_reason

    if unavailable_reason("triton", torch.device("cpu"), torch.float32) is not None:
        pytest.skip("triton cannot run here")
    cases = [
        {"strategy": "lasp2", "layout": "zigzag", "decay": "data", "seq": 2 * world * 5,
         "backend": "triton"},
        {"strategy": "allscan", "decay": "constant", "docs": [world * 3, world * 2],
         "backend": "triton"},
    ]  # fmt: skip
    assert_close(pools(world).run(linear_cases.linear_vs_reference, cases), cases, FP32_TOL)


def test_strategies_are_registered():
    assert distseq.available_strategies()["linear_attention"] == ["allscan", "lasp2", "ring"]


def test_returns_output_only_by_default():
    import torch

    q = torch.randn(1, 6, 2, 4)
    out = distseq.linear_attention(q, q, q)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape


@pytest.mark.parametrize("strategy", ("lasp2", "allscan"))
def test_bf16_single_process_close_to_reference(strategy):
    """bf16 inputs: fp32 states and sums keep the error at bf16 rounding level."""
    import torch

    from distseq.reference import linear_attention_reference

    case = {"strategy": strategy, "decay": "data", "seq": 96, "dk": 16, "dv": 16}
    full, _ = linear_cases.linear_inputs(case)
    q, k, v = (full[n].to(torch.bfloat16) for n in ("q", "k", "v"))
    g = full["g"].float()
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
    out = distseq.linear_attention(*leaves[:3], log_decay=leaves[3], strategy=strategy)
    assert out.dtype == torch.bfloat16
    out.backward(full["do"].to(torch.bfloat16))
    ref = [t.double().requires_grad_() for t in (q, k, v, g)]
    ref_out, _ = linear_attention_reference(*ref[:3], log_decay=ref[3])
    ref_out.backward(full["do"])
    assert linear_cases.relative_error(out, ref_out) <= 2e-2
    for got, want in zip(leaves, ref):
        assert got.grad.dtype == got.dtype
        assert linear_cases.relative_error(got.grad, want.grad) <= 3e-2


@pytest.mark.parametrize("strategy", sorted(LAYOUTS))
def test_process_subgroups(pools, strategy):
    """Two groups of 2 out of 4 ranks, each its own problem (group-rank -> global-rank P2P)."""
    cases = [dict(make_case(strategy, "contiguous", "data", varlen, 2), group_size=2)
             for varlen in (False, True)]  # fmt: skip
    assert_close(pools(4).run(linear_cases.linear_vs_reference, cases), cases, FP32_TOL)
