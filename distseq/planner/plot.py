"""The dry-run picture: a Gantt chart of a plan's groups over ranks, and the length histogram."""

from __future__ import annotations

import numpy as np

from distseq.planner.lengths import LengthDistribution
from distseq.planner.plan import Plan


def plot_plan(plan: Plan, dist: LengthDistribution | None, path: str) -> None:
    """Write a PNG: left, each group as a bar over its ranks for its predicted time (micro-steps
    one after another); right, the histogram of lengths (corpus and this batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gantt, hist) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.get_cmap("tab10")
    strategies = sorted({g.strategy for m in plan.micro_steps for g in m.groups})
    offset = 0.0
    for m in plan.micro_steps:
        for g in m.groups:
            color = colors(strategies.index(g.strategy) % 10)
            gantt.broken_barh(
                [(offset, g.predicted_time_s)],
                (g.ranks[0], g.degree),
                facecolors=color,
                edgecolors="black",
                linewidth=0.4,
            )
            if g.degree >= max(1, plan.world_size // 32):
                gantt.text(
                    offset + g.predicted_time_s / 2,
                    g.ranks[0] + g.degree / 2,
                    f"d={g.degree} n={len(g.sequences)}",
                    ha="center",
                    va="center",
                    fontsize=7,
                )
        offset += m.predicted_time_s
        gantt.axvline(offset, color="grey", linestyle=":", linewidth=0.8)
    gantt.axvline(plan.lower_bound_s, color="red", linestyle="--", linewidth=1, label="lower bound")
    gantt.axvline(
        plan.static_best.predicted_step_time_s,
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"static d={plan.static_best.degree} {plan.static_best.strategy}",
    )
    for i, s in enumerate(strategies):
        gantt.bar(0, 0, color=colors(i % 10), label=s)
    gantt.set_xlim(0, 1.05 * max(offset, plan.static_best.predicted_step_time_s))
    gantt.set_xlabel("predicted time (s)")
    gantt.set_ylabel("rank")
    gantt.set_ylim(plan.world_size, 0)
    gantt.set_title(
        f"{len(plan.lengths)} sequences on {plan.world_size} ranks: "
        f"{plan.predicted_step_time_s:.3g} s ({len(plan.micro_steps)} micro-step(s))"
    )
    gantt.legend(fontsize=7, loc="lower right")
    lengths = np.asarray(plan.lengths)
    top = max(lengths.max(), dist.lengths.max() if dist is not None else 0)
    bins = np.geomspace(max(1, min(lengths.min(), top) // 2), top * 1.1, 50)
    if dist is not None:
        hist.hist(
            dist.lengths,
            bins=bins,
            weights=dist.counts / dist.counts.sum(),
            alpha=0.5,
            label="corpus",
        )
    hist.hist(
        lengths,
        bins=bins,
        weights=np.full(lengths.size, 1 / lengths.size),
        alpha=0.5,
        label="this batch",
    )
    hist.set_xscale("log")
    hist.set_xlabel("sequence length (tokens)")
    hist.set_ylabel("fraction of documents")
    hist.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
