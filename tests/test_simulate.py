"""Simulated scaling (benchmarks/simulate.py): the published qualitative results, the cost
model's breakdown and bytes, the sweep's outputs and the validation against real-run JSON."""

from __future__ import annotations

import json
import os
import sys

import pytest

from distseq.planner import Cluster, CostModel, Link, Profile, load_profile, model_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import simulate  # noqa: E402

H100 = load_profile("h100_nvlink_ib400")
SMALL = {  # the model section a CPU scaling run uses (head_dim 16)
    "vocab_size": 256,
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": None,
    "ffn_hidden": 176,
    "mixers": "softmax",
    "hybrid_ratio": "3:1",
}


def _profile(**kw) -> Profile:
    base = {
        "name": "test",
        "source": "test",
        "matmul_flops": 1e10,
        "attention_flops": 1e10,
        "linear_attention_flops": 1e10,
        "intra": Link(1e-4, 1e9),
        "inter": Link(1e-4, 1e9),
        "elem_bytes": 4,
    }
    return Profile(**{**base, **kw})


@pytest.fixture(scope="module")
def checks():
    args = simulate.parse_args([])
    return simulate.sanity_checks(args, H100)


def test_ring_hides_communication_past_the_flop_per_byte_ratio(checks):
    a = checks["ring_hidden"]
    assert a["passed"]
    for pt in a["points"]:
        # The model's crossover sits near F/B·e·Hkv/Hq (above it: the backward also moves
        # fp32 dK/dV, and every hop pays a latency) and communication is exposed below it.
        assert 1.0 <= pt["model_over_analytic"] <= 2.0, pt
        assert pt["exposed_fraction_at_half"] > 0.05, pt
    intra, inter = a["points"]
    assert inter["model_tokens_per_rank"] > 5 * intra["model_tokens_per_rank"]


def test_lasp2_never_slower_than_linear_ring_and_faster_while_hidden(checks):
    b = checks["lasp2_faster_than_ring"]
    assert b["passed"]
    speedup = {r["world"]: r["lasp2_speedup_vs_ring"] for r in b["points"]}
    assert 1 - 1e-4 < b["speedup_floor"] < 1
    assert all(s >= b["speedup_floor"] - 1e-9 for s in speedup.values())
    assert speedup[8] > 1 and speedup[64] > 1


def test_allscan_traffic_flat_in_p_and_lasp2_grows(checks):
    c = checks["allscan_bytes_flat"]
    assert c["passed"]
    scan = c["bytes_sent_per_rank"]["allscan"]
    lasp2 = c["bytes_sent_per_rank"]["lasp2"]
    hybrid = model_from_dict(simulate.model_section(simulate.CONFIGS[1]))
    state = hybrid.n_heads * hybrid.head_dim**2 * 4
    decays = hybrid.n_heads * 4  # lasp2 gathers each head's log decay beside its state
    passes = 3 * hybrid.n_layers  # fwd, recomputed fwd (activation checkpointing), bwd
    assert scan == [passes * state] * len(scan)
    assert lasp2 == [passes * (state + decays) * (w - 1) for w in c["worlds"]]


def test_breakdown_is_consistent_and_bytes_match_measured_counts():
    # CommCounter's counts at P=2, N=16k, H=8, D=64, fp32 (benchmarks/attention_sp.py): ring
    # 96.0 MiB since its dK/dV cross P-1 links (128.0 before), allgather 96.0, ulysses 64.0.
    model = model_from_dict(
        {
            "vocab_size": 8,
            "d_model": 512,
            "n_layers": 1,
            "n_heads": 8,
            "n_kv_heads": 8,
            "ffn_hidden": 8,
        }
    )
    cost = CostModel(model, _profile(), Cluster(2, 2, 2**40))
    measured = {"ring": 96.0, "allgather": 96.0, "ulysses": 64.0}
    for strategy, mib in measured.items():
        combo = (("softmax", strategy),)
        assert cost.bytes_sent(2, combo, [16384]) == mib * 2**20
        parts = cost.breakdown(2, combo, [16384])
        assert parts["compute"] <= parts["total"] <= parts["compute"] + parts["comm"] * (1 + 1e-12)
        assert parts["exposed_comm"] == pytest.approx(parts["total"] - parts["compute"])
    # ulysses does not overlap: all of its communication is exposed.
    parts = cost.breakdown(2, (("softmax", "ulysses"),), [16384])
    assert parts["exposed_comm"] == pytest.approx(parts["comm"])


def test_chain_forwards_after_the_local_kernel():
    """lasp2 hides its all-gather under a long intra-chunk part; LASP-1's ring only the head's
    send: the other P-2 hops are serial, per pass (forward, backward)."""
    model = model_from_dict(
        {"vocab_size": 8, "d_model": 64, "n_layers": 1, "n_heads": 1, "n_kv_heads": 1,
         "ffn_hidden": 8, "mixers": "linear"}
    )  # fmt: skip
    link = Link(1e-5, 1e9)
    profile = _profile(linear_attention_flops=1e6, intra=link, inter=link)
    d = 8
    cost = CostModel(model, profile, Cluster(d, d, 2**40))
    hop = sum(link.time(1, model.n_heads * model.head_dim**2 * 4))
    seq = 1 << 16
    lasp2, ring = (
        cost.breakdown(d, (("linear", s),), [seq]) for s in ("lasp2", "ring")
    )  # fmt: skip
    assert lasp2["exposed_comm"] == 0
    assert ring["total"] - lasp2["total"] == pytest.approx(2 * (d - 2) * hop)


