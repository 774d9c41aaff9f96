"""Peak tensor memory of one adaptive training step per ZeRO stage of the sharded engine.

    python benchmarks/zero_memory.py [--world 3 --bucket-mb 1 --stages 0 1 2]

Trains ``configs/tiny.yaml`` widened to about 5 M parameters (20 MiB of fp32 weights, as much
gradient) on short recall documents, so the states, not the activations, dominate; the
planner splits each step's documents over ``--world`` gloo ranks. After one warm-up step (Adam
state allocated) a second step runs under ``torch.distributed._tools.mem_tracker.MemTracker``,
which sums the bytes of live tensor storages at every operator: the table lists each rank's
peak, split into the tracker's categories. Stage 0 replicates everything, stage 1 shards
Adam's moments (the whole gradient lives through every backward), stage 2 also the gradient,
reduce-scattered in ``--bucket-mb`` buckets during the backward.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distseq.comm.launch import run_ranks  # noqa: E402
from distseq.planner import GroupPlan, MicroStep, Plan, StaticSummary  # noqa: E402
from distseq.train import Trainer, load_config, validate_config  # noqa: E402

MODEL = [
    "model.vocab_size=4096", "model.d_model=256", "model.n_layers=4", "model.n_heads=4",
    "model.n_kv_heads=2", "model.ffn_hidden=688",
]  # fmt: skip
DATA = [
    "data.recall.min_len=24", "train.steps=2", "train.warmup_steps=1", "log.progress=false",
    "planner=adaptive",
]  # fmt: skip


def one_rank_groups(world: int, lengths: list[int]) -> Plan:
    """Every rank alone in every micro-step, document ``i`` on rank ``i % world`` in
    micro-step ``i // world``: each rank accumulates over several micro-steps."""
    micro = []
    for first in range(0, len(lengths), world):
        docs = range(first, min(first + world, len(lengths)))
        groups = tuple(
            GroupPlan((i - first,), "ring", {"softmax": "ring"}, (i,), lengths[i], 0.0, 0.0)
            for i in docs
        )
        micro.append(MicroStep(groups, 0.0))
    return Plan(
        world_size=world, lengths=tuple(lengths), micro_steps=tuple(micro),
        predicted_step_time_s=1.0, static_best=StaticSummary(1, "ring", 1.0), lower_bound_s=1.0,
        solve_time_s=0.0, idle_fraction=0.0, padding_fraction=0.0, method="fixed",
    )  # fmt: skip


def _total(tracker) -> int:
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def _rank(rank: int, world: int, overrides: list[str]) -> dict:
    from torch.distributed._tools.mem_tracker import MemTracker

    cfg = validate_config(load_config(str(ROOT / "configs" / "tiny.yaml"), overrides), world)
    trainer = Trainer(cfg)
    trainer.scheduler.solve = lambda lengths: one_rank_groups(world, lengths)
    try:
        trainer.train_step()  # warm-up: Adam's state exists from here on
        trainer.engine.zero_grad()  # the replicated engine keeps .grad until then
        engine, peaks = trainer.engine, {}
        tracker = MemTracker()
        tracker.track_external(trainer.model, engine.optimizer, *_shards(engine))
        step = engine.step

        def phased(*args, **kwargs):
            peaks["micro-steps"] = _total(tracker)  # the peak so far: forward and backward
            return step(*args, **kwargs)

        engine.step = phased
        end_micro_step = engine.end_micro_step

        def next_micro_step() -> None:
            end_micro_step()
            tracker.reset_mod_stats()  # per-module stats allow one forward each; peaks stay

        engine.end_micro_step = next_micro_step
        with tracker:
            peaks["start"] = int(tracker.get_tracker_snapshot()[torch.device("cpu")]["Total"])
            result = trainer.train_step()
        peaks["step"] = _total(tracker)
    finally:
        trainer.scheduler.close()
    return {
        "peaks": peaks,
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "plan": result["plan_groups"],
    }


def _shards(engine) -> list[torch.Tensor]:
    """A sharded engine's own tensors (gradient shard, decay masks), for the tracker."""
    return [t for t in vars(engine).values() if isinstance(t, torch.Tensor)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=3)
    parser.add_argument("--bucket-mb", type=float, default=1.0)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per document, at most")
    parser.add_argument("--micro-steps", type=int, default=2, help="per step, each rank")
    args = parser.parse_args()
    mib = 1 << 20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            overrides = [
                *MODEL, *DATA, f"data.seq_len={args.seq_len}",
                f"data.recall.max_len={args.seq_len}",
                f"train.global_batch={args.world * args.micro_steps}",
                f"adaptive.zero_stage={stage}", f"adaptive.zero_bucket_mb={args.bucket_mb}",
                f"out_dir={tmp}/{stage}",
            ]  # fmt: skip
            rows.append((stage, run_ranks(args.world, _rank, overrides, timeout=900)))
    params = rows[0][1][0]["params"]
    print(f"{params / 1e6:.2f} M parameters ({4 * params / mib:.1f} MiB fp32), {args.world} "
          f"gloo ranks, bucket {args.bucket_mb} MiB; plan of the measured step: "
          f"{rows[0][1][0]['plan']}")  # fmt: skip
    print("| stage | states between steps | peak in forward + backward | peak in the step |")
    print("|---|---|---|---|")
    for stage, ranks in rows:
        cells = [
            " / ".join(f"{r['peaks'][phase] / mib:.1f}" for r in ranks)
            for phase in ("start", "micro-steps", "step")
        ]
        print(f"| {stage} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
