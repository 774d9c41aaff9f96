"""Forward and backward time of every linear-attention backend on one GPU, side by side.

    python benchmarks/linear_kernels.py [--seq 8192 --heads 8 --dk 128 --dv 128 --dtype bf16]
                                        [--json out.json]

For each backend that can run (``torch``, ``triton``, ``fla`` where importable) it first
checks the kernels against the float64 recurrence on a small problem (relative max error of
o, final state and every gradient; a backend above the tests' tolerances is reported and not
timed), then times ``forward`` and ``backward`` on the requested one (median of CUDA-event
timings after a warm-up) and prints milliseconds, tokens/s and TFLOP/s. FLOPs counted for the
chunked algorithm (chunk ``C``): forward ``2·B·H·S·(C·(Dk + Dv) + 2·Dk·Dv)`` (intra-chunk
``q kᵀ`` and ``P v`` as full tiles, the inter-chunk ``q S`` and state update), backward twice
that. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics

import torch
import torch.nn.functional as F

from distseq.kernels import LINEAR_BACKENDS, unavailable_reason

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


def _check(kernel, args, device: torch.device) -> dict[str, float]:
    """Relative max errors against the float64 recurrence on a 200-token problem."""
    from distseq.reference import linear_attention_reference

    q, k, v, g, h0 = _problem(args, 200, device, torch.Generator(device).manual_seed(0))
    out, final = kernel.forward(q, k, v, g, scale=None, initial_state=h0)
    do, dht = torch.randn_like(out), torch.randn_like(final)
    grads = kernel.backward(do, dht, q, k, v, g, scale=None, initial_state=h0)
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


def linear_flops(batch: int, seq: int, heads: int, dk: int, dv: int, chunk: int) -> float:
    """Forward+backward FLOPs of one chunked linear-attention call (see the module doc)."""
    forward = 2 * batch * heads * seq * (chunk * (dk + dv) + 2 * dk * dv)
    return 3 * forward


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


def bench_backend(name: str, args, device: torch.device) -> dict:
    """One backend's check and (if it passes) timings: a row of the side-by-side table."""
    kernel = importlib.import_module(LINEAR_BACKENDS[name])
    errors = _check(kernel, args, device)
    # The tolerances of tests/test_linear_triton.py (16-bit: a few roundoffs compounding).
    tol = 1e-4 if args.dtype == "fp32" else 3e-2
    row = {"backend": name, "max_error": max(errors.values()), "errors": errors}
    if row["max_error"] > tol:
        row["skipped"] = f"error {row['max_error']:.1e} above {tol}: not timing a wrong kernel"
        return row
    q, k, v, g, h0 = _problem(args, args.seq, device, torch.Generator(device).manual_seed(1))
    opts = {"scale": None, "initial_state": h0, "chunk_size": args.chunk}
    out, final = kernel.forward(q, k, v, g, **opts)
    do, dht = torch.randn_like(out), torch.randn_like(final)
    fwd = _median_ms(lambda: kernel.forward(q, k, v, g, **opts), args.repeats)
    bwd = _median_ms(lambda: kernel.backward(do, dht, q, k, v, g, **opts), args.repeats)
    flops = linear_flops(args.batch, args.seq, args.heads, args.dk, args.dv, args.chunk)
    tokens = args.batch * args.seq
    row.update(forward_ms=fwd, backward_ms=bwd, tokens_per_s=tokens / (fwd + bwd) * 1e3,
               tflops=flops / ((fwd + bwd) / 1e3) / 1e12)  # fmt: skip
    return row


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
    parser.add_argument("--json", help="also write the rows and the setup to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("linear_kernels: CUDA is not available, nothing to benchmark (skipped)")
        return 0
    device, dtype = torch.device("cuda"), _DTYPES[args.dtype]
    print(f"B={args.batch} S={args.seq} H={args.heads} Dk={args.dk} Dv={args.dv} {args.dtype} "
          f"chunk={args.chunk} decay={args.decay} on {torch.cuda.get_device_name()}")  # fmt: skip
    rows = []
    for name in LINEAR_BACKENDS:
        reason = unavailable_reason(name, device, dtype, LINEAR_BACKENDS)
        rows.append(
            {"backend": name, "skipped": reason} if reason else bench_backend(name, args, device)
        )
    print(f"{'backend':<8} {'fwd ms':>9} {'bwd ms':>9} {'M tok/s':>9} {'TFLOP/s':>8}  check")
    for row in rows:
        if "tflops" in row:
            print(f"{row['backend']:<8} {row['forward_ms']:>9.3f} {row['backward_ms']:>9.3f} "
                  f"{row['tokens_per_s'] / 1e6:>9.2f} {row['tflops']:>8.2f}  "
                  f"max err {row['max_error']:.1e}")  # fmt: skip
        else:
            print(f"{row['backend']:<8} skipped: {row['skipped']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": vars(args), "device": torch.cuda.get_device_name(),
                       "rows": rows}, f, indent=2)  # fmt: skip
    checked = [row for row in rows if "max_error" in row]
    return 1 if any("tflops" not in row for row in checked) else 0


if __name__ == "__main__":
    raise SystemExit(main())
