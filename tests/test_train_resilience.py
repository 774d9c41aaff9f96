"""Runs that survive: a rank killed under ``torchrun --max-restarts`` comes back by itself with
the same metrics; a damaged newest checkpoint is skipped for the previous one; checkpoints
resume at another dp / sp / engine; NaN/inf steps stop the run or are skipped; a silent
peer ends a collective after ``parallel.timeout_s``."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

import resilience_cases
import train_cases
from dist_pool import DistributedPool
from distseq.train.checkpoint import COMPLETE, read_meta, step_dirs
from test_train_launch import TORCHRUN, TRAIN, _args, _env

# Elastic runs reshard the same weights over other ranks: float sums in another order. A small
# lr keeps Adam's sign-like first updates of rounding-level gradients below this (as in
# test_train_e2e).
ELASTIC_TOL = 1e-5
SMALL_LR = "train.lr=2e-5"


def run(pools, world: int, overrides: list[str]) -> dict:
    return pools(world).run(resilience_cases.run_with_warnings, overrides, timeout=300)[0]


def _records(out_dir: Path) -> list[dict]:
    """metrics.jsonl's complete lines (the last may be half-written while a run goes on)."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _close(got: list[float], want: list[float], rel: float) -> bool:
    return len(got) == len(want) and all(
        abs(a - b) <= rel * abs(b) for a, b in zip(got, want, strict=True)
    )


def _kill_a_worker(agent: psutil.Process) -> int:
    """SIGKILL the rank-0 worker under the torchrun ``agent`` (the one writing metrics)."""
    for child in agent.children(recursive=True):
        try:
            if TRAIN in " ".join(child.cmdline()) and child.environ().get("RANK") == "0":
                os.kill(child.pid, signal.SIGKILL)
                return child.pid
        except psutil.Error:  # a helper process that just exited
            continue
    raise AssertionError(f"no rank-0 worker under torchrun pid {agent.pid}")


def _kill_tree(proc: subprocess.Popen) -> None:
    """End a torchrun agent and its workers (a failed test must not leave them running)."""
    try:
        agent = psutil.Process(proc.pid)
        for child in [*agent.children(recursive=True), agent]:
            child.kill()
    except psutil.Error:
        pass
    proc.wait()


