"""Per-rank bodies of the memory tests (module-level, so the gloo pool can pickle them)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))


def planner_vs_measured(rank: int, world: int, cases: list[tuple[int, int]]) -> list[dict]:
    """benchmarks/max_seq.py's quick model (softmax, ring): for each ``(ladder index,
    length)`` the measured peak of one training step and the planner's prediction."""
    import max_seq

    trainee = max_seq.Trainee("softmax", "ring", max_seq.QUICK_MODEL)
    rows = []
    for index, length in cases:
        setting = max_seq.LADDER[index]
        measured = trainee.peak(length, setting)
        predicted = max_seq.predicted_peak(max_seq.QUICK_MODEL, world, "softmax", "ring",
                                           setting, length)  # fmt: skip
        rows.append({"setting": setting.name, "length": length, "measured": measured,
                     "predicted": predicted})  # fmt: skip
    return rows
