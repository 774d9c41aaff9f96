"""usp's single-process pieces: the layout identity it rests on, its default degree, and the
strided sub-groups it communicates through (the distributed cases are in test_attention.py,
test_comm_bytes.py and test_errors.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from distseq.comm import GroupInfo, all_reduce_sum, all_to_all
from distseq.layout import LAYOUTS, shard_layout
from distseq.strategies.usp import (
    _ring_order,
    planned_name,
    resolve_ulysses_degree,
    split_planned,
)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world, ulysses", [(4, 2), (6, 2), (6, 3), (8, 4), (8, 2), (4, 4)])
def test_ulysses_group_shards_are_one_ring_level_shard(layout, world, ulysses):
    """The shards of ranks j·u .. j·u+u-1 (P-rank layout) are ring position j's shard of the
    same layout over P/u ranks, per document; the permutation puts them in its order."""
    docs = (4 * world, 2 * world, 6 * world)
    for rank in range(world):
        shard = shard_layout(docs, world, rank, layout)
        j = rank // ulysses
        gathered = torch.cat([shard.positions_of(j * ulysses + t) for t in range(ulysses)])
        ring = shard_layout(docs, world // ulysses, j, layout).positions
        assert sorted(gathered.tolist()) == sorted(ring.tolist())
        order, inverse = _ring_order(shard, ulysses, torch.device("cpu"))
        if order is None:  # contiguous: consecutive ranks' chunks already are in order
            assert layout == "contiguous" and torch.equal(gathered, ring)
            continue
        assert torch.equal(gathered[order], ring)
        assert torch.equal(gathered[order][inverse], gathered)


def test_default_degree_stays_inside_a_node(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resolve_ulysses_degree(64, 32, None) == 8
    assert resolve_ulysses_degree(64, 12, None) == 4  # the largest divisor of P and Hq <= 8
    assert resolve_ulysses_degree(4, 6, None) == 2
    assert resolve_ulysses_degree(64, 32, 2) == 2  # given: kept (check_group validates it)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_ulysses_degree(8, 32, None) == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    if not torch.cuda.is_available():  # CPU processes of one machine: no node limit
        assert resolve_ulysses_degree(8, 32, None) == 8


def test_planned_names_round_trip():
    assert split_planned(planned_name(4)) == ("usp", 4)
    assert split_planned("ring") == ("ring", None)


def test_strided_subgroup_maps_ranks_and_refuses_collectives():
    parent = GroupInfo(None, 5, 8)
    ring = parent.subgroup(tuple(range(1, 8, 2)))  # ranks 1, 3, 5, 7
    assert (ring.rank, ring.world_size) == (2, 4)
    assert [ring.global_rank(r) for r in range(4)] == [1, 3, 5, 7]
    with pytest.raises(ValueError, match="strided sub-group"):
        all_reduce_sum(torch.ones(2), ring)
    with pytest.raises(ValueError, match="sub-group of a sub-group"):
        ring.subgroup((0, 1))
    one = parent.subgroup((5,))
    x = torch.arange(3.0).unsqueeze(0)
    assert torch.equal(all_to_all(x, one), x)  # one rank: nothing to exchange


def test_degree_one_needs_no_permutation():
    """u = 1: each rank is its own Ulysses group and ring position (plain ring)."""
    for layout, world in itertools.product(LAYOUTS, (2, 4)):
        shard = shard_layout((4 * world,), world, 0, layout)
        assert _ring_order(shard, 1, torch.device("cpu")) == (None, None)
