"""The sharded engine's gradient buckets (:mod:`distseq.train.zero_buckets`): the bucket
plan, and stage 2's reduce-scatter during the backward staying matched and exact when ranks
reach the parameters in different orders, skip some, or are idle."""

from __future__ import annotations

import pytest

import zero_cases
from distseq.train.zero_buckets import plan_buckets


def test_buckets_run_backwards_within_the_target():
    buckets = plan_buckets([10, 4, 4, 30, 3], world=4, target=8)
    assert [b.params for b in buckets] == [(4,), (3,), (2, 1), (0,)]  # 30 > 8: alone
    assert [b.numel for b in buckets] == [3, 30, 8, 10]
    assert [b.shard for b in buckets] == [1, 8, 2, 3]
    assert [b.offset for b in buckets] == [0, 1, 9, 11]
    assert len(plan_buckets([10, 4, 4, 30, 3], world=4, target=1e9)) == 1
    with pytest.raises(ValueError, match="positive"):
        plan_buckets([1], world=2, target=0)


@pytest.mark.parametrize(("stage", "bucket_mb"), [(2, 1e-3), (2, 25.0), (1, 1e-3)])
def test_gradients_exact_with_any_order_unused_and_idle(pools, stage, bucket_mb):
    """3 ranks, two micro-steps: rank 1 reaches the layers in reverse and skips one, rank 2
    is idle then uses two; every gradient equals the mean of plain autograd's."""
    results = pools(3).run(zero_cases.bucketed_gradients_match, stage, bucket_mb, timeout=120)
    for result in results:
        assert result["worst"] < 1e-6, result
        assert result["freed"], "stage 2 left .grad after a micro-step"
    expected = 1 if bucket_mb > 1 else zero_cases.LAYERS * 2
    assert results[0]["buckets"] == expected  # 1e-3 MiB: weight and bias in separate buckets


def test_a_second_backward_in_a_micro_step_is_refused(pools):
    for message in pools(2).run(zero_cases.second_backward_is_refused, timeout=120):
        assert "after its bucket was reduce-scattered" in message, message
