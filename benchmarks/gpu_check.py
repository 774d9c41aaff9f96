"""``make gpu-check``: every CUDA test, then the kernel benchmarks, on one GPU, into one JSON.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--budget 480]

Needs only torch (with CUDA) and triton installed, and no network; pytest (and, for the
optional backends, flash-attn / flash-linear-attention) are used where importable: install
pure-Python ones from wheels carried along (see README, "GPU check"). Steps, each bounded by
what is left of ``--budget`` seconds (default 8 minutes):

1. the environment: device, torch / CUDA / cuDNN / Triton versions, which fused kernels this
   build has, and what the ``auto`` backends resolve to in bfloat16;
2. builds ``distseq._C`` in place with its CUDA merge kernel (where ``nvcc`` is found);
3. the CUDA tests: tests/test_kernels_cuda.py (the ``torch`` backend's fused flash / cuDNN
   paths vs float64, fp32 fallback, sync-free layers, CUDA merge, linear backends incl. fla),
   tests/test_kernels.py (flash-attn and Triton attention blocks) and
   tests/test_linear_triton.py (Triton linear kernels);
4. benchmarks/kernels.py and benchmarks/linear_kernels.py: TFLOP/s per backend side by side.

Exits 1 when a step failed (a failing test, a benchmark error), 0 otherwise; the JSON has
every step's outcome either way.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CUDA_TESTS = ["tests/test_kernels_cuda.py", "tests/test_kernels.py", "tests/test_linear_triton.py"]


def environment() -> dict:
    """What this machine and this torch build offer (no kernels run)."""
    from distseq.kernels import describe_backends

    env = {"python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.version.cuda, "gpu": None}  # fmt: skip
    if torch.cuda.is_available():
        env |= {
            "gpu": torch.cuda.get_device_name(),
            "capability": list(torch.cuda.get_device_capability()),
            "cudnn": torch.backends.cudnn.version(),
            "torch_flash_attention": torch.backends.cuda.is_flash_attention_available(),
            "backends_bf16": describe_backends(
                "auto", "auto", torch.device("cuda"), torch.bfloat16
            ),  # fmt: skip
        }
    for module in ("triton", "flash_attn", "fla", "pytest"):
        try:
            env[module] = getattr(importlib.import_module(module), "__version__", "importable")
        except Exception as exc:  # fla raises more than ImportError without a driver
            env[module] = f"not importable ({type(exc).__name__})"
    return env


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env=env)  # fmt: skip
        result = {"returncode": done.returncode, "output_tail": (done.stdout + done.stderr)[-4000:]}
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        result = {"returncode": "timeout", "output_tail": out[-4000:]}
    result |= {"cmd": " ".join(cmd), "seconds": round(time.monotonic() - start, 1)}
    return result


def build_extension(timeout: float) -> dict:
    if shutil.which("nvcc") is None:
        return {"skipped": "nvcc not found: the CUDA merge test will skip"}
    env = dict(os.environ, DISTSEQ_BUILD_CUDA="1")
    return _run([sys.executable, "setup.py", "build_ext", "--inplace"], timeout, env)


def _junit_summary(path: Path) -> dict:
    """Counts per outcome and every failure's test id and message."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures, skips = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")),
                       None)  # fmt: skip
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            reason = (outcome.get("message") or "")[:200]
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["failed"] += 1
            failures.append({"test": name, "message": (outcome.get("message") or "")[:1000]})
    return counts | {"failures": failures, "skip_reasons": skips}


def run_tests(timeout: float) -> dict:
    try:
        importlib.import_module("pytest")
    except ImportError:
        return {"skipped": "pytest is not installed: pip install --no-index --find-links "
                "wheels/ pytest (see README, GPU check)"}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", *CUDA_TESTS, "-q", "-p", "no:cacheprovider",
               f"--junitxml={report}"]  # fmt: skip
        result = _run(cmd, timeout, dict(os.environ, PYTHONPATH=str(ROOT)))
        if report.exists():
            result |= _junit_summary(report)
    return result


def run_benchmark(script: str, args: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, f"benchmarks/{script}", *args, "--json", str(out)]
        result = _run(cmd, timeout, dict(os.environ, PYTHONPATH=str(ROOT)))
        if out.exists():
            result["results"] = json.loads(out.read_text())
    return result


def _print_tables(report: dict) -> None:
    attention = report["steps"].get("attention_kernels", {}).get("results", {}).get("rows", [])
    if attention:
        print("\nattention fwd+bwd, TFLOP/s per backend:")
        seqs = sorted({row["seq"] for row in attention})
        names = list(dict.fromkeys(row["backend"] for row in attention))
        print(f"{'seq':>7} " + " ".join(f"{name:>9}" for name in names))
        for seq in seqs:
            cells = {row["backend"]: row["tflops"] for row in attention if row["seq"] == seq}
            print(f"{seq:>7} " + " ".join(f"{cells.get(n, float('nan')):>9.1f}" for n in names))
    linear = report["steps"].get("linear_kernels", {}).get("results", {}).get("rows", [])
    if linear:
        print("\nlinear attention fwd+bwd, TFLOP/s per backend:")
        for row in linear:
            value = f"{row['tflops']:.2f}" if "tflops" in row else f"skipped ({row['skipped']})"
            print(f"  {row['backend']:<8} {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu_check.json"))
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all steps")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget
    report: dict = {"environment": environment(), "steps": {}}
    print(json.dumps(report["environment"], indent=2))
    if not torch.cuda.is_available():
        print("gpu-check: CUDA is not available; nothing to check (exit 1)")
        report["error"] = "CUDA is not available"
        Path(args.out).write_text(json.dumps(report, indent=2))
        return 1
    # Each step's share of the budget; a step never runs past what is left.
    steps = [
        ("build_extension", 100, build_extension),
        ("cuda_tests", 200, run_tests),
        ("attention_kernels", 90, lambda t: run_benchmark(
            "kernels.py", ["--seq", "4096", "8192", "--repeats", "10"], t)),
        ("linear_kernels", 60, lambda t: run_benchmark("linear_kernels.py", ["--seq", "16384"], t)),
    ]  # fmt: skip
    for name, share, step in steps:
        left = deadline - time.monotonic()
        if left < 10:
            report["steps"][name] = {"skipped": "out of time budget"}
            continue
        print(f"\n== {name} (at most {min(share, left):.0f} s)", flush=True)
        report["steps"][name] = step(min(share, left))
        summary = {k: v for k, v in report["steps"][name].items() if k != "results"}
        print(json.dumps(summary, indent=2)[-3000:], flush=True)
    _print_tables(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    failed = [name for name, step in report["steps"].items()
              if step.get("returncode") not in (None, 0)]  # fmt: skip
    if failed:
        print(f"gpu-check: failed steps: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