def test_sweep_writes_curves_tables_and_plots(tmp_path):
    out = tmp_path / "sim"
    result = simulate.main(
        ["--gpus", "8,16,32", "--seqs", "32768,131072", "--tokens-per-rank", "4096",
         "--configs", simulate.CONFIGS[1], "--out", str(out)]
    )  # fmt: skip
    for name in ("simulate.json", "simulate.csv", "max_seq.csv", *result["plots"]):
        assert (out / name).stat().st_size > 0, name
    assert {"ring_crossover.png", "bytes_per_rank.png", "max_seq.png"} <= set(result["plots"])
    saved = json.loads((out / "simulate.json").read_text())
    assert saved["command"].startswith("python benchmarks/simulate.py")
    assert saved["profile"]["name"] == "h100_nvlink_ib400"
    rows = saved["rows"]
    assert {r["world"] for r in rows} == {8, 16, 32}
    assert {r["seq_len"] for r in rows if r["mode"] == "strong"} == {32768, 131072}
    # every (combo, world) point has a weak row and a strong row per length
    assert 2 * sum(r["mode"] == "weak" for r in rows) == sum(r["mode"] == "strong" for r in rows)
    for r in rows:
        if r["mode"] == "weak":
            assert r["seq_len"] == 4096 * r["world"]
        if r["world"] == r["base_world"]:
            assert r["efficiency"] == pytest.approx(1.0)
        assert r["tokens_per_s"] == pytest.approx(r["seq_len"] / r["step_time_s"])
        assert r["exposed_comm_s"] <= r["comm_s"] * (1 + 1e-9) + 1e-12
    # Memory per rank falls with P, so the longest sequence grows about linearly (ring).
    ring = {
        r["world"]: r["max_seq_len"]
        for r in saved["max_seq"]
        if r["config"] == simulate.CONFIGS[1] and r["mixer"] == "softmax"
        and r["strategy"] == "ring"
    }  # fmt: skip
    assert 1.8 * ring[8] <= ring[16] and 1.8 * ring[16] <= ring[32]


def test_usp_rows_and_where_it_beats_ring_and_ulysses():
    """7B softmax layers, 1M tokens, 8 GPUs per node: usp rows at 64 and 512 GPUs; where the
    ring can no longer hide its inter-node hops (here from 256 GPUs) usp is faster, and
    ulysses (32 query heads) cannot run at all past 32 GPUs."""
    args = simulate.parse_args(["--configs", simulate.CONFIGS[0], "--seqs", "1048576"])
    rows, _ = simulate.sweep(args, H100)
    softmax = [r for r in rows if r["mixer"] == "softmax" and r["mode"] == "strong"]
    for world, degrees in ((64, (2, 4, 8)), (512, (2, 4, 8))):
        names = {r["strategy"] for r in softmax if r["world"] == world}
        assert {f"usp:{u}" for u in degrees} <= names, names
    points = {p["world"]: p for p in simulate.usp_versus_flat(rows, simulate.CONFIGS[0], 2**20)}
    assert points[64]["ulysses_s"] is None and points[32]["ulysses_s"] is not None
    assert points[64]["speedup"] == pytest.approx(1.0, abs=0.01)  # ring hides its hops
    assert 1.5 < points[256]["speedup"] < points[512]["speedup"] < points[1024]["speedup"]
    assert simulate.usp_table(list(points.values()))[2].startswith("| 8 |")


def _real_run(tmp_path, rows) -> str:
    path = tmp_path / "scaling.json"
    path.write_text(json.dumps({"command": "synthetic", "env": {}, "rows": rows, "max_seq": []}))
    return str(path)


