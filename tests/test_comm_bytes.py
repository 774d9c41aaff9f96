"""Bytes each rank sends per forward+backward, counted by wrapping torch.distributed calls,
against each strategy's formula (see the strategy modules' docstrings)."""

from __future__ import annotations

import pytest
import torch

import cases

CASE = dict(seq_local=12, hq=4, hkv=2, dim=16)


def kv_bytes(case, elem):
    return 2 * case["seq_local"] * case["hkv"] * case["dim"] * elem


def expected_bytes(strategy, world, case, elem):
    p, n2 = world, kv_bytes(case, elem)
    if strategy == "ring":
        fwd = (p - 1) * n2
        bwd = (p - 1) * n2 + (p * kv_bytes(case, 4) if p > 1 else 0)
    elif strategy == "allgather":
        fwd = (p - 1) * n2
        bwd = (p - 1) * n2 + (p - 1) * kv_bytes(case, 4)
    else:  # ulysses: q, k, v out and o back; dout out and dq, dk, dv back
        per_token = case["seq_local"] * case["dim"] * elem * (p - 1) // p
        fwd = per_token * (2 * case["hq"] + 2 * case["hkv"])
        bwd = per_token * (2 * case["hq"] + 2 * case["hkv"])
    return fwd, bwd


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("world", (2, 3, 4))
@pytest.mark.parametrize("strategy", ("ring", "allgather", "ulysses"))
def test_bytes_match_formula(pools, strategy, world, dtype):
    case = dict(CASE, dtype=dtype)
    if strategy == "ulysses":
        case.update(hq=2 * world, hkv=world)
    elem = torch.tensor([], dtype=dtype).element_size()
    fwd, bwd = expected_bytes(strategy, world, case, elem)
    for counted in pools(world).run(cases.count_attention_bytes, strategy, case):
        assert counted["forward"] == pytest.approx(fwd, rel=0.01), counted
        assert counted["backward"] == pytest.approx(bwd, rel=0.01), counted
        assert 0 < counted["control"] <= 16 * world * 8  # the input agreement stays tiny


def test_ring_forward_bytes_match_issue_formula(pools):
    """(P-1)·2·S_local·Hkv·D·elem for the ring forward, exactly."""
    world = 4
    counted = pools(world).run(cases.count_attention_bytes, "ring", CASE)
    formula = (world - 1) * 2 * CASE["seq_local"] * CASE["hkv"] * CASE["dim"] * 4
    assert all(c["forward"] == formula and c["forward_received"] == formula for c in counted)
