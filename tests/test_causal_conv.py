"""distseq.causal_conv1d under every layout x (varlen or not) x world size, forward and
backward, against a dense float64 convolution restarting at every document."""

from __future__ import annotations

import itertools

import pytest

import linear_cases
from tolerance import nan_max

FP32_TOL = 1e-5


@pytest.mark.parametrize("world", (1, 2, 3, 4))
def test_matches_dense_conv(pools, world):
    cases = []
    for layout, varlen, kernel in itertools.product(
        ("contiguous", "zigzag"), (False, True), (4, 1)
    ):
        parts = world * (2 if layout == "zigzag" else 1)
        case = {"layout": layout, "kernel": kernel, "seq": parts * 5, "seed": world,
                    "activation": "silu" if varlen else None}  # fmt: skip
        if varlen:
            case["docs"] = [parts * 3, parts * 4, 0, parts * 3]
        cases.append(case)
    results = pools(world).run(linear_cases.conv_vs_reference, cases)
    for index, case in enumerate(cases):
        worst = {k: nan_max(r[index][k] for r in results) for k in results[0][index]}
        assert nan_max(worst.values()) <= FP32_TOL, (case, worst)
