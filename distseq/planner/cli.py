"""``python -m distseq.planner {dry-run,calibrate}``."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from distseq.planner.cost import CostModel
from distseq.planner.lengths import LengthDistribution, load_lengths
from distseq.planner.plan import Plan, write_plans
from distseq.planner.profile import load_profile
from distseq.planner.solver import plan_batch
from distseq.planner.spec import Cluster, config_flag, load_model
from distseq.planner.units import format_bytes, parse_bytes, parse_count

DEFAULT_PROFILE = "h100_nvlink_ib400"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distseq.planner")
    sub = parser.add_subparsers(dest="command", required=True)
    dry = sub.add_parser("dry-run", help="plan batches drawn from a length histogram")
    dry.add_argument(
        "--lengths", required=True, help="length,count CSV / lengths (txt, jsonl, npy)"
    )
    dry.add_argument("--gpus", type=_positive, required=True, help="world size")
    dry.add_argument("--gpus-per-node", type=_positive, default=8)
    dry.add_argument("--memory", required=True, help="usable memory per GPU, e.g. 80GiB")
    dry.add_argument("--model", required=True, help="training config YAML with a model: section")
    dry.add_argument("--tokens-per-step", required=True, help="tokens per batch, e.g. 1M")
    dry.add_argument("--profile", default=DEFAULT_PROFILE, help="profile JSON or shipped name")
    dry.add_argument("--out", default=None, help="folder for plan.json and plan.png")
    dry.add_argument("--batches", type=_positive, default=1, help="batches to sample and plan")
    dry.add_argument("--seed", type=int, default=0)
    dry.add_argument(
        "--activation-checkpointing",
        choices=["auto", "on", "off"],
        default="auto",
        help="auto: train.activation_checkpointing of the --model config",
    )
    dry.add_argument(
        "--zero-stage",
        type=int,
        choices=[0, 1, 2, 3],
        default=None,
        help="the adaptive trainer's states: 0 replicated, 1/2/3 ZeRO-sharded over all ranks "
        "(default: fully sharded, FSDP-style, its collectives not charged)",
    )
    dry.add_argument(
        "--zero-bucket-mb",
        type=float,
        default=25.0,
        help="gradient bucket of --zero-stage 1/2 in MiB (adaptive.zero_bucket_mb)",
    )
    dry.add_argument(
        "--time-limit",
        type=float,
        default=0.25,
        help="MILP seconds per step (shared by its micro-steps)",
    )
    cal = sub.add_parser("calibrate", help="measure a profile on this machine")
    cal.add_argument("--out", required=True, help="profile JSON to write")
    cal.add_argument("--world", type=_positive, default=2, help="processes to measure with")
    cal.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    cal.add_argument("--quick", action="store_true", help="fewer, smaller measurements")
    return parser


def _table(plans: list[Plan]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    first = plans[0]
    for s, step in enumerate(first.micro_steps):
        table = Table(title=f"batch 0, micro-step {s}: {step.predicted_time_s:.4g} s")
        for col in ("ranks", "degree", "strategy", "sequences", "tokens", "time (s)", "memory"):
            table.add_column(col, justify="right")
        for g in step.groups:
            table.add_row(
                f"{g.ranks[0]}-{g.ranks[-1]}",
                str(g.degree),
                g.strategy,
                str(len(g.sequences)),
                f"{g.tokens:,}",
                f"{g.predicted_time_s:.4g}",
                format_bytes(g.memory_bytes),
            )
        console.print(table)
    summary = Table(title="plans")
    for col in (
        "batch",
        "seqs",
        "tokens",
        "steps",
        "planner (s)",
        "static (s)",
        "speed-up",
        "LB (s)",
        "gap to LB",
        "idle",
        "pad",
        "solve (s)",
    ):
        summary.add_column(col, justify="right")
    for i, p in enumerate(plans):
        st = p.static_best
        summary.add_row(
            str(i),
            str(len(p.lengths)),
            f"{sum(p.lengths):,}",
            str(len(p.micro_steps)),
            f"{p.predicted_step_time_s:.4g}",
            f"{st.predicted_step_time_s:.4g} (d={st.degree} {st.strategy})",
            f"{st.predicted_step_time_s / p.predicted_step_time_s:.3f}x",
            f"{p.lower_bound_s:.4g}",
            f"{p.gap_to_lower_bound:.1%}",
            f"{p.idle_fraction:.1%}",
            f"{p.padding_fraction:.2%}",
            f"{p.solve_time_s:.3f}",
        )
    console.print(summary)


def dry_run(args: argparse.Namespace) -> list[Plan]:
    cluster = Cluster(args.gpus, args.gpus_per_node, parse_bytes(args.memory))
    tokens = parse_count(args.tokens_per_step)
    model = load_model(args.model)
    profile = load_profile(args.profile)
    dist: LengthDistribution = load_lengths(args.lengths)
    rng = np.random.default_rng(args.seed)
    batches = [dist.sample(tokens, rng) for _ in range(args.batches)]
    checkpointing = args.activation_checkpointing == "on" or (
        args.activation_checkpointing == "auto"
        and config_flag(args.model, "train.activation_checkpointing")
    )
    cost = CostModel(
        model,
        profile,
        cluster,
        activation_checkpointing=checkpointing,
        zero_stage=args.zero_stage,
        zero_bucket_bytes=args.zero_bucket_mb * 2**20,
    )
    plans = [
        plan_batch(b, cluster, model, profile, cost=cost, time_limit=args.time_limit)
        for b in batches
    ]
    _table(plans)
    if args.out:
        from distseq.planner.plot import plot_plan

        os.makedirs(args.out, exist_ok=True)
        write_plans(os.path.join(args.out, "plan.json"), plans)
        plot_plan(plans[0], dist, os.path.join(args.out, "plan.png"))
        print(f"wrote {os.path.join(args.out, 'plan.json')} and plan.png")
    return plans


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "dry-run":
            dry_run(args)
        else:
            from distseq.planner.calibrate import calibrate

            profile = calibrate(world=args.world, backend=args.backend, quick=args.quick)
            profile.save(args.out)
            print(f"wrote {args.out}: {profile.to_dict()}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
