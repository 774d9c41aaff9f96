"""``planner: adaptive`` training: a step planned over SP groups of different sizes and
strategies (the solver's plans, and fixed plans covering every strategy, idle ranks and
micro-steps) gives the loss and gradients of one process training on the same batch."""

from __future__ import annotations

import re

import pytest
import torch

import adaptive_cases
import train_cases
from distseq.planner import GroupPlan
from distseq.train.adaptive import check_plan, group_layout
from test_train_e2e import STEPS, assert_same

# Documents of 24..320 tokens; 4 MiB per rank holds about 200 tokens on one rank of the tiny
# model without the memory savers (per-token float32 logits), so the solver must put the long
# documents on groups of 2 or 4 ranks.
MIXED = [
    "data.seq_len=320", "data.recall.max_len=320", "data.recall.min_len=24",
    "train.global_batch=3", f"train.steps={STEPS}", "train.lr=2e-5",
    "memory.loss_chunk_tokens=0", "memory.mlp_tiles=1",
]  # fmt: skip
TIGHT = ["adaptive.memory=4MiB"]


def run(pools, world, overrides, steps=None):
    return pools(world).run(adaptive_cases.adaptive_run, overrides, steps, timeout=300)[0]


@pytest.fixture(scope="module")
def reference(pools, tmp_path_factory):
    """One process, default memory: every document on the single rank."""
    out = tmp_path_factory.mktemp("adaptive-ref")
    cache = {}

    def get(overrides):
        key = tuple(overrides)
        if key not in cache:
            cache[key] = run(pools, 1, [*MIXED, *overrides, f"out_dir={out}/{len(cache)}"])
            groups = {r["plan_groups"] for r in cache[key]["history"]}
            assert all(g.startswith("1:") and " " not in g for g in groups), groups  # one group
        return cache[key]

    return get


@pytest.mark.parametrize("world", (4, 3))
def test_solver_plans_match_one_process(pools, reference, tmp_path, world):
    got = run(pools, world, [*MIXED, *TIGHT, f"out_dir={tmp_path}"])
    degrees = {
        int(g.split(":")[0])
        for r in got["history"]
        for step in r["plan_groups"].split(" | ")
        for g in step.split()
    }
    assert max(degrees) > 1 and min(degrees) == 1, got["history"]  # mixed groups were used
    assert got["prefetched"] == STEPS - 1  # steps 2.. were solved while the previous one ran
    assert_same(got, reference([]), f"adaptive solver plans on {world} ranks")


SOFTMAX = {"softmax": "ring"}
FIXED = {
    "softmax": (
        [],
        [
            [((0, 1), {"softmax": "ring"}), ((2, 3), {"softmax": "ulysses"})],
            [((0, 1, 2, 3), {"softmax": "allgather"})],
            [((2,), {"softmax": "ring"})],  # ranks 0, 1, 3 idle
        ],
    ),
    "linear": (
        ["model.mixers=linear"],
        [
            [((0, 1), {"linear": "lasp2"}), ((2, 3), {"linear": "allscan"})],
            [((0, 1, 2, 3), {"linear": "ring"})],
        ],
    ),
    "hybrid": (
        ["model.mixers=hybrid", "model.n_layers=4", "model.hybrid_ratio=1:1"],
        [
            # usp as plans name it, with its Ulysses degree: 2 x 2
            [((0, 1, 2, 3), {"softmax": "usp:2", "linear": "allscan"})],
            [((0, 1), {"softmax": "ulysses", "linear": "lasp2"}), ((3,), SOFTMAX)],
        ],
    ),
    "gdn": (
        ["model.mixers=[gdn,softmax]"],
        [
            [
                ((0, 1), {"softmax": "ring", "gdn": "lasp2"}),
                ((2, 3), {"softmax": "ulysses", "gdn": "allscan"}),
            ],
            [((0, 1, 2, 3), {"softmax": "allgather", "gdn": "ring"})],
        ],  # fmt: skip
    ),
}


