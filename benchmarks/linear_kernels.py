"""Forward and backward time of the Triton linear-attention kernels on one GPU.

    python benchmarks/linear_kernels.py [--seq 8192 --heads 8 --dk 128 --dv 128 --dtype bf16]

First checks the kernels against the float64 recurrence on a small problem (relative max
error of o, final state and every gradient; exit 1 above the tests' tolerances), then times
``forward`` and ``backward`` on the requested one (median of CUDA-event timings after a
warm-up) and prints milliseconds and tokens per second. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _problem(args, seq: int, device: torch.device, gen: torch.Generator):
    dtype = _DTYPES[args.dtype]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    q = randn(args.batch, seq, args.heads, args.dk).to(dtype)
    k = (randn(args.batch, seq, args.heads, args.dk) * args.dk**-0.5).to(dtype)
    v = randn(args.batch, seq, args.heads, args.dv).to(dtype)
    g = F.logsigmoid(randn(args.batch, seq, args.heads) + 4) if args.decay else None
    h0 = randn(args.batch, args.heads, args.dk, args.dv)
    return q, k, v, g, h0


def _check(args, device: torch.device) -> dict[str, float]:
    """Relative max errors against the float64 recurrence on a 200-token problem."""
    from distseq.kernels import linear_triton
    from distseq.reference import linear_attention_reference

    q, k, v, g, h0 = _problem(args, 200, device, torch.Generator(device).manual_seed(0))
    out, final = linear_triton.forward(q, k, v, g, scale=None, initial_state=h0)
    do, dht = torch.randn_like(out), torch.randn_like(final)
    grads = linear_triton.backward(do, dht, q, k, v, g, scale=None, initial_state=h0)
    leaves = [None if t is None else t.double().requires_grad_() for t in (q, k, v, g, h0)]
    ref_out, ref_final = linear_attention_reference(
        *leaves[:3], log_decay=leaves[3], initial_state=leaves[4]
    )
    ((ref_out * do.double()).sum() + (ref_final * dht.double()).sum()).backward()
    errors = {}
    pairs = [("o", out, ref_out), ("final_state", final, ref_final)]
    names = ("dq", "dk", "dv", "dlog_decay", "dinitial_state")
    pairs += [(n, got, leaf.grad) for n, got, leaf in zip(names, grads, leaves) if leaf is not None]
    for name, got, want in pairs:
        want = want.detach()
        errors[name] = ((got.double() - want).abs().max() / want.abs().max()).item()
    return errors


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: compilation and autotuning caches, allocator
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dk", type=int, default=128)
    parser.add_argument("--dv", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--no-decay", dest="decay", action="store_false")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("linear_kernels: CUDA is not available, nothing to benchmark (skipped)")
        return 0
    device = torch.device("cuda")
    from distseq.kernels import linear_triton

    reason = linear_triton.is_available(device, _DTYPES[args.dtype])
    if reason is not None:
        print(f"linear_kernels: the Triton kernels cannot run ({reason}); skipped")
        return 0
    errors = _check(args, device)
    print("check vs float64 (200 tokens), relative max error:")
    print("  " + "  ".join(f"{name} {err:.1e}" for name, err in errors.items()))
    # The tolerances of tests/test_linear_triton.py (16-bit: a few roundoffs compounding).
    tol = 1e-4 if args.dtype == "fp32" else 3e-2
    if max(errors.values()) > tol:
        print(f"linear_kernels: error above {tol}; not timing wrong kernels")
        return 1

    q, k, v, g, h0 = _problem(args, args.seq, device, torch.Generator(device).manual_seed(1))
    opts = {"scale": None, "initial_state": h0, "chunk_size": args.chunk}
    out, final = linear_triton.forward(q, k, v, g, **opts)
    do, dht = torch.randn_like(out), torch.randn_like(final)
    fwd = _median_ms(lambda: linear_triton.forward(q, k, v, g, **opts), args.repeats)
    bwd = _median_ms(lambda: linear_triton.backward(do, dht, q, k, v, g, **opts), args.repeats)
    tokens = args.batch * args.seq
    print(
        f"B={args.batch} S={args.seq} H={args.heads} Dk={args.dk} Dv={args.dv} {args.dtype} "
        f"chunk={args.chunk} decay={args.decay} on {torch.cuda.get_device_name()}"
    )
    for name, ms in (("forward", fwd), ("backward", bwd), ("fwd+bwd", fwd + bwd)):
        print(f"  {name:9s} {ms:8.3f} ms  {tokens / ms / 1e3:8.2f} M tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
