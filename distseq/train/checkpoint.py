"""Save / resume with ``torch.distributed.checkpoint`` (DeepSpeed: its own checkpoint format).

Each checkpoint directory ``step_N`` holds the sharded model + optimizer state and
``meta.json``: the step, the data-loader state and the parallel/data layout the run used.
Resuming under a different layout refuses loudly, before any process-group work: rank-local
data state and sequence padding are only valid for the layout that produced them.
``checkpoint.export_hf`` also writes the final model as a Hugging Face directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

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


def full_model_state(engine: Engine) -> dict[str, torch.Tensor] | None:
    """The model's whole state dict on CPU on global rank 0, gathered from every engine's
    shards (FSDP2 DTensors, ZeRO-3 partitions); ``None`` on the other ranks. Collective."""
    if isinstance(engine, DeepSpeedEngine) and engine.module.zero_optimization_partition_weights():
        # DeepSpeed's own gather, layer by layer onto rank 0 (what save_16bit_model uses);
        # "16bit" is its name: parameters keep the dtype they train in.
        return engine.module._zero3_consolidated_16bit_state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(engine.model, options=options)
    return state if dist.get_rank() == 0 else None


def export_hf(cfg: Config, engine: Engine) -> None:
    """Write the trained Hugging Face model to ``checkpoint.export_hf`` (rank 0 writes, with
    ``data.tokenizer``'s tokenizer when there is one); every rank returns when it is done,
    or raises if rank 0 could not write (instead of waiting for it forever)."""
    from distseq.hf.export import save_hf

    state = full_model_state(engine)
    error: list[str | None] = [None]
    failure: Exception | None = None
    if dist.get_rank() == 0:
        try:
            save_hf(engine.model, state, cfg.checkpoint.export_hf, tokenizer=cfg.data.tokenizer)
        except Exception as exc:  # noqa: BLE001 - every rank must hear of any failure
            failure, error[0] = exc, f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(error, src=0)
    if failure is not None:
        raise failure
    if error[0] is not None:
        raise RuntimeError(f"checkpoint.export_hf failed on rank 0: {error[0]}")
