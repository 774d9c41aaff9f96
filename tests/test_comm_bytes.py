"""Bytes each rank sends per forward and backward, counted by wrapping torch.distributed calls
(``distseq.CommCounter``), against the one formula: each strategy's own ``traffic()``."""

from __future__ import annotations

import pytest
import torch

import cases
import linear_cases
from distseq.layout import LAYOUTS
from distseq.strategies import ATTENTION_STRATEGIES, LINEAR_STRATEGIES

# seq_local 10 and head_dim 8: at P = 3 the all-to-all's (P-1)/P share is exact only when
# computed over the whole buffer (a per-head rounding loses bytes).
ATTENTION_CASE = dict(seq_local=10, hq=6, hkv=3, dim=8)
LINEAR_CASE = {"batch": 2, "seq_local": 8, "heads": 2, "dk": 8, "dv": 4}


def assert_busiest_rank_matches(counted: list[dict], traffic, keys=("forward", "backward")):
    forward, backward = keys
    assert max(c[forward] for c in counted) == traffic.forward, counted
    assert max(c[backward] for c in counted) == traffic.backward, counted
    assert max(c[forward] + c[backward] for c in counted) == traffic.total, counted


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("world", (2, 3, 4))
@pytest.mark.parametrize("strategy", sorted(ATTENTION_STRATEGIES))
def test_attention_bytes_are_the_strategys_traffic(pools, strategy, world, dtype, layout):
    case = dict(ATTENTION_CASE, dtype=dtype, layout=layout)
    if strategy == "ulysses":
        case.update(hq=2 * world, hkv=world)
    elem = torch.tensor([], dtype=dtype).element_size()
    traffic = ATTENTION_STRATEGIES.get(strategy).traffic(
        world, case["seq_local"], case["hq"], case["hkv"], case["dim"], elem
    )
    counted = pools(world).run(cases.count_attention_bytes, strategy, case)
    assert traffic.forward > 0
    assert_busiest_rank_matches(counted, traffic)
    for c in counted:
        assert c["forward_received"] <= traffic.forward
        assert 0 < c["control"] <= 16 * world * 8  # the input agreement stays tiny


@pytest.mark.parametrize("world", (2, 3, 4))
@pytest.mark.parametrize(
    "strategy, layout",
    [(s, layout) for s in sorted(LINEAR_STRATEGIES) for layout in LINEAR_STRATEGIES.get(s).layouts],
)
def test_linear_bytes_are_the_strategys_traffic(pools, strategy, world, layout):
    impl = LINEAR_STRATEGIES.get(strategy)
    case = dict(LINEAR_CASE, layout=layout)
    traffic = impl.traffic(world, case["batch"], case["heads"], case["dk"], case["dv"], layout)
    counted = pools(world).run(linear_cases.count_linear_bytes, strategy, case)
    assert traffic.forward > 0
    assert_busiest_rank_matches(counted, traffic, keys=("forward_sent", "backward_sent"))


@pytest.mark.parametrize("world", (2, 3, 4))
def test_ulysses_sends_replicated_kv_heads_only_as_far_as_needed(pools, world):
    """Hkv = 1 < P: one K/V head becomes P replicas (lcm(1, P)), no more."""
    case = dict(ATTENTION_CASE, hq=2 * world, hkv=1, dtype=torch.float32, layout="zigzag")
    impl = ATTENTION_STRATEGIES.get("ulysses")
    traffic = impl.traffic(world, case["seq_local"], case["hq"], 1, case["dim"], 4)
    assert traffic == impl.traffic(world, case["seq_local"], case["hq"], world, case["dim"], 4)
    counted = pools(world).run(cases.count_attention_bytes, "ulysses", case)
    assert_busiest_rank_matches(counted, traffic)


def test_single_rank_sends_nothing():
    for name in ATTENTION_STRATEGIES:
        assert ATTENTION_STRATEGIES.get(name).traffic(1, 64, 4, 2, 16, 2).total == 0
    for name in LINEAR_STRATEGIES:
        assert LINEAR_STRATEGIES.get(name).traffic(1, 3, 4, 16, 16, "contiguous").total == 0


@pytest.mark.parametrize("world", (2, 3, 4))
def test_ring_backward_sends_dkv_only_p_minus_1_hops(world):
    """The byte minimum: K/V and their float32 gradients each cross P - 1 links."""
    s, hkv, dim, elem = 12, 2, 16, 2
    kv = 2 * s * hkv * dim
    traffic = ATTENTION_STRATEGIES.get("ring").traffic(world, s, 4, hkv, dim, elem)
    assert (traffic.forward, traffic.backward) == ((world - 1) * kv * elem, (world - 1) * kv * 6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ulysses, ring", [(2, 2), (1, 4), (4, 1), (2, 1)])
def test_usp_bytes_are_its_traffic(pools, ulysses, ring, layout):
    """All-to-all inside the Ulysses groups plus the ring across them, Hkv = 1 < u replicated."""
    world = ulysses * ring
    case = dict(ATTENTION_CASE, hq=2 * ulysses, hkv=1, layout=layout, ulysses_degree=ulysses)
    traffic = ATTENTION_STRATEGIES.get("usp").traffic(
        world, case["seq_local"], case["hq"], 1, case["dim"], 4, ulysses
    )
    counted = pools(world).run(cases.count_attention_bytes, "usp", case)
    assert traffic.forward > 0
    assert_busiest_rank_matches(counted, traffic)


@pytest.mark.parametrize("world", (2, 3, 4, 6))
def test_usp_traffic_spans_ring_and_ulysses(world):
    """u = 1 is the ring, u = P is ulysses; in between, the sum of a u-rank all-to-all and a
    P/u-rank ring over the replicated heads."""
    usp, ring, ulysses = (ATTENTION_STRATEGIES.get(n) for n in ("usp", "ring", "ulysses"))
    shape = (world, 12, 2 * world, 1, 16, 2)
    assert usp.traffic(*shape, 1) == ring.traffic(*shape)
    assert usp.traffic(*shape, world) == ulysses.traffic(*shape)
    for u in (u for u in range(2, world) if world % u == 0):
        s, hq, d, e, kv = 12, 2 * world, 16, 2, u  # lcm(1, u) = u K/V heads
        a2a = (u - 1) * s * d * e * (2 * hq + 2 * kv) / u
        n = s * kv * d
        expected = (a2a + (world // u - 1) * 2 * n * e, a2a + (world // u - 1) * 2 * n * (e + 4))
        assert (usp.traffic(*shape, u).forward, usp.traffic(*shape, u).backward) == expected
