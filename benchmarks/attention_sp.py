"""Sequence-parallel attention vs one process on the same cores: time, bytes, memory.

    python benchmarks/attention_sp.py [--seq 16384 --heads 8 --head-dim 64 --world 2]
    python benchmarks/attention_sp.py --world 4 --ulysses-degree 2   # usp as 2 x 2

Baseline: one process with ``world`` threads runs the local kernel (the fused aten CPU flash
kernel on CPU) forward+backward on the whole sequence. Then ``world`` processes with one
thread each run every strategy on their shards. Printed per strategy: the median
forward+backward time (slowest rank), the ratio ``t_single / t_sp`` (1.0 = parallel scaling
as good as threads in one process), bytes sent per rank next to the strategy's formula
(``traffic()``; ``exact`` says whether they are equal), and peak resident memory per rank.
Timings are taken in the same invocation, back to back. A strategy that cannot run the shape
(its ``check_group``) is skipped with its reason.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist
from _common import peak_rss_bytes, timed

import distseq
from distseq.comm import run_ranks
from distseq.kernels import select_backend
from distseq.strategies import ATTENTION_STRATEGIES
from distseq.strategies.usp import resolve_ulysses_degree


def _worker(rank: int, world: int, args) -> dict:
    gen = torch.Generator().manual_seed(rank)
    s_local = args.seq // world
    q = torch.randn(1, s_local, args.heads, args.head_dim, generator=gen).requires_grad_()
    k = torch.randn(1, s_local, args.kv_heads, args.head_dim, generator=gen).requires_grad_()
    v = torch.randn(1, s_local, args.kv_heads, args.head_dim, generator=gen).requires_grad_()
    dout = torch.randn_like(q)
    rows = {}
    for strategy in args.strategies:
        if _skip_reason(strategy, args):
            continue

        def step(strategy=strategy):
            out = distseq.attention(
                q, k, v, strategy=strategy, layout=args.layout, **_options(strategy, args)
            )
            out.backward(dout)

        dist.barrier()
        times = timed(step, args.repeats)
        with distseq.CommCounter() as counter:
            step()
        rows[strategy] = {"times": times, "bytes_sent": counter.bytes_sent}
    rows["peak_rss_bytes"] = peak_rss_bytes()
    return rows


def _options(strategy: str, args) -> dict:
    return {"ulysses_degree": args.ulysses_degree} if strategy == "usp" else {}


def _skip_reason(strategy: str, args) -> str | None:
    """Why ``strategy`` cannot run this shape (its ``check_group``), or ``None``."""
    shape = (args.world, args.heads, args.kv_heads, args.layout)
    try:
        ATTENTION_STRATEGIES.get(strategy).check_group(*shape, **_options(strategy, args))
    except ValueError as exc:
        return str(exc)
    return None


def _baseline(rank: int, world: int, args) -> dict:
    kernel = select_backend("auto", torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.seq, args.heads, args.head_dim, generator=gen)
    k = torch.randn(1, args.seq, args.kv_heads, args.head_dim, generator=gen)
    v = torch.randn(1, args.seq, args.kv_heads, args.head_dim, generator=gen)
    dout = torch.randn_like(q)
    scale = args.head_dim**-0.5

    def step():
        out, lse = kernel.forward(q, k, v, scale=scale, causal=True)
        kernel.backward(dout, q, k, v, out, lse, scale=scale, causal=True)

    return {"times": timed(step, args.repeats), "peak_rss_bytes": peak_rss_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    parser.add_argument("--strategies", nargs="+", default=["ring", "allgather", "ulysses", "usp"])
    parser.add_argument(
        "--ulysses-degree", type=int, default=None, help="usp's (default: its own default)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    # The baseline runs alone in its own process, with the threads of all the ranks.
    (single,) = run_ranks(1, _baseline, args, threads=args.threads_per_rank * args.world)
    per_rank = run_ranks(args.world, _worker, args, threads=args.threads_per_rank)

    t_single = statistics.median(single["times"])
    elem, s_local = 4, args.seq // args.world
    print(f"causal attention fwd+bwd, N={args.seq}, H={args.heads}/{args.kv_heads}, "
          f"D={args.head_dim}, fp32, layout={args.layout}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print(f"single process, {args.threads_per_rank * args.world} threads: {t_single:.3f} s, "
          f"peak RSS {single['peak_rss_bytes'] / 2**20:.0f} MiB")  # fmt: skip
    header = f"{'strategy':<10} {'P':>2} {'t_sp (s)':>9} {'t_single/t_sp':>14} " \
             f"{'MiB sent/rank':>14} {'formula':>9} {'exact':>5} " \
             f"{'peak RSS/rank MiB':>18}"  # fmt: skip
    print(header)
    report = {"args": vars(args), "t_single": t_single, "strategies": {}}
    for strategy in args.strategies:
        if strategy not in per_rank[0]:
            print(f"{strategy:<10} skipped: {_skip_reason(strategy, args)}")
            continue
        # A step ends when its slowest rank ends.
        steps = [max(rows[strategy]["times"][i] for rows in per_rank)
                 for i in range(args.repeats)]  # fmt: skip
        t_sp = statistics.median(steps)
        sent = max(rows[strategy]["bytes_sent"] for rows in per_rank)
        shape = (args.world, s_local, args.heads, args.kv_heads, args.head_dim, elem)
        impl = ATTENTION_STRATEGIES.get(strategy)
        formula = impl.traffic(*shape, *_options(strategy, args).values()).total
        rss = max(rows["peak_rss_bytes"] for rows in per_rank)
        label = strategy
        if strategy == "usp":
            u = resolve_ulysses_degree(args.world, args.heads, args.ulysses_degree)
            label = f"usp {u}x{args.world // u}"
        print(f"{label:<10} {args.world:>2} {t_sp:>9.3f} {t_single / t_sp:>14.2f} "
              f"{sent / 2**20:>14.1f} {formula / 2**20:>9.1f} {str(sent == formula):>5} "
              f"{rss / 2**20:>18.0f}")  # fmt: skip
        report["strategies"][strategy] = {"t_sp": t_sp, "ratio": t_single / t_sp,
                                          "bytes_sent": sent, "formula_bytes": formula,
                                          "label": label,
                                          "peak_rss_bytes": rss}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
