"""Every strategy x layout x causal x world size x (MHA, GQA, varlen), forward and backward,
against the dense float64 reference."""

from __future__ import annotations

import itertools

import pytest
import torch

import cases
import distseq
import distseq.reference

WORLD_SIZES = (1, 2, 3, 4)
STRATEGIES = ("ring", "ulysses", "allgather")
FP32_TOL = 1e-4
BF16_TOL = 5e-2


def make_case(strategy, layout, causal, world, mode, dtype=torch.float32):
    """A small problem valid for ``strategy`` at ``world`` ranks (ulysses needs P | heads)."""
    parts = world * (2 if layout == "zigzag" else 1)
    if strategy == "ulysses":
        hq, hkv = (2 * world, world) if mode == "gqa" else (world, world)
    else:
        hq, hkv = (4, 2) if mode == "gqa" else (3, 3)
    case = dict(
        strategy=strategy, layout=layout, causal=causal, hq=hq, hkv=hkv, dim=16, dtype=dtype,
        seq=parts * 5, batch=2 if mode != "varlen" else 1, seed=world * 7 + len(strategy),
    )  # fmt: skip
    if mode == "varlen":
        case["docs"] = [parts * 3, parts, parts * 4, parts * 2]
    return case


def assert_close(errors: list[dict[str, float]], tol: float) -> None:
    worst = {name: max(e[name] for e in errors) for name in errors[0]}
    assert max(worst.values()) <= tol, f"relative errors {worst} exceed {tol}"


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_dense_reference_fp32(pools, strategy, world):
    for layout, causal, mode in itertools.product(
        ("contiguous", "zigzag"), (True, False), ("mha", "gqa", "varlen")
    ):
        case = make_case(strategy, layout, causal, world, mode)
        errors = pools(world).run(cases.attention_vs_reference, case)
        assert_close(errors, FP32_TOL)


@pytest.mark.parametrize("world", (2, 3))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_dense_reference_bf16(pools, strategy, world):
    for layout, mode in (("zigzag", "gqa"), ("contiguous", "varlen")):
        case = make_case(strategy, layout, True, world, mode, dtype=torch.bfloat16)
        errors = pools(world).run(cases.attention_vs_reference, case)
        assert_close(errors, BF16_TOL)


def test_longer_sequence_many_heads(pools):
    """One larger case per strategy, where blocks span several kernel tiles."""
    for strategy in STRATEGIES:
        case = dict(
            strategy=strategy, layout="zigzag", causal=True, hq=8, hkv=4, dim=32,
            seq=4 * 2 * 40, batch=1, seed=3,
        )  # fmt: skip
        assert_close(pools(4).run(cases.attention_vs_reference, case), FP32_TOL)


def test_single_process_without_init():
    """With torch.distributed uninitialized and group=None, attention runs on one process."""
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    out = distseq.attention(q, k, v, strategy="ring", layout="zigzag", causal=True)
    ref, _ = distseq.reference.attention_reference(q, k, v, causal=True)
    assert cases.relative_error(out, ref) < FP32_TOL


def test_available_strategies_lists_attention():
    names = distseq.available_strategies()
    assert set(names["attention"]) >= set(STRATEGIES)
    assert "linear_attention" in names