def test_validate_reports_errors_against_real_rows(tmp_path):
    profile = _profile()
    profile_path = tmp_path / "profile.json"
    profile.save(str(profile_path))
    rows = []
    # measured = predicted x factor, for the step time and for the bytes sent
    for world, strategy, mixer, factor, bytes_factor in (
        (1, "ring", "softmax", 1.0, 1.0),
        (2, "ring", "softmax", 1.25, 1.0),
        (2, "ulysses", "softmax", 0.8, 2.0),  # SMALL has 2 K/V heads: ulysses runs on 2
        (2, "lasp2", "linear", 1.0, 1.0),
    ):
        model = {**SMALL, "mixers": mixer}
        strategies = {"softmax": strategy, "linear": strategy if mixer == "linear" else "lasp2"}
        row = {
            "mode": "strong", "world": world, "nnodes": 1, "config": "configs/none.yaml",
            "model": model, "mixer": mixer, "strategy": strategy, "strategies": strategies,
            "seq_len": 4096, "batch": 1,
        }  # fmt: skip
        pred = simulate.predict_row(row, profile)
        row["step_time_s"] = pred["predicted_step_time_s"] * factor
        row["bytes_sent_per_rank"] = int(
            round(pred["predicted_bytes_sent_per_rank"] * bytes_factor)
        )
        rows.append(row)
    # Independent count for the ring row (2 layers, Hkv=2, D=16, fp32, P=2, 2048 tokens/rank):
    # forward K/V once, backward K/V once plus fp32 dK/dV once (P-1 hops).
    kv = 2 * 2048 * 2 * 16 * 4
    assert rows[1]["bytes_sent_per_rank"] == 2 * (kv + kv + kv)
    result = simulate.main(
        ["--validate", _real_run(tmp_path, rows), "--profile", str(profile_path),
         "--out", str(tmp_path / "val")]
    )  # fmt: skip
    errors = [r["step_time_error"] for r in result["rows"]]
    assert errors == pytest.approx([0.0, 1 / 1.25 - 1, 1 / 0.8 - 1, 0.0])
    assert result["summary"]["step_time_error"]["max_abs"] == pytest.approx(0.25)
    assert result["summary"]["step_time_error"]["within_25pct"] == 4
    # P=1 sends nothing (no error defined); the ulysses row measured twice the prediction.
    bytes_errors = [r["bytes_error"] for r in result["rows"]]
    assert bytes_errors == [None, 0.0, pytest.approx(-0.5), 0.0]
    assert result["summary"]["bytes_error"]["n"] == 3
    assert result["summary"]["bytes_error"]["max_abs"] == pytest.approx(0.5)
    assert (tmp_path / "val" / "validate.csv").stat().st_size > 0


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="does not exist"):
        simulate.model_section("configs/nope.yaml")


def test_efficiency_is_none_when_nothing_fits():
    rows = [
        {"config": "c", "mixer": "m", "strategy": "s", "mode": "strong", "seq_len": 1,
         "world": w, "fits": False, "tokens_per_s": 1.0}
        for w in (8, 16)
    ]  # fmt: skip
    simulate.add_efficiency(rows)
    assert [r["efficiency"] for r in rows] == [None, None]


def test_zigzag_linear_layers_move_two_pieces_per_rank():
    model = model_from_dict(
        {"vocab_size": 8, "d_model": 64, "n_layers": 1, "n_heads": 2, "ffn_hidden": 8,
         "mixers": "linear"}
    )  # fmt: skip
    state, decays = 2 * 32 * 32 * 4, 2 * 4  # two heads' states and log decays
    d = 4
    zigzag = CostModel(model, _profile(), Cluster(d, d, 2**40), linear_layout="zigzag")
    contiguous = CostModel(model, _profile(), Cluster(d, d, 2**40))
    for cost, pieces in ((contiguous, 1), (zigzag, 2)):
        sent = {s: cost.bytes_sent(d, (("linear", s),), [4096]) for s in ("lasp2", "ring")}
        assert sent == {
            "lasp2": 2 * (d - 1) * pieces * (state + decays),
            "ring": 2 * pieces * state,
        }
    assert [c[0][1] for c in zigzag.combos(d)] == ["lasp2", "ring"]
    # Contiguous on 2 ranks: rank 0 sends only forward, rank 1 only backward (as counted).
    pair = CostModel(model, _profile(), Cluster(2, 2, 2**40))
    assert pair.bytes_sent(2, (("linear", "allscan"),), [4096]) == state
    # Zigzag on 2 ranks: each rank hands one piece on per pass (0 -> 1, then 1 -> 0).
    pair = CostModel(model, _profile(), Cluster(2, 2, 2**40), linear_layout="zigzag")
    assert pair.bytes_sent(2, (("linear", "ring"),), [4096]) == 2 * state
    with pytest.raises(ValueError, match="allscan"):
        zigzag.group_cost(d, (("linear", "allscan"),))
    # The zigzag chain 0 -> d-1 -> 0 has twice the hops on its critical path.
    comm = {
        name: cost.breakdown(d, (("linear", "ring"),), [4096])["comm"]
        for name, cost in (("contiguous", contiguous), ("zigzag", zigzag))
    }
    assert comm["zigzag"] == pytest.approx(2 * comm["contiguous"])


def test_validate_rejects_rows_without_measurements(tmp_path):
    path = _real_run(tmp_path, [{"world": 2, "model": SMALL, "seq_len": 64}])
    with pytest.raises(ValueError, match=r"row 0 lacks \['step_time_s'\]"):
        simulate.validate(path, {0: _profile()})


def test_profile_per_world_size_only_for_validation():
    args = simulate.parse_args(["--validate", "x.json", "--profile", "2=a.json", "--profile", "b"])
    assert args.profiles == {2: "a.json", 0: "b"}
    with pytest.raises(SystemExit):
        simulate.parse_args(["--profile", "a.json", "--profile", "4=b.json"])
    with pytest.raises(SystemExit):
        simulate.parse_args(["--validate", "x.json", "--profile", "two=a.json"])
