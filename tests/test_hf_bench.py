"""benchmarks/hf_sp.py end to end on a tiny Llama (sp = 1, 2): every row is the same loss as
the unpatched model, and the counted bytes are the formula's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_matches_unpatched_loss_and_traffic(tmp_path):
    out = tmp_path / "hf_sp.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "hf_sp.py"), "--seq", "64", "--hidden",
           "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", "128",
           "--sps", "1", "2", "--repeats", "1", "--json", str(out)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert {(r["sp"], r["strategy"]) for r in rows} == {
        (1, "ring"),
        (2, "ring"),
        (2, "ulysses"),
        (2, "allgather"),
    }
    for r in rows:
        assert r["loss_rel_diff"] <= 1e-5, r  # a NaN fails too
        assert r["bytes_sent"] == r["formula_bytes"], r
        assert (r["bytes_sent"] > 0) == (r["sp"] > 1), r
        assert r["t_sp"] > 0 and r["ratio"] > 0 and r["peak_tensor_bytes"] > 0, r
    table = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == len(rows) + 1  # the header and one line per row
