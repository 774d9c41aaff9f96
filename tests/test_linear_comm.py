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


def _recv(peer, tag):
    return ("recv", peer, tag)


def _send(peer, tag):
    return ("send", peer, tag)


@pytest.mark.parametrize("chained", (False, True), ids=("gloo-order", "nccl-order"))
def test_allscan_post_order(pools, chained):
    """Middle rank of 3, K = 4 slices (tags 1000 + piece·4 + slice). gloo: every receive up
    front, then the sends. NCCL (one stream per group, run in posting order): slice j's send
    in one batch with slice j+1's receive, so slice j leaves while slice j+1 arrives; posting
    the receives first would hold the send of slice 0 until the whole state had arrived."""
    batches = pools(3).run(linear_cases.scan_post_batches, "allscan", "contiguous", chained)
    recvs = [_recv(0, 1004 + j) for j in range(4)]
    sends = [_send(2, 1008 + j) for j in range(4)]
    if chained:
        expected = [[recvs[0]], *([sends[j], recvs[j + 1]] for j in range(3)), [sends[3]]]
    else:
        expected = [[r] for r in recvs] + [[s] for s in sends]
    assert batches[1]["forward"] == expected, batches[1]
    # the head only sends, the tail only receives, one slice per batch, in either order
    assert batches[0]["forward"] == [[_send(1, 1004 + j)] for j in range(4)], batches[0]
    assert batches[2]["forward"] == [[_recv(1, 1008 + j)] for j in range(4)], batches[2]


@pytest.mark.parametrize("chained", (False, True), ids=("gloo-order", "nccl-order"))
def test_zigzag_chain_post_order(pools, chained):
    """Linear ring, zigzag, P = 3: the chain runs 0 -> 1 -> 2 -> 2 -> 1 -> 0. In NCCL order a
    rank never posts a receive ahead of a send the receive depends on: rank 0 receiving its
    return piece from rank 1 before sending rank 1 its first state would never complete."""
    batches = pools(3).run(linear_cases.scan_post_batches, "ring", "zigzag", chained)
    if chained:
        expected = [
            [[_send(1, 1001)], [_recv(1, 1005)]],
            [[_recv(0, 1001)], [_send(2, 1002)], [_recv(2, 1004)], [_send(0, 1005)]],
            [[_recv(1, 1002)], [_send(1, 1004)]],
        ]
    else:
        expected = [
            [[_recv(1, 1005)], [_send(1, 1001)]],
            [[_recv(0, 1001)], [_recv(2, 1004)], [_send(2, 1002)], [_send(0, 1005)]],
            [[_recv(1, 1002)], [_send(1, 1004)]],
        ]
    for rank, got in enumerate(batches):
        assert got["forward"] == expected[rank] and got["backward"] == expected[rank], got


@pytest.mark.parametrize("strategy, layout", [("allscan", "contiguous"), ("ring", "zigzag"),
                                              ("ring", "contiguous")])  # fmt: skip
def test_nccl_post_order_computes_the_same(pools, strategy, layout):
    assert all(pools(3).run(linear_cases.scan_orders_agree, strategy, layout))
