"""Layout index maps (property-based) and shard/gather round trips across ranks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cases
from distseq.layout import LAYOUTS, ShardLayout, chunks_per_rank, cu_seqlens


def test_cu_seqlens_are_int32_boundaries():
    cu = cu_seqlens([3, 0, 5])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 8]
    assert cu_seqlens([]).tolist() == [0]
    assert cu_seqlens((4,), device="meta").device.type == "meta"


@st.composite
def sharded_documents(draw):
    world = draw(st.integers(1, 6))
    layout = draw(st.sampled_from(LAYOUTS))
    parts = world * chunks_per_rank(layout)
    docs = draw(st.lists(st.integers(0, 5), min_size=1, max_size=5))
    return [parts * n for n in docs], world, layout


@settings(max_examples=200, deadline=None)
@given(sharded_documents())
def test_shards_partition_every_document(args):
    docs, world, layout = args
    shards = [ShardLayout(tuple(docs), world, r, layout) for r in range(world)]
    everything = torch.cat([s.positions for s in shards])
    assert torch.equal(everything.sort().values, torch.arange(sum(docs)))
    starts = cu_seqlens(docs).long()
    for rank, shard in enumerate(shards):
        positions = shard.positions
        assert positions.numel() == shard.local_length == sum(docs) // world
        # Local order is increasing inside every document (causal masks stay local-causal).
        doc_of = torch.searchsorted(starts[1:], positions, right=True)
        for d in doc_of.unique():
            inside = positions[doc_of == d]
            assert torch.all(inside[1:] > inside[:-1])
            chunk = docs[d] // (world * chunks_per_rank(layout))
            chunk_ids = ((inside - starts[d]) // chunk).unique().tolist()
            expected = [rank] if layout == "contiguous" else sorted({rank, 2 * world - 1 - rank})
            assert chunk_ids == expected
        cu = shard.local_cu_seqlens()
        assert cu[-1].item() == shard.local_length
        # all_positions is rank-major: rank r's shard is its r-th slice.
        n = shard.local_length
        assert torch.equal(shard.all_positions[rank * n : (rank + 1) * n], positions)


@st.composite
def round_trip_cases(draw, world):
    layout = draw(st.sampled_from(LAYOUTS))
    parts = world * chunks_per_rank(layout)
    if draw(st.booleans()):
        spec = [parts * n for n in draw(st.lists(st.integers(0, 3), min_size=1, max_size=4))]
        if sum(spec) == 0:
            spec[0] = parts
    else:
        spec = parts * draw(st.integers(1, 4))
    dim = 1 if isinstance(spec, list) else draw(st.integers(0, 3))
    return spec, layout, dim


@pytest.mark.parametrize("world", (2, 3, 4))
def test_shard_gather_round_trip(pools, world):
    # One pool call carries many hypothesis-drawn cases (a pool call per example would be slow).
    @settings(max_examples=1, deadline=None, database=None)
    @given(st.lists(round_trip_cases(world), min_size=30, max_size=30))
    def check(batch):
        assert pools(world).run(cases.shard_gather_round_trip, batch) == [30] * world

    check()
