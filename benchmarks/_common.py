"""Helpers shared by the benchmarks: timing, memory, and the environment they ran in."""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import time
from collections.abc import Callable

import torch


def timed(step: Callable[[], object], repeats: int, warm_up: bool = True) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``step`` (after one untimed warm-up call:
    allocator, thread pools, first-touch pages)."""
    if warm_up:
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak_rss() -> int:
    """Return freed heap memory to the OS and restart the peak-RSS counter (Linux
    ``clear_refs`` 5); returns the resident set size it starts from."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def peak_rss_since_reset() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss` (``VmHWM``)."""
    return _status_bytes("VmHWM")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(backend: str, threads_per_rank: int) -> dict:
    """What a result depends on, without the hostname."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "backend": backend,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads_per_rank": threads_per_rank,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(terse=True),
    }