def test_killed_rank_restarts_with_the_same_metrics(tmp_path):
    """checkpoint.every=2 under ``torchrun --max-restarts 1``: rank 0 is SIGKILLed once step 5
    is logged; the job restarts itself from the newest complete checkpoint and its metrics
    for every step equal an uninterrupted run's."""
    overrides = ["train.steps=10", "parallel.dp=1", "parallel.sp=2", "checkpoint.every=2",
                 "parallel.timeout_s=60"]  # fmt: skip
    torchrun = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", "--max-restarts", "1", TRAIN]
    # Restarted workers must not meet in the previous attempt's store (pytorch/pytorch#135712).
    env = {**_env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

    def launch(out_dir: Path) -> tuple[subprocess.Popen, Path]:
        log = out_dir.with_suffix(".log")
        with open(log, "w") as sink:
            proc = subprocess.Popen([*torchrun, *_args(out_dir, overrides)],
                                    stdout=sink, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        return proc, log

    reference, reference_log = launch(tmp_path / "reference")
    faulty, log = launch(tmp_path / "faulty")
    killed, deadline = None, time.monotonic() + 400
    while faulty.poll() is None and time.monotonic() < deadline:
        if killed is None and any(r["step"] >= 5 for r in _records(tmp_path / "faulty")):
            killed = _kill_a_worker(psutil.Process(faulty.pid))
        time.sleep(0.02)
    for proc in (faulty, reference):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            _kill_tree(proc)
    output = log.read_text()
    assert killed is not None, "the run finished before a worker could be killed:\n" + output
    assert faulty.returncode == 0, output[-4000:]
    assert reference.returncode == 0, reference_log.read_text()[-4000:]
    assert "resuming from" in output, output[-4000:]
    got, want = _records(tmp_path / "faulty"), _records(tmp_path / "reference")
    assert [r["step"] for r in got] == list(range(1, 11)), [r["step"] for r in got]
    assert _close([r["loss"] for r in got], [r["loss"] for r in want], 1e-6), (got, want)
    assert [r["lr"] for r in got] == [r["lr"] for r in want]


def test_damaged_newest_checkpoint_falls_back_with_a_warning(pools, tmp_path):
    common = ["train.steps=4", "parallel.dp=1", "parallel.sp=2", "checkpoint.every=2",
              f"out_dir={tmp_path}"]  # fmt: skip
    full = run(pools, 2, common)
    assert full["warnings"] == [], full["warnings"]  # a fresh start under resume=auto
    root = tmp_path / "checkpoints"
    assert [p.name for p in step_dirs(root)] == ["step_4", "step_2"]
    step_4 = root / "step_4"
    shard = next((step_4 / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    resumed = run(pools, 2, common)
    assert any("step_4" in w and "bytes" in w for w in resumed["warnings"]), resumed["warnings"]
    assert [r["step"] for r in resumed["history"]] == [3, 4]
    assert resumed["losses"] == pytest.approx(full["losses"][2:], rel=1e-6)
    # metrics.jsonl holds every step once: the re-run steps replaced the later records.
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4]
    # The resumed run rewrote step_4: now a deleted file, then an unfinished save (no marker).
    for damage, word in (((step_4 / "dcp" / ".metadata").unlink, "missing"),
                         ((step_4 / COMPLETE).unlink, COMPLETE)):  # fmt: skip
        damage()
        again = run(pools, 2, common)
        assert any("step_4" in w and word in w for w in again["warnings"]), again["warnings"]
        assert again["losses"] == pytest.approx(full["losses"][2:], rel=1e-6)
    # With no complete checkpoint left, auto starts afresh (warning about each).
    for path in step_dirs(root):
        (path / COMPLETE).unlink()
    fresh = run(pools, 2, common)
    assert sum("skipping checkpoint" in w for w in fresh["warnings"]) == 2, fresh["warnings"]
    assert fresh["losses"] == pytest.approx(full["losses"], rel=1e-6)


def test_keep_last_and_latest(pools, tmp_path):
    common = ["train.steps=4", "parallel.dp=1", "parallel.sp=2", "checkpoint.every=1",
              "checkpoint.keep_last=2", f"out_dir={tmp_path}"]  # fmt: skip
    run(pools, 2, common)
    assert [p.name for p in step_dirs(tmp_path / "checkpoints")] == ["step_4", "step_3"]
    messages = pools(2).run(
        train_cases.resume_error,
        [*common, "checkpoint.resume=latest", f"checkpoint.dir={tmp_path}/none"],
    )
    assert all("resume=latest" in m and "no complete checkpoint" in m for m in messages)
    # Finished runs resume at their last step and have nothing left to do.
    assert run(pools, 2, [*common, "checkpoint.resume=latest"])["history"] == []


def test_elastic_resume_sp2_to_sp1_and_sp4(pools, tmp_path):
    common = ["train.steps=4", SMALL_LR, "checkpoint.every=2", "checkpoint.resume=none"]
    full = run(pools, 2, [*common, "parallel.dp=1", "parallel.sp=2", f"out_dir={tmp_path}/sp2"])
    step_2 = f"checkpoint.resume={tmp_path}/sp2/checkpoints/step_2"
    for world, dp, sp in ((1, 1, 1), (4, 1, 4), (4, 2, 2)):
        layout = [f"parallel.dp={dp}", f"parallel.sp={sp}", f"out_dir={tmp_path}/{dp}x{sp}"]
        resumed = run(pools, world, [*common, *layout, step_2])
        assert [r["step"] for r in resumed["history"]] == [3, 4]
        assert _close(resumed["losses"], full["losses"][2:], ELASTIC_TOL), (dp, sp, resumed)


def test_elastic_fsdp_dp2_to_dp1_and_to_ddp(pools, tmp_path):
    common = ["train.steps=4", SMALL_LR, "checkpoint.every=2", "parallel.engine=fsdp"]
    full = run(pools, 2, [*common, "parallel.dp=2", "parallel.sp=1", f"out_dir={tmp_path}/dp2"])
    step_2 = f"checkpoint.resume={tmp_path}/dp2/checkpoints/step_2"
    for world, engine in ((1, "fsdp"), (2, "ddp")):
        layout = [f"parallel.engine={engine}", "parallel.dp=1", f"parallel.sp={world}"]
        resumed = run(pools, world, [*common, *layout, f"out_dir={tmp_path}/{engine}", step_2])
        assert _close(resumed["losses"], full["losses"][2:], ELASTIC_TOL), (engine, resumed)


def test_resume_refuses_what_cannot_be_resharded(pools, tmp_path):
    common = ["train.steps=2", "parallel.dp=1", "parallel.sp=2", "checkpoint.every=2",
              f"out_dir={tmp_path}"]  # fmt: skip
    run(pools, 2, common)
    messages = pools(2).run(train_cases.resume_error, [*common, "train.seed=1"])
    assert all("train.seed: saved 0, now 1" in m for m in messages), messages
    # DeepSpeed's own format is not DCP: refused before any process-group work.
    cfg = train_cases.build_config(common, 2)
    cfg.parallel.engine = "deepspeed"
    with pytest.raises(ValueError, match="state format: saved 'torch.distributed.checkpoint'"):
        read_meta(tmp_path / "checkpoints" / "step_2", cfg)


def test_nonfinite_step_stops_or_is_skipped(pools, tmp_path):
    common = ["train.steps=4", "parallel.dp=1", "parallel.sp=2", f"out_dir={tmp_path}"]
    stopped = pools(2).run(resilience_cases.nonfinite_steps, common, [2])
    for result in stopped:
        assert result["at_step"] == 2 and len(result["records"]) == 1, result
        assert "step 2: non-finite loss nan" in result["error"], result["error"]
        assert "train.skip_nonfinite=0" in result["error"]
    skipping = [*common, "train.skip_nonfinite=1"]
    result = pools(2).run(resilience_cases.nonfinite_steps, skipping, [2])[0]
    records, snapshots = result["records"], result["snapshots"]
    assert [r["skipped"] for r in records] == [False, True, False, False]
    assert math.isnan(records[1]["loss"]) and all(math.isfinite(r["loss"]) for r in records[2:])
    assert any("step 2: non-finite loss nan; step skipped" in w for w in result["warnings"])
    # snapshots[k] is after step k: step 2 changed nothing, steps 1 and 3 did.
    for name, value in snapshots[1]["params"].items():
        assert torch.equal(snapshots[2]["params"][name], value), name
    assert any(
        not torch.equal(snapshots[3]["params"][n], v) for n, v in snapshots[2]["params"].items()
    )
    assert snapshots[2]["optimizer_steps"] == snapshots[1]["optimizer_steps"] != []
    # Two in a row exceed skip_nonfinite=1.
    twice = pools(2).run(resilience_cases.nonfinite_steps, skipping, [2, 3])[0]
    assert twice["at_step"] == 3 and "2 such step(s) in a row" in twice["error"], twice


def test_silent_peer_times_out_instead_of_hanging():
    """The mesh's groups carry parallel.timeout_s (torch's default for new groups is 30 min)."""
    pool = DistributedPool(2)
    try:
        elapsed, error = pool.run(resilience_cases.silent_peer, 1.0, timeout=60)[0]
    finally:
        pool.close(force=True)
    assert error and elapsed < 10, (elapsed, error)


@pytest.mark.parametrize(
    ("override", "key"),
    (
        ("checkpoint.keep_last=-1", "checkpoint.keep_last=-1"),
        ("parallel.timeout_s=0", "parallel.timeout_s=0"),
        ("train.skip_nonfinite=-2", "train.skip_nonfinite=-2"),
        ("checkpoint.resume=''", "checkpoint.resume=''"),
    ),
)
def test_bad_resilience_values_name_their_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        train_cases.build_config([override], 1)


def test_deepspeed_refuses_skip_nonfinite():
    pytest.importorskip("deepspeed")
    with pytest.raises(ValueError, match="skip_nonfinite=1 with parallel.engine=deepspeed"):
        train_cases.build_config(["parallel.engine=deepspeed", "train.skip_nonfinite=1"], 1)
