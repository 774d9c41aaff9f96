"""Simulated scaling: the calibrated cost model's curves for 8-1024 GPUs, checked two ways.

    python benchmarks/simulate.py [--profile h100_nvlink_ib400] [--out benchmarks/results/simulate]
    python benchmarks/simulate.py --validate scaling.json [--profile P.json | --calibrate-per-world]
    python benchmarks/simulate.py --validate scaling.json --profile 2=P2.json --profile 8=P8.json

Default run: for each model config (``--configs``) and layer type (softmax / linear / hybrid:
the config's ``model:`` section with ``mixers`` replaced), each feasible strategy and each world
size P (one sequence-parallel group of all P GPUs, 8 per node, ``--memory`` per GPU):

- strong scaling: one sequence of 32k ... 8M tokens; weak scaling: ``--tokens-per-rank`` x P;
- per point: step time (forward + backward of one sequence), tokens/s, efficiency (tokens/s
  per GPU relative to the smallest P where the point fits; under weak scaling softmax work
  per token grows with P, so also ``compute_fraction`` = compute / step), compute time,
  communication on the critical path, exposed communication, bytes sent per rank, memory per
  rank;
- the longest sequence that fits the per-GPU memory, per strategy and P;
- sanity checks of the model against published qualitative results (printed and returned).

Everything comes from :class:`distseq.planner.CostModel` (``breakdown``, ``bytes_sent``,
``GroupCost.memory``/``capacity``); this script adds no formula of its own except the
textbook ring-attention ratio it compares the model with. Output: ``simulate.json`` (command,
profile, settings, rows, max_seq, sanity), ``simulate.csv``, ``max_seq.csv`` and PNG plots.

``--validate`` predicts each row of a real-run JSON (``benchmarks/scaling.py``) with a profile
measured on this machine and prints predicted vs measured step time and bytes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time

import numpy as np

from distseq.memory.config import PLAIN, MemoryConfig, memory_config_from_yaml
from distseq.planner import Cluster, CostModel, Profile, load_profile, model_from_dict
from distseq.planner.cost import combo_name
from distseq.planner.spec import LAYER_TYPES, config_flag
from distseq.planner.units import format_bytes, parse_bytes
from distseq.strategies import REGISTRY_BY_MIXER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("configs/llama_7b_512k_64gpu.yaml", "configs/hybrid_1b_128k_8gpu.yaml")
MIXERS = ("softmax", "linear", "hybrid")
GPUS = tuple(2**k for k in range(3, 11))  # 8 ... 1024
SEQS = tuple(2**k for k in range(15, 24))  # 32k ... 8M
# Where the plots look at one sequence length.
PLOT_SEQ = 2**20


# ----------------------------------------------------------------------------- models
def model_section(config: str) -> dict:
    """The ``model:`` section of a training config (a plain dict)."""
    from omegaconf import OmegaConf

    path = config if os.path.isabs(config) else os.path.join(ROOT, config)
    if not os.path.isfile(path):
        raise ValueError(f"config {config!r} does not exist; pass e.g. {CONFIGS[0]}")
    section = OmegaConf.to_container(OmegaConf.load(path), resolve=True).get("model")
    if not isinstance(section, dict):
        raise ValueError(f"{config} has no model: section")
    return section


def with_mixer(section: dict, mixer: str):
    """The model of ``section`` with every layer's mixer set by ``mixer`` (softmax / linear /
    hybrid at the section's ``hybrid_ratio``)."""
    return model_from_dict({**section, "mixers": mixer})


def combo_of(model, strategies: dict[str, str]):
    """The cost model's strategy choice for the model's layer types."""
    return tuple((t, strategies.get(t, REGISTRY_BY_MIXER[t].default)) for t in model.layer_types)


def layout_of(mixer: str) -> str:
    """distseq runs one layout per model: zigzag balances causal softmax work (hybrid, as in
    configs/hybrid_1b_128k_8gpu.yaml, which rules out allscan), contiguous for linear only."""
    return "contiguous" if mixer == "linear" else "zigzag"


def cost_model(
    model, profile: Profile, world: int, gpus_per_node: int, memory: int, ckpt: bool,
    layout: str = "contiguous", savers: MemoryConfig = PLAIN,
) -> CostModel:  # fmt: skip
    cluster = Cluster(world, gpus_per_node, memory)
    return CostModel(model, profile, cluster, activation_checkpointing=ckpt, linear_layout=layout,
                     memory=savers)  # fmt: skip


