"""Demo: exact sequence-parallel attention across CPU processes.

    torchrun --standalone --nproc_per_node 4 launch/ring_demo.py [--seq 4096 --heads 8 ...]

Every rank builds the same full q/k/v, keeps its zigzag shard, runs each strategy forward and
backward, and compares output and gradients with a dense float64 single-process reference.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import distseq
from distseq.comm.launch import exit_process
from distseq.reference import attention_reference
from distseq.strategies import ATTENTION_STRATEGIES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048, help="global sequence length")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    gen = torch.Generator().manual_seed(0)
    shape_q = (1, args.seq, args.heads, args.head_dim)
    shape_kv = (1, args.seq, args.kv_heads, args.head_dim)
    q, k, v = (torch.randn(s, generator=gen) for s in (shape_q, shape_kv, shape_kv))
    dout = torch.randn(shape_q, generator=gen)

    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref, _ = attention_reference(*ref_leaves, causal=True)
    ref.backward(dout.double())

    if rank == 0:
        print(f"world={world} seq={args.seq} heads={args.heads}/{args.kv_heads} "
              f"head_dim={args.head_dim} layout={args.layout} (causal, fp32)")  # fmt: skip
    able = ATTENTION_STRATEGIES.supporting(world, args.heads, args.kv_heads, args.layout)
    for strategy in distseq.available_strategies()["attention"]:
        if strategy not in able:  # e.g. ulysses needs the query heads divisible by P
            continue
        local = [distseq.shard_sequence(t, layout=args.layout).requires_grad_() for t in (q, k, v)]
        start = time.perf_counter()
        out = distseq.attention(*local, strategy=strategy, layout=args.layout)
        out.backward(distseq.shard_sequence(dout, layout=args.layout))
        elapsed = time.perf_counter() - start
        errors = {"out": out}
        errors.update(dq=local[0].grad, dk=local[1].grad, dv=local[2].grad)
        expected = {"out": ref, "dq": ref_leaves[0].grad, "dk": ref_leaves[1].grad,
                    "dv": ref_leaves[2].grad}  # fmt: skip
        worst = torch.tensor(0.0, dtype=torch.float64)
        for name, got in errors.items():
            full = distseq.gather_sequence(got.detach(), layout=args.layout)
            want = expected[name]
            worst = torch.maximum(worst, (full.double() - want).abs().max() / want.abs().max())
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(f"  {strategy:<10} fwd+bwd {elapsed:6.3f}s  max error vs dense "
                  f"(relative to max|ref|, out/dq/dk/dv): {worst.item():.2e}")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process(0)  # the interpreter's teardown can abort under gloo: see exit_process
