"""Start ``world`` processes joined in one process group, run a function on each, collect.

For benchmarks and calibration on one machine: ``run_ranks(world, fn, *args)`` spawns the
processes, calls ``fn(rank, world, *args)`` on every rank once the group is up, and returns
the per-rank results in rank order; an exception on any rank is raised here with that rank's
traceback. :func:`init_rank` and :func:`call_rank` are the pieces a long-lived worker (the
tests' pool) reuses.
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BACKENDS = ("gloo", "nccl")
# After one rank fails, how long the others get to report (a peer stuck in a collective with
# the failed rank never will).
_FAILURE_GRACE_S = 5.0


@dataclass
class Outcome:
    """What ``fn`` did on one rank: its return value, or the exception it raised."""

    rank: int
    ok: bool
    value: Any = None
    error_type: str = ""
    message: str = ""
    traceback: str = ""


def init_rank(
    rank: int, world: int, init_file: str, backend: str = "gloo", threads: int | None = 1
) -> None:
    """Join the process group of ``world`` ranks as ``rank`` (file rendezvous at
    ``init_file``: no port to collide with other jobs on the machine).

    gloo ranks get ``threads`` intra-op threads each (``None``: torch's default); nccl ranks
    use GPU ``rank``.
    """
    if backend == "nccl":
        torch.cuda.set_device(rank)
    elif threads is not None:
        torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)


def call_rank(fn: Callable, rank: int, world: int, args: tuple) -> Outcome:
    """``fn(rank, world, *args)`` as an :class:`Outcome`; exceptions are caught, not raised."""
    try:
        return Outcome(rank, True, fn(rank, world, *args))
    except BaseException as exc:  # report everything; the parent decides what is a failure
        return Outcome(rank, False, None, type(exc).__name__, str(exc), traceback.format_exc())


def _rank_main(rank, world, backend, threads, init_file, results, fn, args) -> None:
    joined = call_rank(init_rank, rank, world, (init_file, backend, threads))
    if not joined.ok:
        results.put(joined)
        return
    results.put(call_rank(fn, rank, world, args))
    dist.destroy_process_group()


def run_ranks(
    world: int,
    fn: Callable,
    *args: Any,
    backend: str = "gloo",
    threads: int | None = 1,
    timeout: float | None = None,
) -> list[Any]:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each run in its own
    spawned process, all joined in one ``backend`` process group (see :func:`init_rank` for
    ``threads``).

    ``fn`` and ``args`` must pickle (``fn`` a module-level function). Raises ``RuntimeError``
    with the traceback of every rank that raised or died, and ``TimeoutError`` when the ranks
    have not all answered within ``timeout`` seconds (``None``: no limit); either way every
    process is gone when this returns. The calling script needs the
    ``if __name__ == "__main__":`` guard (spawned processes re-import it).
    """
    if world < 1:
        raise ValueError(f"run_ranks needs world >= 1 processes, got {world}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="distseq_ranks_") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(rank, world, backend, threads, init_file, results, fn, args),
            )
            for rank in range(world)
        ]
        for proc in procs:
            proc.start()
        try:
            outcomes = _collect(results, procs, timeout, fn)
        except BaseException:
            for proc in procs:  # a peer of a failed rank may wait in a collective forever
                proc.kill()
            raise
        finally:
            for proc in procs:
                proc.join()
    return [outcomes[rank].value for rank in range(world)]


def _collect(results, procs, timeout: float | None, fn: Callable) -> dict[int, Outcome]:
    """Every rank's :class:`Outcome`, read before the processes are joined (a child exits only
    once what it put on the queue is read); raises as :func:`run_ranks` says."""
    deadline = None if timeout is None else time.monotonic() + timeout
    outcomes: dict[int, Outcome] = {}
    dead: dict[int, int] = {}
    failed_at = None
    while len(outcomes) + len(dead) < len(procs):
        try:
            outcome = results.get(timeout=1.0)
        except queue.Empty:
            now = time.monotonic()
            if failed_at is not None and now - failed_at > _FAILURE_GRACE_S:
                break
            if deadline is not None and now > deadline:
                missing = [r for r in range(len(procs)) if r not in outcomes]
                raise TimeoutError(
                    f"{fn.__name__}: ranks {missing} did not finish within {timeout} s; "
                    "raise the timeout or look for a hang"
                ) from None
            # A rank that exited without reporting (killed, crashed in C++) never will.
            for rank, proc in enumerate(procs):
                if rank not in outcomes and proc.exitcode is not None:
                    dead[rank] = proc.exitcode
                    failed_at = failed_at or now
            continue
        outcomes[outcome.rank] = outcome
        dead.pop(outcome.rank, None)
        if not outcome.ok:
            failed_at = failed_at or time.monotonic()
    # A rank that reported, then died on the way out, left its report in the pipe.
    while dead:
        try:
            outcome = results.get_nowait()
        except queue.Empty:
            break
        outcomes[outcome.rank] = outcome
        dead.pop(outcome.rank, None)
    errors = [f"--- rank {o.rank} ---\n{o.traceback}" for o in outcomes.values() if not o.ok]
    errors += [f"--- rank {r} ---\nexited with code {code}" for r, code in dead.items()]
    if errors:
        silent = [r for r in range(len(procs)) if r not in outcomes and r not in dead]
        if silent:
            errors.append(f"ranks {silent} did not report (stuck waiting on a failed rank?)")
        raise RuntimeError(f"{fn.__name__} failed:\n" + "\n".join(errors))
    return outcomes


def exit_process(code: int = 0) -> None:
    """End a process that used ``torch.distributed`` now, with ``code``, skipping the
    interpreter's teardown: with gloo (torch 2.13) that teardown sometimes destroys a backend
    thread still joinable and aborts ("terminate called without an active exception", exit
    -6) after all work is done, which turns a finished torchrun worker into a failed one.
    Call it after ``destroy_process_group``; output is flushed first."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