def point(cost: CostModel, combo, lengths: list[int]) -> dict:
    """Predictions for one group of all ranks of ``cost``'s cluster running ``lengths``."""
    d = cost.cluster.world_size
    kind = cost.group_cost(d, combo)
    parts = cost.breakdown(d, combo, lengths)
    tokens = float(np.sum(lengths))
    padded_tokens = float(np.sum(-(-np.asarray(lengths) // (2 * d)) * (2 * d)))
    memory = float(kind.memory(padded_tokens))
    return {
        "step_time_s": parts["total"],
        "tokens_per_s": tokens / parts["total"],
        "compute_s": parts["compute"],
        "comm_s": parts["comm"],
        "exposed_comm_s": parts["exposed_comm"],
        "compute_fraction": parts["compute"] / parts["total"],
        "hidden_comm_fraction": 1 - parts["exposed_comm"] / parts["comm"] if parts["comm"] else 1,
        "bytes_sent_per_rank": cost.bytes_sent(d, combo, lengths),
        "memory_per_rank": memory,
        "fits": memory <= cost.cluster.memory_bytes,
    }


def max_seq(cost: CostModel, combo) -> int:
    """Longest single sequence (a multiple of ``2P``) whose memory per rank fits."""
    d = cost.cluster.world_size
    unit = 2 * d if d > 1 else 1
    capacity = cost.group_cost(d, combo).capacity(cost.cluster.memory_bytes)
    return int(capacity // unit) * unit


# ----------------------------------------------------------------------------- sweep
def sweep(args, profile: Profile) -> tuple[list[dict], list[dict]]:
    rows, longest = [], []
    for config in args.configs:
        section = model_section(config)
        ckpt = config_flag(os.path.join(ROOT, config), "train.activation_checkpointing")
        savers = memory_config_from_yaml(os.path.join(ROOT, config))  # its memory: section
        for mixer in MIXERS:
            model = with_mixer(section, mixer)
            for world in args.gpus:
                cost = cost_model(model, profile, world, args.gpus_per_node, args.memory, ckpt,
                                  layout_of(mixer), savers)  # fmt: skip
                for combo in cost.combos(world):
                    base = {
                        "config": config,
                        "mixer": mixer,
                        "strategy": combo_name(combo),
                        "strategies": dict(combo),
                        "layout": layout_of(mixer),
                        "world": world,
                        "nnodes": max(1, world // args.gpus_per_node),
                        "activation_checkpointing": ckpt,
                    }
                    for seq in args.seqs:
                        rows.append({**base, "mode": "strong", "seq_len": seq, "batch": 1})
                        rows[-1].update(point(cost, combo, [seq]))
                    seq = args.tokens_per_rank * world
                    rows.append({**base, "mode": "weak", "seq_len": seq, "batch": 1})
                    rows[-1].update(point(cost, combo, [seq]))
                    longest.append({**base, "max_seq_len": max_seq(cost, combo)})
    add_efficiency(rows)
    return rows, longest


def add_efficiency(rows: list[dict]) -> None:
    """Tokens/s per GPU relative to the smallest world size where the same point fits."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["config"], r["mixer"], r["strategy"], r["mode"])
        key += (r["seq_len"],) if r["mode"] == "strong" else ()
        groups.setdefault(key, []).append(r)
    for members in groups.values():
        fitting = [r for r in members if r["fits"]]
        base = min(fitting, key=lambda r: r["world"]) if fitting else None
        for r in members:
            ok = base is not None and r["fits"]
            r["base_world"] = base["world"] if base else None
            r["efficiency"] = (
                r["tokens_per_s"] / r["world"] / (base["tokens_per_s"] / base["world"])
                if ok
                else None
            )


# ----------------------------------------------------------------------------- sanity checks
def ring_crossover(cost: CostModel, combo) -> int:
    """Smallest even tokens-per-rank at which the ring's communication is fully hidden
    (exposed communication <= 1e-9 of the step), by bisection on a monotone quantity."""
    d = cost.cluster.world_size

    def hidden(per_rank: int) -> bool:
        parts = cost.breakdown(d, combo, [per_rank * d])
        return parts["exposed_comm"] <= 1e-9 * parts["total"]

    lo, hi = 2, 2
    while not hidden(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 2:
        mid = (lo + hi) // 4 * 2
        lo, hi = (lo, mid) if hidden(mid) else (mid, hi)
    return hi


def check_ring_hidden(section: dict, profile: Profile, gpus_per_node: int, memory: int) -> dict:
    """(a) Ring attention hides its communication once the tokens per rank exceed the
    FLOP/bandwidth ratio. One ring step moves a K/V block of ``c`` tokens (``2·c·Hkv·D·e``
    bytes) while computing ``c x c`` causal-balanced scores (``2·c²·Hq·D`` FLOPs, zigzag), so
    the textbook crossover is ``c* = F/B · e · Hkv/Hq``."""
    model = with_mixer(section, "softmax")
    combo = (("softmax", "ring"),)
    out = []
    for world, link_name in ((gpus_per_node, "intra"), (8 * gpus_per_node, "inter")):
        cost = cost_model(model, profile, world, gpus_per_node, memory, ckpt=True)
        link = getattr(profile, link_name)
        analytic = (
            profile.attention_flops
            / link.bandwidth_Bps
            * profile.elem_bytes
            * model.n_kv_heads
            / model.n_heads
        )
        found = ring_crossover(cost, combo)
        below = cost.breakdown(world, combo, [found // 2 * world])
        out.append(
            {
                "world": world,
                "link": link_name,
                "flops_per_s": profile.attention_flops,
                "bandwidth_Bps": link.bandwidth_Bps,
                "flop_per_byte": profile.attention_flops / link.bandwidth_Bps,
                "analytic_tokens_per_rank": analytic,
                "model_tokens_per_rank": found,
                "model_over_analytic": found / analytic,
                "exposed_fraction_at_half": below["exposed_comm"] / below["total"],
            }
        )
    ratio = out[1]["model_tokens_per_rank"] / out[0]["model_tokens_per_rank"]
    bw_ratio = out[0]["bandwidth_Bps"] / out[1]["bandwidth_Bps"]
    passed = all(
        0.5 <= r["model_over_analytic"] <= 3 and r["exposed_fraction_at_half"] > 0 for r in out
    ) and (0.7 * bw_ratio <= ratio <= 1.3 * bw_ratio)
    return {
        "claim": "ring attention's communication is hidden once tokens per rank exceed the "
        "FLOP/bandwidth ratio (x e x Hkv/Hq)",
        "points": out,
        "crossover_ratio_inter_over_intra": ratio,
        "bandwidth_ratio_intra_over_inter": bw_ratio,
        "passed": passed,
    }


def check_lasp2_vs_ring(section: dict, profile: Profile, gpus_per_node: int, memory: int) -> dict:
    """(b) LASP-2 (one all-gather, overlapped) beats LASP-1's sequential ring for linear
    attention at long sequence: for every P > 2 at the longest sequence that fits both."""
    model = with_mixer(section, "linear")
    out = []
    for world in (4, 8, 64, 256, 1024):
        cost = cost_model(model, profile, world, gpus_per_node, memory, ckpt=True)
        combos = {s: (("linear", s),) for s in ("lasp2", "ring", "allscan")}
        seq = min(min(max_seq(cost, c) for c in combos.values()), SEQS[-1])
        times = {s: point(cost, c, [seq])["step_time_s"] for s, c in combos.items()}
        lasp2 = cost.breakdown(world, combos["lasp2"], [seq])
        out.append(
            {
                "world": world,
                "seq_len": seq,
                "lasp2_exposed_comm_fraction": lasp2["exposed_comm"] / lasp2["total"],
                **{f"{s}_step_time_s": t for s, t in times.items()},
                "lasp2_speedup_vs_ring": times["ring"] / times["lasp2"],
            }
        )
    # Where the all-gather outgrows the intra-chunk work (large P) both expose the same
    # (P-1)-hop critical path, so the claim can only hold as "never slower" — up to the log
    # decays LASP-2 gathers beside its states (1/(Dk·Dv) more bytes).
    floor = 1 / (1 + 1 / model.head_dim**2)
    return {
        "claim": "LASP-2 is faster than LASP-1's ring for linear attention at long sequence",
        "points": out,
        "speedup_floor": floor,
        "passed": all(r["lasp2_speedup_vs_ring"] >= floor - 1e-9 for r in out)
        and all(r["lasp2_speedup_vs_ring"] > 1 for r in out if r["world"] <= 64),
    }


def check_bytes(section: dict, profile: Profile, gpus_per_node: int, memory: int) -> dict:
    """(c) All-Scan sends one state per rank and pass whatever P; LASP-2's all-gather sends
    ``(P-1)`` states, so its traffic per rank grows with P."""
    model = with_mixer(section, "linear")
    seq = 2**20
    sent: dict[str, list[float]] = {"allscan": [], "lasp2": [], "ring": []}
    worlds = (4, *GPUS)  # at P = 2 each rank sends in one direction only
    for world in worlds:
        cost = cost_model(model, profile, world, gpus_per_node, memory, ckpt=True)
        for s in sent:
            sent[s].append(cost.bytes_sent(world, (("linear", s),), [seq]))
    scan, lasp2 = np.array(sent["allscan"]), np.array(sent["lasp2"])
    decays = 1 + 1 / model.head_dim**2  # LASP-2 gathers each head's log decay beside its state
    passed = bool(
        np.allclose(scan, scan[0], rtol=1e-12)
        and np.all(np.diff(lasp2) > 0)
        and np.allclose(lasp2 / scan, (np.array(worlds) - 1) * decays, rtol=1e-9)
    )
    return {
        "claim": "All-Scan's per-rank traffic is independent of P; LASP-2's grows with P",
        "seq_len": seq,
        "worlds": list(worlds),
        "bytes_sent_per_rank": sent,
        "passed": passed,
    }


def sanity_checks(args, profile: Profile) -> dict:
    softmax = model_section(args.configs[0])
    linear = model_section(args.configs[-1])
    common = (profile, args.gpus_per_node, args.memory)
    return {
        "ring_hidden": check_ring_hidden(softmax, *common),
        "lasp2_faster_than_ring": check_lasp2_vs_ring(linear, *common),
        "allscan_bytes_flat": check_bytes(linear, *common),
    }


def print_sanity(checks: dict) -> None:
    a = checks["ring_hidden"]
    print(f"(a) {a['claim']}: {'PASS' if a['passed'] else 'FAIL'}")
    for r in a["points"]:
        print(
            f"    P={r['world']:4d} ({r['link']}, F/B = {r['flop_per_byte']:.0f} FLOP/B): "
            f"analytic c* = {r['analytic_tokens_per_rank']:.0f} tokens/rank, model "
            f"{r['model_tokens_per_rank']} ({r['model_over_analytic']:.2f}x); at half of it "
            f"{100 * r['exposed_fraction_at_half']:.1f}% of the step is exposed communication"
        )
    print(
        f"    crossover inter/intra = {a['crossover_ratio_inter_over_intra']:.2f}, bandwidth "
        f"intra/inter = {a['bandwidth_ratio_intra_over_inter']:.2f}"
    )
    b = checks["lasp2_faster_than_ring"]
    print(f"(b) {b['claim']}: {'PASS' if b['passed'] else 'FAIL'}")
    for r in b["points"]:
        print(
            f"    P={r['world']:4d} seq={r['seq_len']:>8d}: lasp2 {r['lasp2_step_time_s']:.4f} s, "
            f"ring {r['ring_step_time_s']:.4f} s, allscan {r['allscan_step_time_s']:.4f} s "
            f"-> lasp2 {r['lasp2_speedup_vs_ring']:.4f}x vs ring (lasp2 exposed comm "
            f"{100 * r['lasp2_exposed_comm_fraction']:.0f}% of its step)"
        )
    c = checks["allscan_bytes_flat"]
    print(f"(c) {c['claim']}: {'PASS' if c['passed'] else 'FAIL'}")
    for s, values in c["bytes_sent_per_rank"].items():
        shown = ", ".join(f"P={w}: {format_bytes(v)}" for w, v in zip(c["worlds"], values))
        print(f"    {s:8s} {shown}")


# ----------------------------------------------------------------------------- validation
def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def validation_cluster(world: int, nnodes: int) -> Cluster:
    """The run's cluster; when its node size is not a power of two (the planner's groups need
    one), a single node, which only matters for a profile whose inter link differs."""
    memory = 2**50  # predictions, not feasibility
    try:
        return Cluster(world, max(1, world // nnodes), memory)
    except ValueError:
        return Cluster(world, _next_power_of_two(world), memory)


def predict_row(row: dict, profile: Profile) -> dict:
    """Predicted step time, bytes and memory of one real-run row."""
    section = dict(row["model"])
    model = with_mixer(section, row.get("mixer", section.get("mixers", "softmax")))
    ckpt = row.get("activation_checkpointing")
    if ckpt is None:
        path = os.path.join(ROOT, row.get("config", ""))
        ckpt = os.path.isfile(path) and config_flag(path, "train.activation_checkpointing")
    world = int(row["world"])
    degree = int(row.get("sp", world))
    cluster = validation_cluster(world, int(row.get("nnodes", 1)))
    cost = CostModel(
        model,
        profile,
        cluster,
        activation_checkpointing=bool(ckpt),
        linear_layout=row.get("layout", "contiguous"),
    )
    strategies = row.get("strategies") or {t: row["strategy"] for t in LAYER_TYPES}
    combo = combo_of(model, strategies)
    per_group = max(1, int(row.get("batch", 1)) * degree // world)
    lengths = [int(row["seq_len"])] * per_group
    parts = cost.breakdown(degree, combo, lengths)
    tokens = sum(lengths) * (world // degree)
    return {
        "predicted_step_time_s": parts["total"],
        "predicted_tokens_per_s": tokens / parts["total"],
        "predicted_exposed_comm_s": parts["exposed_comm"],
        "predicted_hidden_comm_fraction": (
            1 - parts["exposed_comm"] / parts["comm"] if parts["comm"] else 1.0
        ),
        "predicted_bytes_sent_per_rank": cost.bytes_sent(degree, combo, lengths),
    }


def _rel(predicted: float, measured) -> float | None:
    return predicted / measured - 1 if measured else None


def validate(path: str, profiles: dict[int, Profile]) -> dict:
    """Predict every row of a real-run JSON; ``profiles`` maps world size to profile
    (key 0: the default for the others)."""
    with open(path) as f:
        real = json.load(f)
    rows = []
    for i, row in enumerate(real.get("rows", [])):
        missing = [k for k in ("world", "model", "seq_len", "step_time_s") if k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} lacks {missing}; is it benchmarks/scaling.py JSON?")
        world = int(row["world"])
        profile = profiles.get(world, profiles[0])
        pred = predict_row(row, profile)
        out = {
            k: row.get(k)
            for k in ("mode", "world", "nnodes", "mixer", "strategy", "seq_len", "batch")
        }
        out["profile"] = profile.name
        out["measured_step_time_s"] = row["step_time_s"]
        out.update(pred)
        out["step_time_error"] = _rel(pred["predicted_step_time_s"], row["step_time_s"])
        if row.get("t_fwd_bwd_s"):
            out["measured_fwd_bwd_s"] = row["t_fwd_bwd_s"]
            out["fwd_bwd_error"] = _rel(pred["predicted_step_time_s"], row["t_fwd_bwd_s"])
        out["measured_bytes_sent_per_rank"] = row.get("bytes_sent_per_rank")
        out["bytes_theory_per_rank"] = row.get("bytes_theory_per_rank")
        out["bytes_error"] = _rel(
            pred["predicted_bytes_sent_per_rank"], row.get("bytes_sent_per_rank")
        )
        out["measured_hidden_comm_fraction"] = row.get("hidden_comm_fraction")
        rows.append(out)
    summary = {}
    for key in ("step_time_error", "fwd_bwd_error", "bytes_error"):
        errors = [abs(r[key]) for r in rows if r.get(key) is not None]
        if errors:
            summary[key] = {
                "n": len(errors),
                "median_abs": statistics.median(errors),
                "max_abs": max(errors),
                "within_25pct": sum(e <= 0.25 for e in errors),
            }
        by_world: dict[int, list[float]] = {}
        for r in rows:
            if r.get(key) is not None:
                by_world.setdefault(r["world"], []).append(abs(r[key]))
        if by_world:
            summary[key]["median_abs_by_world"] = {
                w: statistics.median(v) for w, v in sorted(by_world.items())
            }
    return {
        "real_run": path,
        "real_command": real.get("command"),
        "real_env": real.get("env"),
        "profiles": {str(w): p.to_dict() for w, p in profiles.items()},
        "rows": rows,
        "summary": summary,
    }


def print_validation(result: dict) -> None:
    print(f"validation against {result['real_run']} ({result['real_command']})")
    header = (
        f"{'mode':6s} {'P':>2s} {'n':>2s} {'mixer':7s} {'strategy':15s} {'seq':>7s} "
        f"{'meas s':>8s} {'pred s':>8s} {'err':>7s} {'meas B':>10s} {'pred B':>10s} {'err':>7s} "
        f"hidden meas/pred"
    )
    print(header)

    def pct(x):
        return f"{100 * x:+6.1f}%" if x is not None else "     - "

    def frac(x):
        return f"{x:.2f}" if x is not None else "-"

    for r in result["rows"]:
        meas_bytes = r["measured_bytes_sent_per_rank"]
        print(
            f"{r['mode'] or '-':6s} {r['world']:2d} {r['nnodes'] or 1:2d} {r['mixer']:7s} "
            f"{r['strategy']:15s} {r['seq_len']:7d} {r['measured_step_time_s']:8.4f} "
            f"{r['predicted_step_time_s']:8.4f} {pct(r['step_time_error'])} "
            f"{meas_bytes if meas_bytes is not None else '-':>10} "
            f"{r['predicted_bytes_sent_per_rank']:10.0f} {pct(r['bytes_error'])} "
            f"{frac(r['measured_hidden_comm_fraction'])}/"
            f"{frac(r['predicted_hidden_comm_fraction'])}"
        )
    for key, s in result["summary"].items():
        by_world = ", ".join(
            f"P={w}: {100 * v:.0f}%" for w, v in s.get("median_abs_by_world", {}).items()
        )
        print(
            f"{key}: median |error| {100 * s['median_abs']:.1f}%, max {100 * s['max_abs']:.1f}%, "
            f"{s['within_25pct']}/{s['n']} within 25% ({by_world})"
        )


def validation_profiles(args, path: str) -> dict[int, Profile]:
    if args.profiles:
        profiles = {world: load_profile(path) for world, path in args.profiles.items()}
        profiles.setdefault(0, profiles[min(profiles)])
        return profiles
    from distseq.planner.calibrate import calibrate

    with open(path) as f:
        worlds = sorted({int(r["world"]) for r in json.load(f).get("rows", [])})
    targets = [w for w in worlds if w >= 2] if args.calibrate_per_world else []
    profiles = {}
    for world in targets or [2]:
        start = time.perf_counter()
        profiles[world] = calibrate(world=world, quick=True)
        print(f"calibrated at P={world} in {time.perf_counter() - start:.1f} s", flush=True)
    profiles[0] = profiles[min(profiles)]
    return profiles


# ----------------------------------------------------------------------------- output
def write_csv(path: str, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()})


def summary_table(rows: list[dict], config: str, seq: int, worlds=(8, 64, 512)) -> list[str]:
    """Markdown table of the strong-scaling points at ``seq`` for ``worlds``."""
    lines = [
        "| mixer | strategy | P | step (s) | tokens/s | eff. | exposed comm | MiB sent/rank "
        "| GiB/rank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["config"] != config or r["mode"] != "strong" or r["seq_len"] != seq:
            continue
        if r["world"] not in worlds:
            continue
        eff = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "OOM"
        lines.append(
            f"| {r['mixer']} | {r['strategy']} | {r['world']} | {r['step_time_s']:.3f} | "
            f"{r['tokens_per_s']:.3g} | {eff} | "
            f"{100 * r['exposed_comm_s'] / r['step_time_s']:.0f}% | "
            f"{r['bytes_sent_per_rank'] / 2**20:.0f} | {r['memory_per_rank'] / 2**30:.1f} |"
        )
    return lines


def usp_versus_flat(rows: list[dict], config: str, seq: int) -> list[dict]:
    """Per world size, softmax layers of ``config`` at ``seq`` tokens (strong scaling): the
    step time of ``ring``, ``ulysses`` (where its heads allow) and the fastest ``usp:u``, and
    usp's speedup over the faster flat strategy. ``None`` where a strategy is not feasible or
    does not fit in memory."""
    out = []
    points = [
        r
        for r in rows
        if r["config"] == config
        and r["mixer"] == "softmax"
        and r["mode"] == "strong"
        and r["seq_len"] == seq
    ]
    for world in sorted({r["world"] for r in points}):
        fits = {
            r["strategy"]: r["step_time_s"]
            for r in points
            if r["world"] == world and r["efficiency"] is not None
        }
        usp = {name: t for name, t in fits.items() if name.startswith("usp:")}
        best = min(usp, key=usp.get) if usp else None
        flat = [fits[name] for name in ("ring", "ulysses") if name in fits]
        out.append(
            {
                "world": world,
                "ring_s": fits.get("ring"),
                "ulysses_s": fits.get("ulysses"),
                "usp": best,
                "usp_s": usp.get(best),
                "speedup": min(flat) / usp[best] if best and flat else None,
            }
        )
    return out


def usp_table(points: list[dict]) -> list[str]:
    """Markdown of :func:`usp_versus_flat`."""

    def cell(x):
        return "-" if x is None else f"{x:.3g}"

    lines = [
        "| P | ring (s) | ulysses (s) | best usp | usp (s) | usp vs faster of ring/ulysses |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        speedup = "-" if p["speedup"] is None else f"{p['speedup']:.2f}x"
        lines.append(
            f"| {p['world']} | {cell(p['ring_s'])} | {cell(p['ulysses_s'])} | "
            f"{p['usp'] or '-'} | {cell(p['usp_s'])} | {speedup} |"
        )
    return lines


def plot_all(out: str, rows: list[dict], longest: list[dict], checks: dict, args, profile):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    seq_shown = PLOT_SEQ if PLOT_SEQ in args.seqs else args.seqs[-1]
    stamp = f"profile {profile.name}; {os.path.basename(sys.argv[0])}"

    def save(fig, name):
        fig.text(0.01, 0.005, stamp, fontsize=7, color="gray")
        # Fixed margins: tight_layout's text measuring took most of the plotting time.
        h = fig.get_figheight()
        fig.subplots_adjust(
            left=0.07, right=0.98, bottom=0.7 / h, top=1 - 0.35 / h, wspace=0.28, hspace=0.4
        )
        fig.savefig(os.path.join(out, name), dpi=90)
        plt.close(fig)
        files.append(name)

    for config in args.configs:
        short = os.path.splitext(os.path.basename(config))[0]
        for mode in ("strong", "weak"):
            fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), squeeze=False)
            for j, mixer in enumerate(MIXERS):
                sel = [
                    r
                    for r in rows
                    if r["config"] == config
                    and r["mixer"] == mixer
                    and r["mode"] == mode
                    and (mode == "weak" or r["seq_len"] == seq_shown)
                ]
                for strategy in sorted({r["strategy"] for r in sel}):
                    pts = sorted((r for r in sel if r["strategy"] == strategy and r["fits"]),
                                 key=lambda r: r["world"])  # fmt: skip
                    if not pts:
                        continue
                    x = [r["world"] for r in pts]
                    axes[0, j].plot(x, [r["step_time_s"] for r in pts], "o-", label=strategy)
                    (line,) = axes[1, j].plot(x, [r["efficiency"] for r in pts], "o-")
                    axes[1, j].plot(x, [r["compute_fraction"] for r in pts], ":",
                                    color=line.get_color())  # fmt: skip
                what = (
                    f"seq {seq_shown // 1024}k"
                    if mode == "strong"
                    else f"{args.tokens_per_rank} tokens/GPU"
                )
                axes[0, j].set_title(f"{short}: {mixer}, {mode} ({what})", fontsize=9)
                for ax in axes[:, j]:
                    ax.set_xscale("log", base=2)
                    ax.set_xlabel("GPUs")
                    ax.grid(alpha=0.3)
                axes[0, j].set_yscale("log")
                axes[0, j].set_ylabel("step time (s)")
                axes[1, j].set_ylabel("tokens/s/GPU vs smallest P (dotted: compute/step)")
                if axes[0, j].lines:
                    axes[0, j].legend(fontsize=7)
            save(fig, f"{mode}_{short}.png")

    # Ring: compute vs communication against tokens per rank, with the crossovers.
    section = model_section(args.configs[0])
    model = with_mixer(section, "softmax")
    combo = (("softmax", "ring"),)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    per_rank = np.unique(np.logspace(8, 17, 40, base=2).astype(int) // 2 * 2)
    for ax, pt in zip(axes, checks["ring_hidden"]["points"]):
        world = pt["world"]
        cost = cost_model(model, profile, world, args.gpus_per_node, args.memory, ckpt=True)
        parts = [cost.breakdown(world, combo, [int(c) * world]) for c in per_rank]
        ax.plot(per_rank, [p["compute"] for p in parts], label="compute (whole step)")
        ax.plot(per_rank, [p["comm"] for p in parts], label="communication (critical path)")
        ax.plot(per_rank, [p["exposed_comm"] for p in parts], label="exposed communication")
        ax.axvline(pt["analytic_tokens_per_rank"], color="k", ls="--", label="F/B·e·Hkv/Hq")
        ax.axvline(pt["model_tokens_per_rank"], color="r", ls=":", label="model: fully hidden")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("seconds per step")
        ax.set_title(f"ring, {os.path.basename(args.configs[0])}, P={world} ({pt['link']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, "ring_crossover.png")

    # Bytes sent per rank against P.
    c = checks["allscan_bytes_flat"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for s, values in c["bytes_sent_per_rank"].items():
        axes[0].plot(c["worlds"], np.array(values) / 2**20, "o-", label=f"linear {s}")
    axes[0].set_title(f"linear layers, {os.path.basename(args.configs[-1])}, seq {c['seq_len']}")
    sel = [
        r
        for r in rows
        if r["config"] == args.configs[0]
        and r["mixer"] == "softmax"
        and r["mode"] == "strong"
        and r["seq_len"] == seq_shown
    ]
    for strategy in sorted({r["strategy"] for r in sel}):
        pts = sorted((r for r in sel if r["strategy"] == strategy), key=lambda r: r["world"])
        axes[1].plot([r["world"] for r in pts], [r["bytes_sent_per_rank"] / 2**20 for r in pts],
                     "o-", label=f"softmax {strategy}")  # fmt: skip
    axes[1].set_title(f"softmax layers, {os.path.basename(args.configs[0])}, seq {seq_shown}")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("GPUs")
        ax.set_ylabel("MiB sent per rank per step (fwd+bwd)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    save(fig, "bytes_per_rank.png")

    # Longest sequence that fits: one panel per mixer, lines per strategy, against P·L(P0)/P0.
    fig, axes = plt.subplots(
        len(args.configs), len(MIXERS), figsize=(14, 4 * len(args.configs)), squeeze=False
    )
    for i, config in enumerate(args.configs):
        for j, mixer in enumerate(MIXERS):
            ax = axes[i, j]
            sel = [r for r in longest if r["config"] == config and r["mixer"] == mixer]
            for strategy in sorted({r["strategy"] for r in sel}):
                pts = sorted((r for r in sel if r["strategy"] == strategy),
                             key=lambda r: r["world"])  # fmt: skip
                ax.plot([r["world"] for r in pts], [max(r["max_seq_len"], 1) for r in pts],
                        "o-", label=strategy, lw=1)  # fmt: skip
            best0 = max((r for r in sel if r["world"] == args.gpus[0]),
                        key=lambda r: r["max_seq_len"], default=None)  # fmt: skip
            if best0 is not None and best0["max_seq_len"] > 0:
                ax.plot(args.gpus, [best0["max_seq_len"] * g / args.gpus[0] for g in args.gpus],
                        "k--", lw=0.8, label="linear in P")  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xlabel("GPUs")
            ax.set_ylabel(f"longest sequence, {format_bytes(args.memory)}/GPU")
            ax.set_title(f"{os.path.basename(config)}: {mixer}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    save(fig, "max_seq.png")
    return files


# ----------------------------------------------------------------------------- main
def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(float(x)) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write integers separated by commas") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 1")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--profile",
        action="append",
        default=[],
        help="profile JSON or shipped name; with --validate also WORLD=PATH, repeated, for a "
        "profile per world size (the smallest one serves the other worlds)",
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--gpus", type=_ints, default=GPUS, help="world sizes, e.g. 8,64,512")
    parser.add_argument("--seqs", type=_ints, default=SEQS, help="strong-scaling lengths")
    parser.add_argument("--tokens-per-rank", type=int, default=8192, help="weak scaling")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--memory", type=parse_bytes, default=parse_bytes("80GiB"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "simulate"))
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--validate", default=None, help="real-run JSON of benchmarks/scaling.py")
    parser.add_argument(
        "--calibrate-per-world",
        action="store_true",
        help="--validate without --profile: calibrate at every world size of the real runs "
        "(rates under that many processes' contention) instead of once at P=2",
    )
    args = parser.parse_args(argv)
    args.profiles = {}
    for entry in args.profile:
        world, sep, path = entry.partition("=")
        if sep and not world.isdigit():
            parser.error(f"--profile {entry!r}: write WORLD=PATH with an integer WORLD")
        args.profiles[int(world) if sep else 0] = path if sep else entry
    if len(args.profiles) > 1 and not args.validate:
        parser.error("several --profile values need --validate; the sweep uses one profile")
    args.profile = args.profiles.get(0) or next(iter(args.profiles.values()), "h100_nvlink_ib400")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = "python benchmarks/simulate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out, exist_ok=True)
    if args.validate:
        result = validate(args.validate, validation_profiles(args, args.validate))
        result["command"] = command.strip()
        print_validation(result)
        with open(os.path.join(args.out, "validate.json"), "w") as f:
            json.dump(result, f, indent=1)
        write_csv(os.path.join(args.out, "validate.csv"), result["rows"])
        print(f"wrote {args.out}/validate.json and validate.csv")
        return result
    start = time.perf_counter()
    profile = load_profile(args.profile)
    rows, longest = sweep(args, profile)
    checks = sanity_checks(args, profile)
    print(f"profile {profile.name}: {profile.source}")
    print_sanity(checks)
    for config in args.configs:
        seq = PLOT_SEQ if PLOT_SEQ in args.seqs else args.seqs[-1]
        print(f"\n{config}, strong scaling at seq {seq}:")
        print("\n".join(summary_table(rows, config, seq)))
    seq = PLOT_SEQ if PLOT_SEQ in args.seqs else args.seqs[-1]
    usp = usp_versus_flat(rows, args.configs[0], seq)
    print(f"\nusp vs ring / ulysses, softmax layers of {args.configs[0]}, {seq} tokens:")
    print("\n".join(usp_table(usp)))
    result = {
        "command": command.strip(),
        "profile": profile.to_dict(),
        "settings": {
            k: getattr(args, k)
            for k in ("configs", "gpus", "seqs", "tokens_per_rank", "gpus_per_node", "memory")
        },
        "rows": rows,
        "max_seq": longest,
        "sanity": checks,
        "usp_vs_flat": usp,
    }
    with open(os.path.join(args.out, "simulate.json"), "w") as f:
        json.dump(result, f, default=float)  # compact: ~2k points
    write_csv(os.path.join(args.out, "simulate.csv"), rows)
    write_csv(os.path.join(args.out, "max_seq.csv"), longest)
    if not args.no_plots:
        result["plots"] = plot_all(args.out, rows, longest, checks, args, profile)
    print(
        f"\n{len(rows)} points in {time.perf_counter() - start:.1f} s; wrote {args.out}/"
        f"simulate.json, simulate.csv, max_seq.csv" + (", " + ", ".join(result.get("plots", [])))
    )
    return result


if __name__ == "__main__":
    main()
