"""Sequence-parallel linear attention and delta rule (lasp2 / allscan / ring) vs one process.

    python benchmarks/linear_sp.py [--seqs 8192 32768 131072 --worlds 1 2 4 --heads 2 --dim 32
                                    --ops linear delta]

``--ops``: ``linear`` (``distseq.linear_attention``) and/or ``delta`` (``distseq.delta_rule``,
unit-norm keys, ``β`` in ``(0, 1)``). Baseline: one process, one thread, runs the op's chunked
``torch`` kernel forward+backward on the whole sequence (data-dependent decay). Then, for each
world size ``P``, ``P`` processes with one thread each run every strategy on ``N / P`` tokens.
Printed per (op, N, P, strategy): the best of ``--repeats`` forward+backward times of the
slowest rank (best-of, because this is meant to run on shared machines), microseconds per
token of the whole sequence, the ratio ``t_single / t_sp``, and the bytes each rank sends in
the forward and in the backward (max over ranks; float32 states) next to the strategy's
formula. Timings are taken in one invocation; on a machine with fewer cores than ``P`` the
ranks share cores.
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
import torch.distributed as dist
from _common import timed

import distseq
from distseq.comm import run_ranks
from distseq.kernels import delta_torch, linear_torch
from distseq.strategies import DELTA_STRATEGIES, LINEAR_STRATEGIES

# op -> (local torch kernel, the sequence-parallel entry point, its registry)
OPS = {
    "linear": (linear_torch, distseq.linear_attention, LINEAR_STRATEGIES),
    "delta": (delta_torch, distseq.delta_rule, DELTA_STRATEGIES),
}


def _inputs(op: str, n: int, heads: int, dim: int, seed: int):
    """Positional inputs of ``op`` (q, k, v[, beta]), the log decay and an output gradient."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, n, heads, dim, generator=gen) * 0.3 for _ in range(3))
    g = -torch.nn.functional.softplus(torch.randn(1, n, heads, generator=gen)) * 0.1
    do = torch.randn(1, n, heads, dim, generator=gen)
    if op == "linear":
        return [q, k, v], g, do
    beta = torch.rand(1, n, heads, generator=gen)
    return [q, torch.nn.functional.normalize(k, dim=-1), v, beta], g, do


def _baseline(rank: int, world: int, args) -> dict:
    rows = {}
    for op, n in itertools.product(args.ops, args.seqs):
        kernel = OPS[op][0]
        inputs, g, do = _inputs(op, n, args.heads, args.dim, 0)
        scale = args.dim**-0.5

        def step(kernel=kernel, inputs=inputs, g=g, do=do, scale=scale):
            kernel.forward(*inputs, g, scale=scale)
            kernel.backward(do, None, *inputs, g, scale=scale)

        rows[op, n] = timed(step, args.repeats)
    return rows


def _worker(rank: int, world: int, args) -> dict:
    rows = {}
    for op, n in itertools.product(args.ops, args.seqs):
        call = OPS[op][1]
        inputs, g, do = _inputs(op, n // world, args.heads, args.dim, rank)
        leaves = [t.requires_grad_() for t in (*inputs, g)]
        for strategy in args.strategies:

            def step(call=call, strategy=strategy, leaves=leaves, do=do):
                o = call(*leaves[:-1], log_decay=leaves[-1], strategy=strategy)
                o.backward(do)

            dist.barrier()
            # The counted step doubles as the warm-up.
            with distseq.CommCounter() as fwd:
                o = call(*leaves[:-1], log_decay=leaves[-1], strategy=strategy)
            with distseq.CommCounter() as bwd:
                o.backward(do)
            times = timed(step, args.repeats, warm_up=False)
            rows[op, n, strategy] = (times, fwd.bytes_sent, bwd.bytes_sent)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--strategies", nargs="+", default=["lasp2", "allscan", "ring"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS), default=["linear", "delta"])
    args = parser.parse_args()

    (single,) = run_ranks(1, _baseline, args)
    per_world = {world: run_ranks(world, _worker, args) for world in args.worlds}

    print(f"fwd+bwd, B=1, H={args.heads}, Dk=Dv={args.dim}, data-dependent decay, fp32, "
          f"contiguous, torch kernels (chunk 64), 1 thread/rank; torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'op':<6} {'N':>7} {'P':>2} {'strategy':<8} {'t (s)':>7} {'us/token':>9} "
          f"{'t_single/t':>10} {'fwd B/rank':>10} {'bwd B/rank':>10} {'formula':>8}")  # fmt: skip
    for op, n in itertools.product(args.ops, args.seqs):
        t_single = min(single[op, n])
        print(f"{op:<6} {n:>7} {1:>2} {'kernel':<8} {t_single:>7.3f} "
              f"{t_single / n * 1e6:>9.2f} {1.0:>10.2f} {0:>10} {0:>10} {0:>8}")  # fmt: skip
        for world in args.worlds:
            ranks = per_world[world]
            for strategy in args.strategies:
                key = (op, n, strategy)
                steps = [max(rows[key][0][i] for rows in ranks) for i in range(args.repeats)]
                t = min(steps)
                fwd = max(rows[key][1] for rows in ranks)
                bwd = max(rows[key][2] for rows in ranks)
                formula = (
                    OPS[op][2]
                    .get(strategy)
                    .traffic(world, 1, args.heads, args.dim, args.dim, "contiguous")
                    .forward
                )
                print(f"{op:<6} {n:>7} {world:>2} {strategy:<8} {t:>7.3f} "
                      f"{t / n * 1e6:>9.2f} {t_single / t:>10.2f} {fwd:>10} {bwd:>10} "
                      f"{formula:>8}")  # fmt: skip


if __name__ == "__main__":
    main()
