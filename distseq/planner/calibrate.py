"""``python -m distseq.planner calibrate``: measure a :class:`Profile` on this machine.

``world`` processes (gloo on CPU, NCCL on GPU) run small microbenchmarks *at the same time*,
so rates include the contention of a full node: dense matmul FLOP/s, causal attention
forward+backward FLOP/s (``distseq.attention`` on a one-rank group: the strategies' own
local kernel), linear attention FLOP/s (``distseq.linear_attention``), and α-β of a
point-to-point link fitted from ping-pong times. One machine cannot see an inter-node link,
so ``inter`` is written equal to ``intra`` (the file says so).
"""

from __future__ import annotations

import platform
import statistics
import time

import numpy as np

from distseq.planner.profile import Link, Profile

CHUNK = 64


def _timeit(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fit(x: list[float], t: list[float]) -> tuple[float, float]:
    """Least squares ``t = c0 + c1·x``: returns ``(c0 >= 0, c1 > 0)``."""
    c1, c0 = np.polyfit(np.asarray(x, dtype=np.float64), np.asarray(t, dtype=np.float64), 1)
    if c1 <= 0:  # noise swamped the slope: fall back to the largest point's average rate
        c1, c0 = t[-1] / x[-1], 0.0
    return max(0.0, float(c0)), float(c1)


def _measure(rank: int, world: int, backend: str, quick: bool) -> dict:
    """This rank's rates (run by :func:`distseq.comm.run_ranks`, the group already up)."""
    import torch
    import torch.distributed as dist

    cuda = backend == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    reps = 3 if quick else 5
    out: dict = {}

    n = 256 if quick else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    dist.barrier()
    out["matmul_flops"] = 2 * n**3 / _timeit(lambda: a @ a, reps, sync)

    heads, dim = 4, 64
    # The softmax strategies' own local path: distseq.attention on a one-rank group.
    import distseq

    alone = [dist.new_group([r]) for r in range(world)][rank]
    times = {}
    # A tiny call measures the fixed cost per call; the longest one the rate.
    for s in (64, 2048) if quick else (64, 4096):
        q, k, v = (
            torch.randn(1, s, heads, dim, device=device, dtype=dtype, requires_grad=True)
            for _ in range(3)
        )

        def attn(q=q, k=k, v=v):
            distseq.attention(q, k, v, strategy="ring", group=alone).sum().backward()

        dist.barrier()
        times[s] = _timeit(attn, reps, sync)
    (_, t_small), (large, t_large) = sorted(times.items())
    out["attention_overhead_s"] = t_small
    out["attention_flops"] = 3.5 * 2 * large * large * heads * dim / max(t_large - t_small, 1e-9)

    flops, times = [], []
    for s in (1024, 4096) if quick else (2048, 8192):
        step = _linear_step(s, heads, dim, device, dtype, alone)
        dist.barrier()
        times.append(_timeit(step, reps, sync))
        flops.append(3 * s * heads * (2 * CHUNK * dim + 4 * dim * dim))
    out["linear_attention_flops"] = 1 / _fit(flops, times)[1]

    sizes = [2**k for k in range(12, 21 if quick else 23, 2)]
    pingpong = []
    for size in sizes:
        buf = torch.zeros(size // 4, device=device, dtype=torch.float32)
        dist.barrier()

        def exchange(buf=buf):
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            elif rank == 1:
                dist.recv(buf, 0)
                dist.send(buf, 0)

        pingpong.append(_timeit(exchange, reps, sync) / 2)
    out["alpha_s"], per_byte = _fit([float(s) for s in sizes], pingpong)
    out["bandwidth_Bps"] = 1 / per_byte
    dist.barrier()
    return out


def _linear_step(s: int, heads: int, dim: int, device, dtype, alone):
    """One chunked linear-attention forward+backward (``distseq.linear_attention`` on the
    one-rank group ``alone``: the local kernel's rate, as for softmax above)."""
    import torch

    from distseq import linear_attention

    shape = (1, s, heads, dim)
    q, k, v = (
        torch.randn(*shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    return lambda: linear_attention(q, k, v, group=alone).sum().backward()


def calibrate(world: int = 2, backend: str = "auto", quick: bool = False) -> Profile:
    """Measure with ``world`` processes; returns a :class:`Profile` (``source`` = measured)."""
    import torch

    from distseq.comm import run_ranks

    if world < 2:
        raise ValueError(f"calibrate needs --world >= 2 to measure a link, got {world}")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < world:
        raise ValueError(
            f"--world {world} needs {world} GPUs for nccl, found {torch.cuda.device_count()}; "
            "lower --world or use --backend gloo"
        )
    outs = run_ranks(world, _measure, backend, quick, backend=backend, timeout=600)
    # The slowest rank sets the pace of a synchronous step.
    rate = {
        k: min(o[k] for o in outs)
        for k in ("matmul_flops", "attention_flops", "linear_attention_flops")
    }
    link = Link(alpha_s=outs[0]["alpha_s"], bandwidth_Bps=outs[0]["bandwidth_Bps"])
    device = torch.cuda.get_device_name(0) if backend == "nccl" else platform.processor()
    return Profile(
        name=f"calibrated-{backend}-P{world}",
        source=f"measured by `python -m distseq.planner calibrate` ({backend}, {world} "
        f"processes, {device or platform.machine()})",
        intra=link,
        inter=link,
        layer_overhead_s=max(o["attention_overhead_s"] for o in outs),
        elem_bytes=2 if backend == "nccl" else 4,
        reserved_bytes=0,
        note="single machine: inter-node link not measurable, set equal to intra",
        **rate,
    )
