"""Bad inputs to linear_attention / causal_conv1d raise ValueError on every rank, no hang."""

from __future__ import annotations

import pytest

import linear_cases

ALL_RANKS_BAD = {
    "unknown_strategy": ["unknown linear attention strategy 'lasp3'", "lasp2"],
    "allscan_zigzag": ["allscan needs layout='contiguous'", "lasp2"],
    "unknown_backend": ["unknown backend 'cuda_magic'", "auto"],
    "qk_shape": ["q and k must have the same shape"],
    "v_heads": ["v the same batch, sequence and heads"],
    "dtype_mismatch": ["dtypes differ", "cast"],
    "not_divisible": ["not divisible by", "pad"],
    "log_decay_shape": ["log_decay has shape (1, 8, 3)", "[batch, seq, heads]"],
    "log_decay_positive": ["log_decay must be finite and <= 0"],
    "initial_state_shape": ["initial_state has shape (2, 2, 4, 4)", "(1, 2, 4, 4)"],
    "conv_weight_shape": ["weight has shape (4, 3)", "channels=3"],
    "conv_short_piece": ["fewer than kernel_size - 1 = 3"],
    "conv_activation": ["unknown activation 'relu'"],
}


@pytest.mark.parametrize("kind", sorted(ALL_RANKS_BAD))
def test_bad_input_raises_on_every_rank(pools, kind):
    outcomes = pools(2).run_raw(linear_cases.bad_linear_call, kind, timeout=60)
    for outcome in outcomes:
        assert not outcome.ok, f"rank {outcome.rank} accepted {kind}"
        assert outcome.error_type == "ValueError", outcome.traceback
        for word in ALL_RANKS_BAD[kind]:
            assert word in outcome.message, f"{word!r} not in {outcome.message!r}"


def test_one_bad_rank_makes_all_raise_without_hang(pools):
    world = 3
    outcomes = pools(world).run_raw(linear_cases.bad_linear_call, "one_rank_log_decay", timeout=60)
    assert all(not o.ok and o.error_type == "ValueError" for o in outcomes), outcomes
    assert "log_decay must be" in outcomes[-1].message
    assert all(f"rank(s) [{world - 1}]" in o.message for o in outcomes[:-1]), outcomes
