"""Shared fixtures: one lazily started :class:`DistributedPool` per world size."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Triton kernels run on CPU tensors only under its interpreter, which must be chosen before
# the kernel modules are imported (here and in the spawned gloo workers, which inherit it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

from dist_pool import DistributedPool  # noqa: E402


class _Pools:
    def __init__(self) -> None:
        self._pools: dict[int, DistributedPool] = {}

    def __call__(self, world_size: int) -> DistributedPool:
        pool = self._pools.get(world_size)
        if pool is None or not pool.alive:
            pool = self._pools[world_size] = DistributedPool(world_size)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


@pytest.fixture(scope="session")
def pools():
    """``pools(P)`` returns a pool of ``P`` gloo ranks, reused across the session."""
    registry = _Pools()
    yield registry
    registry.close()
