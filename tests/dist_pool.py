"""A pool of long-lived gloo worker processes, so each distributed test case costs milliseconds.

``pool.run(fn, *args)`` calls ``fn(rank, world_size, *args)`` on every rank (``fn`` must be a
module-level function) and returns the per-rank results; an exception on any rank fails the
call with the rank's traceback. ``pool.run_raw`` returns :class:`Outcome` objects instead, for
tests that expect errors. A call that does not finish in ``timeout`` seconds kills the pool
(a hang is a test failure, never a stuck suite).
"""

from __future__ import annotations

import os
import queue
import tempfile
from typing import Any

import torch.multiprocessing as mp

from distseq.comm.launch import Outcome, call_rank, init_rank


class PoolHang(AssertionError):
    """Raised when the ranks did not all answer in time."""


def _worker(rank: int, world_size: int, init_file: str, tasks, results) -> None:
    import torch.distributed as dist

    init_rank(rank, world_size, init_file)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        results.put(call_rank(fn, rank, world_size, args))
    dist.destroy_process_group()


class DistributedPool:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory(prefix="distseq_pool_")
        init_file = os.path.join(self._dir.name, "init")
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, init_file, self._tasks[rank], self._results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for proc in self._procs:
            proc.start()
        self.alive = True

    def run_raw(self, fn, *args, timeout: float = 120.0) -> list[Outcome]:
        if not self.alive:
            raise RuntimeError("the pool was killed by an earlier hang")
        for tasks in self._tasks:
            tasks.put((fn, args))
        outcomes: dict[int, Outcome] = {}
        try:
            while len(outcomes) < self.world_size:
                outcome = self._results.get(timeout=timeout)
                outcomes[outcome.rank] = outcome
        except queue.Empty:
            self.close(force=True)
            missing = sorted(set(range(self.world_size)) - set(outcomes))
            raise PoolHang(
                f"{fn.__name__}: ranks {missing} did not finish within {timeout}s (hang)"
            ) from None
        return [outcomes[r] for r in range(self.world_size)]

    def run(self, fn, *args, timeout: float = 120.0) -> list[Any]:
        outcomes = self.run_raw(fn, *args, timeout=timeout)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            details = "\n".join(f"--- rank {o.rank} ---\n{o.traceback}" for o in failed)
            ranks = [o.rank for o in failed]
            raise AssertionError(f"{fn.__name__} failed on ranks {ranks}:\n{details}")
        return [o.value for o in outcomes]

    def close(self, force: bool = False) -> None:
        if not self.alive:
            return
        self.alive = False
        for proc, tasks in zip(self._procs, self._tasks):
            if force:
                proc.kill()
            else:
                tasks.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self._dir.cleanup()