# The data-gate gradients of linear layers are ~1e3 times smaller than the others and sums
# over every token with cancellation: after step 1 they differ by 5e-6 relative (hybrid) and
# Adam's sign-like updates let that grow to ~1.2e-5 by step 3.
GATE_TOL = 3e-5


@pytest.mark.parametrize("name", FIXED)
def test_fixed_plans_every_strategy_match_one_process(pools, reference, tmp_path, name):
    overrides, steps = FIXED[name]
    got = run(pools, 4, [*MIXED, *overrides, f"out_dir={tmp_path}"], steps)
    assert_same(got, reference(overrides), f"fixed adaptive plan, {name}", GATE_TOL)


def test_three_ranks_fixed_plan(pools, reference, tmp_path):
    steps = [[((0, 1), {"softmax": "allgather"}), ((2,), SOFTMAX)]]
    assert_same(run(pools, 3, [*MIXED, f"out_dir={tmp_path}"], steps), reference([]), "3 ranks")


# Micro-steps mixing degrees, each leaving ranks idle (a rank idle in a micro-step still
# joins stage 2's reduce-scatter of it).
SHARDED = {
    3: [[((0, 1), {"softmax": "allgather"}), ((2,), SOFTMAX)], [((1,), SOFTMAX)]],
    4: FIXED["softmax"][1],
}


BUCKETS = ["adaptive.zero_bucket_mb=0.02"]


# Every stage on 3 and 4 ranks; the default run keeps one case per stage (``-m slow``: all).
@pytest.mark.parametrize(
    ("world", "stage"),
    [
        (3, 2),
        (4, 1),
        (4, 3),
        *(pytest.param(w, st, marks=pytest.mark.slow) for w, st in [(4, 2), (3, 1), (3, 3)]),
    ],
)
def test_sharded_states_match_one_process(pools, reference, tmp_path, world, stage):
    """ZeRO stage 1/2 (:mod:`distseq.train.zero`) and 3 (FSDP2, idle ranks running a dummy
    micro-batch) over all ranks: losses and every gradient (gathered from the shards) equal
    one process training on the same batches. Buckets of 0.02 MiB (several per block), which
    stage 2 reduce-scatters during the backward."""
    overrides = [*MIXED, f"adaptive.zero_stage={stage}", f"out_dir={tmp_path}", *BUCKETS]
    got = run(pools, world, overrides, SHARDED[world])
    if stage == 3:
        assert got["engine"] == "AdaptiveFSDPEngine"
        # FSDP shards each tensor's first dimension: about 1/world, padding included
        assert got["adam_elements"] < 1.5 * got["parameters"] / world
    else:
        assert got["engine"] == "ShardedEngine"
        assert got["buckets"] > 4
        # a 1/world shard of every bucket (each padded to a multiple of world)
        assert 0 <= got["adam_elements"] - got["parameters"] / world < got["buckets"]
    assert_same(got, reference([]), f"zero stage {stage} on {world} ranks")


