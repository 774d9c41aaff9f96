"""A step's tokens do not depend on the parallel layout: with the fixed ``data.pad_multiple``
every dp / sp / layout / engine trains on the same global batch, so the losses agree at every
step (not only while the layout's own padding happens to pack the same documents)."""

from __future__ import annotations

import math

import pytest

import train_cases
from distseq.train.config import DataConfig

STEPS = 5
REL_TOL = 1e-5
# (label, world size, overrides); the reference is dp=1 sp=1 zigzag DDP.
RUNS = (
    ("sp=2", 2, ["parallel.sp=2"]),
    ("sp=4", 4, ["parallel.sp=4"]),
    ("dp=2", 2, ["parallel.dp=2", "parallel.sp=1"]),
    ("sp=2 contiguous", 2, ["parallel.sp=2", "parallel.layout=contiguous"]),
)


def test_pad_multiple_default_is_fixed_and_layouts_must_divide_it():
    assert DataConfig().pad_multiple == 64
    cfg = train_cases.build_config(["data.pad_multiple=64", "parallel.sp=4"], 4)
    assert cfg.data.pad_multiple == 64  # not replaced by the layout's 8
    with pytest.raises(ValueError, match=r"data\.pad_multiple=12 .*parallel\.sp=4.*zigzag"):
        train_cases.build_config(["data.pad_multiple=12", "data.seq_len=120"], 4)
    with pytest.raises(ValueError, match=r"data\.seq_len=100 .*data\.pad_multiple=8"):
        train_cases.build_config(["data.seq_len=100"], 2)


def test_losses_agree_at_every_step_for_any_layout(pools, tmp_path):
    # The default pad_multiple (padding to the layout's 2 or 8 instead would fit a third
    # 20..40-token document into some 128-token sequences and shift every later step).
    # A small lr keeps Adam's sign-like first updates from amplifying rounding (see e2e).
    common = [f"train.steps={STEPS}", "train.lr=2e-5", "data.pad_multiple=64",
              "data.recall.min_len=20", "data.recall.max_len=40"]  # fmt: skip
    ref = pools(1).run(train_cases.losses_only,
                       [*common, "parallel.dp=1", "parallel.sp=1", f"out_dir={tmp_path}/ref"],
                       timeout=300)[0]  # fmt: skip
    assert len(ref) == STEPS and all(math.isfinite(x) for x in ref), ref
    for label, world, overrides in RUNS:
        out = f"out_dir={tmp_path}/{label.replace(' ', '_')}"
        got = pools(world).run(train_cases.losses_only, [*common, *overrides, out],
                               timeout=300)[0]  # fmt: skip
        assert got == pytest.approx(ref, rel=REL_TOL), f"{label}: {got} != {ref}"
