"""Bad inputs raise ValueError naming the value and the fix, on every rank, and never hang."""

from __future__ import annotations

import pytest
import torch

import cases
import distseq

# kind -> words the error message must contain
ALL_RANKS_BAD = {
    "zigzag_odd_length": ["length", "not divisible by", "zigzag", "pad"],
    "varlen_not_divisible": ["document 0", "length 1", "not divisible"],
    "cu_seqlens_wrong_total": ["cu_seqlens ends at", "global"],
    "gqa_heads": ["3 query heads", "2 key/value heads"],
    "ulysses_heads": ["ulysses", "not divisible by the group size"],
    "usp_degree_not_dividing_world": ["usp: ulysses_degree=4", "group size", "use one of [1"],
    "usp_degree_not_dividing_heads": ["usp: ulysses_degree=", "query heads", "use one of [1]"],
    "usp_degree_zero": ["usp: ulysses_degree=0", "positive integer"],
    "ulysses_degree_without_usp": ["ulysses_degree=1 applies to strategy 'usp' only", "'ring'"],
    "unknown_strategy": ["unknown attention strategy 'ringg'", "ring"],
    "unknown_backend": ["unknown backend 'cudnn'", "auto"],
    "unknown_layout": ["unknown layout 'striped'", "zigzag"],
    "flash_on_cpu": ["backend 'flash' cannot run", "auto"],
    "dtype_mismatch": ["dtypes differ", "cast"],
    "device_mismatch": ["different devices", "move"],
}


@pytest.mark.parametrize("world", (2, 3))
@pytest.mark.parametrize("kind", sorted(ALL_RANKS_BAD))
def test_bad_input_raises_on_every_rank(pools, kind, world):
    outcomes = pools(world).run_raw(cases.bad_attention_call, kind, timeout=60)
    for outcome in outcomes:
        assert not outcome.ok, f"rank {outcome.rank} accepted {kind}"
        assert outcome.error_type == "ValueError", outcome.traceback
        for word in ALL_RANKS_BAD[kind]:
            assert word in outcome.message, f"{word!r} not in {outcome.message!r}"


@pytest.mark.parametrize(
    "kind, local_words",
    [("one_rank_dtype", "dtypes differ"), ("one_rank_length", "length 6")],
)
def test_one_bad_rank_makes_all_raise_without_hang(pools, kind, local_words):
    """A defect on one rank only: it raises its own error, the others name it; no hang."""
    world = 3
    outcomes = pools(world).run_raw(cases.bad_attention_call, kind, timeout=60)
    assert all(not o.ok and o.error_type == "ValueError" for o in outcomes), outcomes
    messages = [o.message for o in outcomes]
    if kind == "one_rank_dtype":
        assert local_words in messages[-1]
        assert all(f"rank(s) [{world - 1}]" in m for m in messages[:-1]), messages
    else:
        # Local length 6 is valid on its own; the ranks disagree on the shape.
        assert all("disagree on local sequence length" in m for m in messages), messages


def test_rank_outside_group_raises(pools):
    outcomes = pools(2).run_raw(cases.bad_attention_call, "not_in_group", timeout=60)
    assert outcomes[0].ok and outcomes[0].value == "skipped"
    assert not outcomes[1].ok and outcomes[1].error_type == "ValueError"
    assert "not a member" in outcomes[1].message


def test_shard_sequence_rejects_indivisible_length():
    x = torch.zeros(1, 9, 2, 4)
    with pytest.raises(ValueError, match="length 9 is not divisible by 2"):
        distseq.shard_sequence(x, layout="zigzag")  # one process: zigzag needs 2 chunks


def test_shard_sequence_rejects_bad_dim():
    with pytest.raises(ValueError, match="dim 5 is out of range"):
        distseq.shard_sequence(torch.zeros(2, 4), dim=5)
