"""The launcher as users run it: plain python, torchrun as two "nodes" on 127.0.0.1, and the
DeepSpeed engine; every run's metrics.jsonl is checked against the in-process trainer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import train_cases

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
REQUIRED = ("step", "loss", "tokens_per_s", "tokens_per_s_per_rank", "peak_mem_bytes")


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metrics(out_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and all(key in r for r in records for key in REQUIRED), records
    return records


def _args(out_dir: Path, overrides: list[str]) -> list[str]:
    return ["--config", train_cases.TINY, *train_cases.SMALL, f"out_dir={out_dir}", *overrides]


def _assert_losses(records: list[dict], expected: list[float]) -> None:
    got = [r["loss"] for r in records]
    assert len(got) == len(expected)
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, expected)), (got, expected)


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_plain_python_single_process(pools, tmp_path):
    overrides = ["train.steps=2"]
    proc = subprocess.run(
        [sys.executable, TRAIN, *_args(tmp_path, overrides)],
        check=False, capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    _check(proc)
    assert "step 2 loss" in proc.stdout
    expected = pools(1).run(train_cases.losses_only, [*overrides, f"out_dir={tmp_path}/ref"])[0]
    _assert_losses(_metrics(tmp_path), expected)


@pytest.mark.slow
def test_two_node_rendezvous(pools, tmp_path):
    """Two torchrun agents (one process each) meet through c10d rendezvous on 127.0.0.1."""
    overrides = ["train.steps=3", "parallel.dp=1", "parallel.sp=2"]
    port = _free_port()
    rendezvous = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "distseq-test"]  # fmt: skip
    command = [*TORCHRUN, *rendezvous, TRAIN, *_args(tmp_path, overrides)]
    agents = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()
        )
        for _ in range(2)
    ]
    try:
        outputs = [agent.communicate(timeout=400)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert all(agent.returncode == 0 for agent in agents), "\n".join(o[-3000:] for o in outputs)
    expected = pools(2).run(train_cases.losses_only, [*overrides, f"out_dir={tmp_path}/ref"])[0]
    _assert_losses(_metrics(tmp_path), expected)


@pytest.mark.slow
@pytest.mark.parametrize("stage", (1, 3))
def test_deepspeed_zero_matches_ddp(pools, tmp_path, stage):
    """ZeRO-1/3 on 2 gloo CPU ranks: same losses as DDP; ZeRO-3 also saves and resumes."""
    overrides = ["train.steps=3", "parallel.dp=1", "parallel.sp=2", "parallel.engine=deepspeed",
                 f"parallel.zero_stage={stage}", "checkpoint.every=2"]  # fmt: skip
    command = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", TRAIN]
    proc = subprocess.run(
        [*command, *_args(tmp_path, overrides)],
        check=False, capture_output=True, text=True, env=_env(), timeout=500,
    )  # fmt: skip
    _check(proc)
    ddp = [*overrides[:3], f"out_dir={tmp_path}/ddp"]
    expected = pools(2).run(train_cases.losses_only, ddp)[0]
    _assert_losses(_metrics(tmp_path), expected)
    if stage == 3:
        resume = [*overrides, f"checkpoint.resume={tmp_path}/checkpoints/step_2"]
        (tmp_path / "metrics.jsonl").unlink()
        proc = subprocess.run(
            [*command, *_args(tmp_path, resume)],
            check=False, capture_output=True, text=True, env=_env(), timeout=500,
        )  # fmt: skip
        _check(proc)
        _assert_losses(_metrics(tmp_path), expected[2:])


def test_adaptive_document_that_fits_nowhere_exits_with_one_line(tmp_path):
    overrides = ["planner=adaptive", "adaptive.memory=1MiB"]
    proc = subprocess.run(
        [sys.executable, TRAIN, *_args(tmp_path, overrides)],
        check=False, capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "launch/train.py: error on rank 0: sequence" in proc.stderr, proc.stderr[-3000:]
    assert "fits no group" in proc.stderr and "Traceback" not in proc.stderr
