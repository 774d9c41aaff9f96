"""distseq.comm.run_ranks: every rank's result in rank order, a rank's exception raised here."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distseq.comm import run_ranks


def _sum_of_ranks(rank: int, world: int, label: str) -> tuple:
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    return rank, world, label, total.item(), torch.get_num_threads()


def _fail_on_rank_one(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("bad input on rank 1")
    return rank


def test_results_come_back_in_rank_order():
    got = run_ranks(3, _sum_of_ranks, "x", threads=2, timeout=120)
    assert got == [(r, 3, "x", 3.0, 2) for r in range(3)]


def test_a_rank_error_is_raised_with_its_traceback():
    with pytest.raises(RuntimeError, match="(?s)rank 1.*ValueError: bad input on rank 1"):
        run_ranks(2, _fail_on_rank_one, timeout=120)


@pytest.mark.parametrize(("world", "backend"), [(0, "gloo"), (2, "mpi")])
def test_bad_arguments(world, backend):
    with pytest.raises(ValueError, match="world >= 1|unknown backend"):
        run_ranks(world, _fail_on_rank_one, backend=backend)
