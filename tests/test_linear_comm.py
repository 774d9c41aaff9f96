"""Bytes each rank moves in linear attention and causal_conv1d, counted by wrapping
torch.distributed calls, against the strategies' formulas."""

from __future__ import annotations

import pytest

import linear_cases

CASE = {"batch": 2, "seq_local": 8, "heads": 2, "dk": 8, "dv": 4}


def state_bytes(case):
    return case["batch"] * case["heads"] * case["dk"] * case["dv"] * 4


@pytest.mark.parametrize("world", (2, 3))
def test_lasp2_bytes_are_independent_of_length(pools, world):
    short, long = (
        pools(world).run(linear_cases.count_linear_bytes, "lasp2", dict(CASE, seq_local=s))
        for s in (8, 32)
    )
    assert short == long and all(c["forward_sent"] > 0 for c in short)


@pytest.mark.parametrize("world", (2, 3, 4))
@pytest.mark.parametrize("strategy", ("allscan", "ring"))
def test_chain_moves_one_state_per_rank_whatever_p(pools, strategy, world):
    one_state = state_bytes(CASE)
    counted = pools(world).run(linear_cases.count_linear_bytes, strategy, CASE)
    for rank, c in enumerate(counted):
        # Forward: r-1 -> r -> r+1; backward: the mirror.
        first, last = rank == 0, rank == world - 1
        expected = {
            "forward_sent": 0 if last else one_state,
            "forward_received": 0 if first else one_state,
            "backward_sent": 0 if first else one_state,
            "backward_received": 0 if last else one_state,
        }
        for key, value in expected.items():
            assert c[key] == value, (rank, c)


@pytest.mark.parametrize("layout", ("contiguous", "zigzag"))
def test_conv_halo_bytes(pools, layout):
    world = 3
    case = {"batch": 2, "seq_local": 8, "channels": 5, "kernel": 4, "layout": layout}
    halo = case["batch"] * (case["kernel"] - 1) * case["channels"] * 4
    counted = pools(world).run(linear_cases.count_conv_bytes, case)
    for rank, c in enumerate(counted):
        if layout == "contiguous":
            forward, backward = (0 if rank == world - 1 else halo), (0 if rank == 0 else halo)
        else:  # every rank but P-1 sends its first chunk's tail on; all but 0 its second's
            forward = halo * ((rank != world - 1) + (rank != 0))
            backward = forward
        assert c == {"forward_sent": forward, "backward_sent": backward}, (rank, c)


@pytest.mark.parametrize("strategy", ("lasp2", "allscan"))
def test_exchange_is_posted_before_the_local_kernel(pools, strategy):
    """lasp2's all-gathers, allscan's receives and its head's sends are in flight while the
    local kernel runs, in the forward and in the backward."""
    for events in pools(3).run(linear_cases.linear_comm_compute_order, strategy):
        split = events.index("|")
        for phase, kernel in ((events[:split], "forward"), (events[split + 1 :], "backward")):
            assert phase[0] == "post" and phase.count(kernel) == 1, events


@pytest.mark.parametrize("strategy", ("allscan", "lasp2"))
def test_final_state_costs_a_broadcast_and_an_all_reduce(pools, strategy):
    """output_final_state: allscan broadcasts the final state (lasp2 has it already); the
    backward all-reduces its gradient. Middle rank of 3, counted like CommCounter's formulas."""
    world, one_state = 3, state_bytes(CASE)
    case = dict(CASE, output_final_state=True)
    middle = pools(world).run(linear_cases.count_linear_bytes, strategy, case)[1]
    if strategy == "allscan":
        forward = one_state + one_state * (world - 1) // world
        backward = one_state + 2 * one_state * (world - 1) // world
    else:
        payload = CASE["batch"] * CASE["heads"] * (CASE["dk"] * CASE["dv"] + 1) * 4
        forward = (world - 1) * payload
        backward = forward + 2 * one_state * (world - 1) // world
    assert middle["forward_sent"] == forward and middle["backward_sent"] == backward, middle
