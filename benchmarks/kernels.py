"""Local block kernels, forward+backward: time and TFLOP/s per backend on one device.

    python benchmarks/kernels.py [--seq 4096 8192 --heads 16 --kv-heads 8 --head-dim 128]
                                 [--json out.json]

Attention backends (``torch``, ``triton``, ``flash``) run on CUDA when it is present; on a
CPU-only machine only ``torch`` runs (Triton's interpreter is a test tool, not a kernel) and
the ratios are against it. On CUDA the ``torch`` backend runs PyTorch's fused kernels
(:mod:`distseq.kernels.attention_cuda`; the row says which). Every row prints the ratio to
flash-attn when flash-attn ran in the same invocation (the reference for speed), otherwise to
the torch backend.
FLOPs counted as flash-attn does: forward ``4·B·Hq·Sq·Sk·D`` (halved when causal), backward
2.5× the forward.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time

import torch

from distseq.kernels import BACKENDS, attention_cuda, select_backend, unavailable_reason


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up call (CUDA events on GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def attention_flops(batch: int, seq: int, heads: int, dim: int, causal: bool) -> float:
    """Forward+backward FLOPs of one attention call (flash-attn's convention)."""
    forward = 4 * batch * heads * seq * seq * dim / (2 if causal else 1)
    return forward * 3.5


def _fwd_bwd(kernel, q, k, v, dout, scale: float, causal: bool) -> None:
    out, lse = kernel.forward(q, k, v, scale=scale, causal=causal)
    kernel.backward(dout, q, k, v, out, lse, scale=scale, causal=causal)


def bench_attention(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows = []
    for seq in args.seq:
        gen = torch.Generator(device=device).manual_seed(0)
        shape_q = (args.batch, seq, args.heads, args.head_dim)
        shape_kv = (args.batch, seq, args.kv_heads, args.head_dim)
        q, k, v = (
            torch.randn(s, generator=gen, device=device, dtype=dtype)
            for s in (shape_q, shape_kv, shape_kv)
        )
        dout = torch.randn_like(q)
        scale = args.head_dim**-0.5
        for name in BACKENDS:
            reason = unavailable_reason(name, device, dtype)
            if reason is not None or (name == "triton" and device.type != "cuda"):
                print(f"  skip {name}: {reason or 'interpreter only on CPU'}")
                continue
            kernel = select_backend(name, device, dtype)
            step = functools.partial(_fwd_bwd, kernel, q, k, v, dout, scale, args.causal)
            seconds = _timed(step, device, args.repeats)
            flops = attention_flops(args.batch, seq, args.heads, args.head_dim, args.causal)
            rows.append(
                {"seq": seq, "backend": name, "s": seconds, "tflops": flops / seconds / 1e12}
            )
            if name == "torch":
                rows[-1]["path"] = attention_cuda.describe_torch_path(device, dtype, args.head_dim)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the rows and the setup to this file")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cpu = f"{platform.machine()} CPU ({os.cpu_count()} cores)"
    hardware = torch.cuda.get_device_name() if cuda else cpu
    print(f"attention fwd+bwd on {hardware}, {dtype}, torch {torch.__version__}, "
          f"H={args.heads}/{args.kv_heads} D={args.head_dim} causal={args.causal}")  # fmt: skip
    rows = bench_attention(args, device, dtype)
    print(f"{'seq':>7} {'backend':<8} {'ms':>9} {'TFLOP/s':>8} {'vs ref':>7}")
    for row in rows:
        same_seq = {r["backend"]: r for r in rows if r["seq"] == row["seq"]}
        ref = same_seq.get("flash") or same_seq["torch"]
        print(f"{row['seq']:>7} {row['backend']:<8} {row['s'] * 1e3:>9.2f} "
              f"{row['tflops']:>8.2f} {ref['s'] / row['s']:>7.2f}  "
              f"{row.get('path', '')}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": vars(args), "device": hardware, "dtype": str(dtype),
                       "torch": torch.__version__, "rows": rows}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
