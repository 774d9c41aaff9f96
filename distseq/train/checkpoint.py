"""Save / resume with ``torch.distributed.checkpoint`` (DeepSpeed: its own checkpoint format).

Each checkpoint directory ``step_N`` holds the sharded model + optimizer state and
``meta.json``: the step, the data-loader state and the parallel/data layout the run used.
Resuming under a different layout refuses loudly, before any process-group work: rank-local
data state and sequence padding are only valid for the layout that produced them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from distseq.train.config import Config
from distseq.train.engine import DeepSpeedEngine, Engine

META = "meta.json"


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.out_dir) / "checkpoints")


def layout_signature(cfg: Config) -> dict[str, object]:
    """What must not change between saving and resuming."""
    par, data = cfg.parallel, cfg.data
    return {
        "planner": cfg.planner,
        "parallel.dp": par.dp,
        "parallel.sp": par.sp,
        "parallel.layout": par.layout,
        "parallel.engine": par.engine,
        "data.source": data.source,
        "data.seq_len": data.seq_len,
        "data.pad_multiple": data.pad_multiple,
        "train.global_batch": cfg.train.global_batch,
        "train.seed": cfg.train.seed,
    }


def resolve_resume(cfg: Config) -> Path | None:
    """The directory to resume from (``checkpoint.resume``: ``latest`` or a path), or None."""
    resume = cfg.checkpoint.resume
    if not resume:
        return None
    if resume == "latest":
        steps = sorted(checkpoint_root(cfg).glob("step_*/" + META))
        if not steps:
            raise ValueError(
                f"checkpoint.resume=latest but {checkpoint_root(cfg)} holds no checkpoint"
            )
        return max((p.parent for p in steps), key=lambda p: int(p.name.split("_")[1]))
    path = Path(resume)
    if not (path / META).is_file():
        raise ValueError(f"checkpoint.resume={resume!r} is not a checkpoint directory ({META})")
    return path


def read_meta(path: Path, cfg: Config) -> dict:
    """Load ``meta.json`` and refuse if the run's layout differs from the saved one."""
    meta = json.loads((path / META).read_text())
    now = layout_signature(cfg)
    diffs = [
        f"{key}: saved {meta['layout'].get(key)!r}, now {value!r}"
        for key, value in now.items()
        if meta["layout"].get(key) != value
    ]
    if diffs:
        raise ValueError(
            f"cannot resume from {path}: the parallel/data layout changed ({'; '.join(diffs)}); "
            "the data-loader state and padding are only valid for the saved layout - resume "
            "with the saved values or start a new run"
        )
    return meta


def resume_point(cfg: Config) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its checked ``meta.json`` (files only, no
    process-group work), or None when not resuming."""
    path = resolve_resume(cfg)
    return None if path is None else (path, read_meta(path, cfg))


def save(path: Path, cfg: Config, engine: Engine, step: int, loader_state: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(engine, DeepSpeedEngine):
        engine.module.save_checkpoint(str(path), tag="deepspeed")
    else:
        model_state, optim_state = get_state_dict(engine.model, engine.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path / "dcp"))
    dist.barrier()
    if dist.get_rank() == 0:
        meta = {"step": step, "loader": loader_state, "layout": layout_signature(cfg)}
        (path / META).write_text(json.dumps(meta, indent=1))
    dist.barrier()


def load(path: Path, engine: Engine) -> None:
    if isinstance(engine, DeepSpeedEngine):
        engine.module.load_checkpoint(str(path), tag="deepspeed")
        return
    model_state, optim_state = get_state_dict(engine.model, engine.optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(
        engine.model,
        engine.optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
    )
