"""Train a distseq model, or a Hugging Face causal LM (model.hf / model.hf_config).

    torchrun --nproc_per_node N launch/train.py --config configs/tiny.yaml [dotted.key=value ...]
    python launch/train.py --config configs/tiny.yaml          # one process

The config is loaded and validated before any process-group work, so bad values fail at once
with a message naming the key.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from distseq.comm.launch import exit_process
from distseq.train import Trainer, launched_world_size, load_config, validate_config
from distseq.train.checkpoint import resume_point


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    world = launched_world_size()
    try:
        cfg = validate_config(load_config(args.config, args.overrides), world)
        resume_point(cfg)
    except ValueError as exc:
        print(f"launch/train.py: invalid config: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(
        max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    )
    try:
        Trainer(cfg).fit()
    # Bad input found while running (e.g. a document that fits nowhere), or a NaN/inf step.
    except (ValueError, FloatingPointError) as exc:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        print(f"launch/train.py: error on rank {rank}: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_process(main())  # sys.exit's teardown can abort under gloo: see exit_process
