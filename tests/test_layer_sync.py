"""A model's layers make no per-layer agreement: the batch is agreed on once, when its
:class:`distseq.models.SequenceContext` is built, and each layer then launches only its
strategy's own exchanges (issue 13, part 3)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

import sync_cases
from distseq.models import SequenceContext

SOFTMAX = ["softmax"] * 4
HYBRID = ["linear", "softmax", "linear", "softmax"]
GDN = ["gdn", "softmax", "gdn", "softmax"]


P2P, GATHER, A2A = "batch_isend_irecv", "all_gather_single", "all_to_all_single"
ENTRY_POINTS = {"softmax": 1, "linear": 1, "gdn": 2}  # distseq calls per layer forward
RING = {P2P: (1, 2)}  # ring at P = 2: one K/V post forward; a K/V and a dK/dV post backward
ULYSSES = {A2A: (2, 2)}  # sequence -> heads and back, each pass (usp 2x1 is the same)


@pytest.mark.parametrize(
    "mixers, strategies, per_layer",
    [
        (SOFTMAX, {"attention_strategy": "ring"}, {"softmax": RING}),
        (SOFTMAX, {"attention_strategy": "ulysses"}, {"softmax": ULYSSES}),
        (HYBRID, {"layout": "contiguous", "attention_strategy": "usp", "ulysses_degree": 2},
         {"softmax": ULYSSES, "linear": {GATHER: (1, 1)}}),
        # allscan at P = 2, Dk = 8: K = 4 slices, one post each, per direction
        (HYBRID, {"layout": "contiguous", "linear_strategy": "allscan"},
         {"softmax": RING, "linear": {P2P: (4, 4)}}),
        # Gated DeltaNet: the conv's halo (one post each way) and lasp2's one all-gather
        (GDN, {"linear_strategy": "lasp2"},
         {"softmax": RING, "gdn": {P2P: (1, 1), GATHER: (1, 1)}}),
    ],
)  # fmt: skip
def test_four_layers_with_checkpointing_agree_once(pools, mixers, strategies, per_layer):
    """4 layers at sp=2, activation checkpointing, forward + backward: every layer's forward
    runs twice (recomputation), so the data calls are ``2·forward + backward`` per layer,
    and there is exactly one agreement (the context's), not one per layer call."""
    expected = Counter()
    for mixer in mixers:
        for op, (forward, backward) in per_layer[mixer].items():
            expected[op] += 2 * forward + backward
    agreed = pools(2).run(sync_cases.model_step_calls, mixers, strategies, True)
    checked = pools(2).run(sync_cases.model_step_calls, mixers, strategies, False)
    for a, c in zip(agreed, checked):
        assert a["calls"] == dict(expected), a["calls"]
        assert a["control"] == 1, a
        # a context without the token: the same data calls plus one agreement per
        # entry-point call of each layer forward (gdn makes two: conv and delta rule), and
        # the build's
        checks = sum(2 * ENTRY_POINTS[mixer] for mixer in mixers)
        assert c["calls"] == a["calls"] and c["control"] == 1 + checks, c
        # and the same numbers, bit for bit
        assert a["loss"] == c["loss"] and torch.equal(a["grads"], c["grads"])


USP_2X2 = {"attention_strategy": "usp", "ulysses_degree": 2}
# A known gap: the torch attention backend reads cu_seqlens back to split its segments
# (attention_torch._segments), a host sync where it runs on a GPU (float32).
READS_CU_SEQLENS = {"attention"}


@pytest.mark.parametrize(
    "world, heads, layer, strategies, forward, backward",
    [
        (2, 2, "attention", {"attention_strategy": "ring"}, {P2P: 1}, {P2P: 2}),
        (2, 2, "attention", {"attention_strategy": "ulysses"}, {A2A: 2}, {A2A: 2}),
        (4, 4, "attention", {"attention_strategy": "ulysses"}, {A2A: 2}, {A2A: 2}),
        # usp 2x2: the all-to-alls inside the Ulysses pair are point-to-point (a strided
        # sub-group); between them the ring of two posts once forward, twice backward
        (4, 4, "attention", USP_2X2, {P2P: 1 + 1 + 1}, {P2P: 1 + 2 + 1}),
        (2, 2, "linear_attention", {"linear_strategy": "lasp2"}, {GATHER: 1}, {GATHER: 1}),
        (2, 2, "linear_attention", {"linear_strategy": "allscan", "layout": "contiguous"},
         {P2P: 4}, {P2P: 4}),
        (2, 2, "conv", {}, {P2P: 1}, {P2P: 1}),  # the halo
    ],
)  # fmt: skip
def test_agreed_layer_launches_only_its_exchange(
    pools, world, heads, layer, strategies, forward, backward
):
    for calls in pools(world).run(sync_cases.layer_calls, layer, strategies, heads):
        assert calls == {"forward": forward, "backward": backward, "control": 0}, calls


@pytest.mark.parametrize(
    "world, heads, layer, strategies",
    [
        (2, 2, "attention", {"attention_strategy": "ring"}),
        (2, 2, "attention", {"attention_strategy": "allgather"}),
        (2, 2, "attention", {"attention_strategy": "ulysses"}),
        (4, 4, "attention", {"attention_strategy": "ulysses", "layout": "contiguous"}),
        (4, 4, "attention", USP_2X2),
        (4, 4, "attention", {**USP_2X2, "layout": "contiguous"}),
        (2, 2, "linear_attention", {"linear_strategy": "lasp2"}),
        (2, 2, "linear_attention", {"linear_strategy": "allscan", "layout": "contiguous"}),
        (2, 2, "delta_rule", {"linear_strategy": "lasp2"}),
        (2, 2, "delta_rule", {"linear_strategy": "ring", "layout": "contiguous"}),
    ],
)  # fmt: skip
def test_layer_copies_to_the_device_only_once(pools, world, heads, layer, strategies):
    """A layer's index and boundary tensors reach the device on its first call, and a later
    layer on the same batch makes no host-to-device copy (each would stall a GPU's stream);
    no call reads a tensor back to the host (a sync). On CPU the copies are no-ops, so the
    calls that would make them are counted."""
    runs = pools(world).run(sync_cases.layer_host_copies, layer, strategies, heads)
    for first, second, *reads in runs:
        assert first, "the counter saw no copy of the cold first call"
        assert second == [], second
        assert (reads == [[], []]) != (layer in READS_CU_SEQLENS), reads


def test_disagreeing_batch_raises_on_every_rank(pools):
    for message in pools(2).run(sync_cases.disagreeing_batch):
        assert "ranks disagree on document lengths" in message, message


def test_layer_with_a_foreign_shard_raises(pools):
    for message in pools(2).run(sync_cases.wrong_layer_shape):
        assert "the agreed batch is 1 x 20" in message, message


def test_context_cannot_drift_from_what_was_agreed():
    """A copy with another strategy must not run under the old agreement (silently)."""
    ctx = SequenceContext.build((8, 8))
    with pytest.raises(ValueError, match="differs from what its ranks agreed on"):
        dataclasses.replace(ctx, attention_strategy="ulysses")
    assert dataclasses.replace(ctx, attention_strategy="ulysses", agreed=None).agreed is None