@pytest.mark.parametrize("stage", [2, 3])
def test_idle_rank_with_a_hybrid_model(pools, reference, tmp_path, stage):
    """Linear and softmax layers, rank 2 idle in the second micro-step. Stage 3: the idle
    rank's dummy micro-batch (8 tokens on a one-rank group) runs through every mixer; stage
    2: buckets (several per block) posted during the backwards of the groups and by the idle
    rank after it. Every gradient stays exact."""
    overrides, steps = FIXED["hybrid"]
    extra = [f"adaptive.zero_stage={stage}", f"out_dir={tmp_path}", *BUCKETS]
    got = run(pools, 4, [*MIXED, *overrides, *extra], steps)
    assert_same(got, reference(overrides), f"zero stage {stage}, hybrid", GATE_TOL)


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_sharded_states_resume_reproduces_the_run(pools, tmp_path, stage):
    common = [*MIXED, f"adaptive.zero_stage={stage}", "train.steps=4", f"out_dir={tmp_path}",
              "checkpoint.every=2", *BUCKETS]  # fmt: skip
    steps = SHARDED[3]
    full = run(pools, 3, common, steps)
    resumed = run(pools, 3, [*common, f"checkpoint.resume={tmp_path}/checkpoints/step_2"], steps)
    assert [r["step"] for r in resumed["history"]] == [3, 4]
    assert resumed["losses"] == pytest.approx(full["losses"][2:], rel=1e-6)
    for name, grad in full["grads"].items():
        assert torch.allclose(resumed["grads"][name], grad, rtol=1e-6, atol=0), name
    if stage == 2:  # each rank's shard is its piece of every bucket: other buckets, other shards
        other = [*common, "planner=adaptive", "adaptive.zero_bucket_mb=0.05",
                 f"checkpoint.resume={tmp_path}/checkpoints/step_2"]  # fmt: skip
        for message in pools(3).run(train_cases.resume_error, other, timeout=300):
            assert "adaptive.zero_bucket_mb" in message, message


def test_resume_reproduces_adaptive_losses(pools, tmp_path):
    common = [*MIXED, *TIGHT, "train.steps=4", f"out_dir={tmp_path}", "checkpoint.every=2"]
    full = run(pools, 2, common)
    resumed = run(pools, 2, [*common, f"checkpoint.resume={tmp_path}/checkpoints/step_2"])
    assert [r["step"] for r in resumed["history"]] == [3, 4]
    assert resumed["losses"] == pytest.approx(full["losses"][2:], rel=1e-6)
    assert [r["plan_groups"] for r in resumed["history"]] == [
        r["plan_groups"] for r in full["history"][2:]
    ]


def test_sequence_that_fits_nowhere_is_refused_on_every_rank(pools, tmp_path):
    outcomes = pools(2).run_raw(
        adaptive_cases.adaptive_run, [*MIXED, "adaptive.memory=2MiB", f"out_dir={tmp_path}"]
    )
    assert all(not o.ok and o.error_type == "ValueError" for o in outcomes), outcomes
    assert all("fits no group" in o.message for o in outcomes), outcomes[0].message


@pytest.mark.parametrize(
    ("override", "key"),
    (
        ("parallel.engine=fsdp", "parallel.engine"),
        ("parallel.dp=2", "parallel.dp"),
        ("adaptive.profile=nope", "adaptive.profile"),
        ("adaptive.memory=lots", "adaptive.memory"),
        ("adaptive.gpus_per_node=3", "adaptive.gpus_per_node"),
        ("adaptive.zero_stage=4", "adaptive.zero_stage"),
        ("adaptive.zero_bucket_mb=0", "adaptive.zero_bucket_mb"),
    ),
)
def test_bad_adaptive_config_names_key(override, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        train_cases.build_config(["planner=adaptive", override], 4)


def test_a_plan_that_drops_or_repeats_work_is_refused():
    steps = [[((0, 1), {"softmax": "ring"}), ((2,), SOFTMAX)]]
    good = adaptive_cases.fixed_plan(steps, 4, [30, 40, 50])
    check_plan(good, [30, 40, 50], 4)
    with pytest.raises(RuntimeError, match="covers documents"):
        check_plan(good, [30, 40, 50, 60], 4)  # document 3 is in no group
    with pytest.raises(RuntimeError, match="ranks"):
        check_plan(good, [30, 40, 50], 2)  # rank 2 does not exist


def test_group_layout_follows_the_strategies():
    def group(ranks, strategies):
        return GroupPlan(ranks, "", strategies, (0,), 1, 0.0, 0.0)

    assert group_layout(group((0, 1), {"softmax": "ring", "linear": "lasp2"})) == "zigzag"
    assert group_layout(group((0, 1), {"softmax": "ring", "linear": "allscan"})) == "contiguous"
    assert group_layout(group((3,), {"softmax": "ring"})) == "contiguous"
