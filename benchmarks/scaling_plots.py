"""PNG plots of benchmarks/scaling.py's report (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("weak", "strong")


def _series(rows: list[dict], mode: str, key: str, nnodes: int = 1) -> dict[str, tuple]:
    """``{strategy: (worlds, values)}`` of the rows of one mode, sorted by world."""
    out: dict[str, list] = {}
    for r in rows:
        if r["mode"] == mode and r["nnodes"] == nnodes and r.get(key) is not None:
            out.setdefault(r["strategy"], []).append((r["world"], r[key]))
    return {s: tuple(zip(*sorted(points))) for s, points in out.items()}


def _panel(ax, rows, mode, key, ylabel, scale=1.0, theory_key=None):
    colors = {}
    for strategy, (worlds, values) in _series(rows, mode, key).items():
        (line,) = ax.plot(worlds, [v * scale for v in values], "o-", label=strategy)
        colors[strategy] = line.get_color()
    for strategy, (worlds, values) in _series(rows, mode, key, nnodes=2).items():
        ax.plot(worlds, [v * scale for v in values], "s", mfc="none", ms=9,
                color=colors.get(strategy), label=f"{strategy} (2 nodes)")  # fmt: skip
    if theory_key:
        for strategy, (worlds, values) in _series(rows, mode, theory_key).items():
            ax.plot(worlds, [v * scale for v in values], "--", color=colors.get(strategy),
                    alpha=0.6)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("processes P")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{mode} scaling")
    ax.grid(alpha=0.3)


def _figure(rows, key, ylabel, path, scale=1.0, theory_key=None, logy=False):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, mode in zip(axes, MODES):
        _panel(ax, rows, mode, key, ylabel, scale, theory_key)
        if logy:  # symlog: P = 1 sends 0 bytes
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylim(bottom=0)
    if axes[0].get_legend_handles_labels()[0]:  # empty e.g. for efficiency without P = 1
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(report: dict, out: Path) -> list[Path]:
    rows = report["rows"]
    paths = [out / n for n in ("scaling.png", "efficiency.png", "bytes.png", "memory.png",
                               "max_seq.png")]  # fmt: skip
    _figure(rows, "tokens_per_s", "tokens / s (slowest rank)", paths[0])
    _figure(rows, "efficiency", "scaling efficiency vs P = 1", paths[1])
    _figure(rows, "bytes_sent_per_rank", "KiB sent per rank, fwd+bwd (dashed: formula)",
            paths[2], scale=1 / 1024, theory_key="bytes_theory_per_rank", logy=True)  # fmt: skip
    _figure(rows, "peak_mem_bytes", "peak tensor memory per rank (MiB, MemTracker)", paths[3],
            scale=2**-20)  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 4.2))
    by_strategy: dict[str, list] = {}
    for m in (m for m in report["max_seq"] if m["nnodes"] == 1):
        by_strategy.setdefault(m["strategy"], []).append((m["world"], m["max_seq_len"]))
    for strategy, points in by_strategy.items():
        worlds, lengths = zip(*sorted(points))
        (line,) = ax.plot(worlds, lengths, "o-", label=strategy)
        if worlds[0] == 1:
            ax.plot(worlds, [lengths[0] * w for w in worlds], ":", color=line.get_color())
    if report["max_seq"]:
        budget = report["max_seq"][0]["budget_bytes"] / 2**20
        ax.set_title(f"longest sequence under {budget:.0f} MiB per rank (dotted: linear)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("processes P")
    ax.set_ylabel("tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[4], dpi=110)
    plt.close(fig)
    return paths
