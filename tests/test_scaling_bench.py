"""benchmarks/scaling.py end to end in quick mode (one torchrun at P = 2, tiny shapes; the
driver's P = 1 launch and the two-node launch are exercised by `python benchmarks/scaling.py`)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {
    "mode", "world", "nnodes", "config", "model", "mixer", "strategy", "strategies", "seq_len",
    "batch", "step_time_s", "tokens_per_s", "efficiency", "bytes_sent_per_rank",
    "bytes_received_per_rank", "bytes_theory_per_rank", "hidden_comm_fraction",
    "peak_mem_bytes",
}  # fmt: skip


def test_quick_run_writes_results_and_bytes_match_theory(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--quick", "--out",
           str(tmp_path), "--worlds", "2", "--modes", "weak", "--strategies", "ring",
           "lasp2"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    report = json.loads((tmp_path / "scaling.json").read_text())
    assert report["command"].startswith("python ") and "--quick" in report["command"]
    assert report["env"]["torch"] and report["env"]["backend"] == "gloo"
    rows = report["rows"]
    assert {(r["world"], r["strategy"]) for r in rows} == {(2, "ring"), (2, "lasp2")}
    for r in rows:
        assert set(r) >= ROW_KEYS, ROW_KEYS - set(r)
        assert r["step_time_s"] > 0 and r["peak_mem_bytes"] > 0
        # The counted sequence-parallel bytes are exactly the formula's.
        assert r["bytes_sent_per_rank"] == r["bytes_theory_per_rank"], r
        assert r["bytes_received_per_rank"] == r["bytes_theory_per_rank"], r
        assert r["bytes_sent_per_rank"] > 0 and r["efficiency"] is None  # no P = 1 row
        assert r["comm_ops"] > 0 and r["t_comm_s"] > 0
    assert {m["world"] for m in report["max_seq"]} == {2}
    assert all(m["max_seq_len"] > 0 for m in report["max_seq"])
    with open(tmp_path / "scaling.csv") as f:
        lines = [line for line in f if not line.startswith("#")]
    assert len(list(csv.DictReader(lines))) == len(rows)
    for name in ("scaling", "efficiency", "bytes", "memory", "max_seq"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
