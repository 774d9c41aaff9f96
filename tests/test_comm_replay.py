"""Communication replay (distseq.comm.CommRecorder): a replayed step reproduces the recorded
one bit for bit without a single call into torch.distributed."""

from __future__ import annotations

import math

import pytest

import replay_cases
from distseq.comm import hidden_comm_fraction

CASES = [("ring", "softmax"), ("ulysses", "softmax"), ("allgather", "softmax"),
         ("lasp2", "linear"), ("allscan", "linear")]  # fmt: skip


@pytest.mark.parametrize("strategy,kind", CASES)
def test_replay_is_bit_identical_and_silent(pools, strategy, kind):
    results = pools(2).run(replay_cases.record_then_replay, strategy, kind)
    for rank, res in enumerate(results):
        assert res["identical"], f"rank {rank}: replayed outputs/grads differ"
        assert res["ops"] > 0 and res["real_calls"] >= res["ops"], res
        assert res["replay_calls"] == 0, f"rank {rank}: replay called torch.distributed"
        assert res["t_alone"] > 0


def test_replaying_a_different_step_raises(pools):
    messages = pools(2).run(replay_cases.replay_other_step)
    assert all("replay: op" in m for m in messages), messages


def test_hidden_fraction_definition():
    assert hidden_comm_fraction(t_real=1.0, t_replay=1.0, t_comm=0.5) == 1.0
    assert hidden_comm_fraction(t_real=1.5, t_replay=1.0, t_comm=0.5) == 0.0
    assert hidden_comm_fraction(t_real=1.25, t_replay=1.0, t_comm=0.5) == 0.5
    assert math.isnan(hidden_comm_fraction(1.0, 1.0, 0.0))
