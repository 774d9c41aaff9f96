"""Save / resume with ``torch.distributed.checkpoint`` (DeepSpeed: its own checkpoint format).

Each checkpoint directory ``step_N`` holds the sharded model + optimizer state, ``meta.json``
(the step, the data-loader state, the layout signature and the layout it was saved with) and,
written last and atomically by rank 0 once every rank has finished writing, the ``COMPLETE``
marker: the size of every file, so a checkpoint missing a file, holding a truncated one or
interrupted before the marker is recognised without reading it. ``checkpoint.resume: auto``
takes the newest complete one, skipping (with a warning naming it) any newer that is not.

Model and optimizer state are saved with global shapes (DCP), so a run resumes at another
``dp x sp``, layout or engine (DDP <-> FSDP): the loader state is a position in the global
data order. Only :func:`layout_signature` (what the data stream depends on, and DeepSpeed's
format, which is neither DCP nor reshardable here) must match; a mismatch is refused before
any process-group work. ``checkpoint.export_hf`` also writes the final model as a Hugging Face
directory.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from distseq.train.config import Config
from distseq.train.engine import DeepSpeedEngine, Engine
from distseq.train.mesh import launched_rank
from distseq.train.zero import ShardedEngine

META = "meta.json"
COMPLETE = "COMPLETE"
PREFIX = "step_"


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it is incomplete or unreadable."""


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.out_dir) / "checkpoints")


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX))


def step_dirs(root: Path) -> list[Path]:
    """The ``step_N`` directories under ``root``, newest (largest N) first."""
    found = [p for p in root.glob(PREFIX + "*") if p.name.removeprefix(PREFIX).isdigit()]
    return sorted(found, key=_step_of, reverse=True)


def _deepspeed(cfg: Config) -> bool:
    return cfg.parallel.engine == "deepspeed" and cfg.planner == "static"


def layout_signature(cfg: Config) -> dict[str, object]:
    """What must not change between saving and resuming: what the global data order depends
    on, and the state's format. DeepSpeed's ZeRO partitions are per rank in its own format,
    so it also keeps the world size and stage; DCP state (ddp, fsdp, adaptive) reshards."""
    par, data = cfg.parallel, cfg.data
    signature: dict[str, object] = {
        "planner": cfg.planner,
        "data.source": data.source,
        "data.seq_len": data.seq_len,
        "data.pad_multiple": data.pad_multiple,
        "train.global_batch": cfg.train.global_batch,
        "train.seed": cfg.train.seed,
        "state format": "deepspeed" if _deepspeed(cfg) else "torch.distributed.checkpoint",
    }
    if _deepspeed(cfg):
        signature |= {"dp x sp (deepspeed)": par.dp * par.sp, "parallel.zero_stage": par.zero_stage}
    return signature


def saved_with(cfg: Config) -> dict[str, object]:
    """The layout a checkpoint was taken at (for the record; it may change on resume)."""
    par = cfg.parallel
    return {"dp": par.dp, "sp": par.sp, "layout": par.layout, "engine": par.engine}


def _write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a part (rename is atomic)."""
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _file_sizes(path: Path) -> dict[str, int]:
    return {
        str(f.relative_to(path)): f.stat().st_size
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != COMPLETE
    }


def problem(path: Path) -> str | None:
    """Why ``path`` is not a complete, readable checkpoint, or None if it is (reads only
    the marker, ``meta.json`` and file sizes)."""
    marker = path / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} marker (its save did not finish)"
    try:
        expected = json.loads(marker.read_text())["files"]
        meta = json.loads((path / META).read_text())
        meta["step"], meta["loader"], meta["layout"]  # noqa: B018 - KeyError if absent
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {COMPLETE} or {META} ({type(exc).__name__}: {exc})"
    for name, size in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def resolve_resume(cfg: Config) -> Path | None:
    """The directory ``checkpoint.resume`` names, or None to start fresh: ``auto`` is the
    newest complete checkpoint under :func:`checkpoint_root` (None if there is none),
    ``latest`` the same but none is an error, ``none`` / null never resumes."""
    resume = cfg.checkpoint.resume
    if resume is None or resume == "none":
        return None
    if resume in ("auto", "latest"):
        root = checkpoint_root(cfg)
        for path in step_dirs(root):
            why = problem(path)
            if why is None:
                return path
            if launched_rank() == 0:
                warnings.warn(
                    f"skipping checkpoint {path}: {why}; trying the previous one",
                    CheckpointWarning,
                    stacklevel=2,
                )
        if resume == "latest":
            raise ValueError(
                f"checkpoint.resume=latest but {root} holds no complete checkpoint; use "
                "checkpoint.resume=auto to start fresh when there is none"
            )
        return None
    path = Path(resume)
    why = problem(path)
    if why is not None:
        raise ValueError(f"checkpoint.resume={resume!r} is not a complete checkpoint: {why}")
    return path


def read_meta(path: Path, cfg: Config) -> dict:
    """Load ``meta.json`` and refuse if what cannot be resharded differs from the saved run."""
    meta = json.loads((path / META).read_text())
    now = layout_signature(cfg)
    diffs = [
        f"{key}: saved {meta['layout'].get(key)!r}, now {value!r}"
        for key, value in now.items()
        if meta["layout"].get(key) != value
    ]
    if diffs:
        raise ValueError(
            f"cannot resume from {path}: {'; '.join(diffs)}. The data order depends on the "
            "data keys, planner, batch and seed; DeepSpeed's own format resumes only with "
            "DeepSpeed at the same dp x sp and stage (ddp / fsdp / adaptive state reshards to "
            "any dp, sp, layout). Resume with the saved values, or start a new run "
            "(checkpoint.resume=none or another checkpoint.dir)"
        )
    return meta


def resume_point(cfg: Config) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its checked ``meta.json`` (files only, no
    process-group work), or None when starting fresh."""
    path = resolve_resume(cfg)
    return None if path is None else (path, read_meta(path, cfg))


def save(path: Path, cfg: Config, engine: Engine, step: int, loader_state: dict) -> None:
    """Collective. The ``COMPLETE`` marker is written last; ``checkpoint.keep_last`` then
    removes older checkpoints (never before a newer one is complete)."""
    is_main = dist.get_rank() == 0
    if is_main and path.exists():  # a crashed save's leftovers, or a run resumed before it
        shutil.rmtree(path)
    dist.barrier()
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(engine, DeepSpeedEngine):
        engine.module.save_checkpoint(str(path), tag="deepspeed")
    elif isinstance(engine, ShardedEngine):  # replicated weights; each rank's own shard
        dcp.save({"model": get_model_state_dict(engine.model)}, checkpoint_id=str(path / "dcp"))
        torch.save(engine.state_dict(), path / f"zero_rank{dist.get_rank()}.pt")
    else:
        model_state, optim_state = get_state_dict(engine.model, engine.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path / "dcp"))
    dist.barrier()
    if is_main:
        meta = {"step": step, "loader": loader_state, "layout": layout_signature(cfg),
                "saved_with": saved_with(cfg)}  # fmt: skip
        _write_atomic(path / META, json.dumps(meta, indent=1))
        _write_atomic(path / COMPLETE, json.dumps({"step": step, "files": _file_sizes(path)}))
        prune(path.parent, cfg.checkpoint.keep_last)
    dist.barrier()


def prune(root: Path, keep_last: int) -> None:
    """Delete every checkpoint older than the ``keep_last``-th newest complete one (0: keep
    all); incomplete ones newer than it stay until a complete one passes them."""
    if not keep_last:
        return
    complete = [path for path in step_dirs(root) if problem(path) is None]
    if len(complete) <= keep_last:
        return
    oldest_kept = _step_of(complete[keep_last - 1])
    for path in step_dirs(root):
        if _step_of(path) < oldest_kept:
            shutil.rmtree(path)


def load(path: Path, engine: Engine) -> None:
    """Collective: fill ``engine``'s model and optimizer from ``path``, resharding DCP state
    to this run's engine and mesh."""
    if isinstance(engine, DeepSpeedEngine):
        engine.module.load_checkpoint(str(path), tag="deepspeed")
        return
    if isinstance(engine, ShardedEngine):
        state = {"model": get_model_state_dict(engine.model)}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_model_state_dict(engine.model, state["model"])
        shard = path / f"zero_rank{dist.get_rank()}.pt"
        if not shard.is_file():
            raise ValueError(
                f"{path} has no sharded optimizer state for rank {dist.get_rank()} ({shard.name}); "
                "it was saved without adaptive.zero_stage or on fewer ranks: resume with the "
                "saving run's adaptive.zero_stage and world size"
            )
        engine.load_state_dict(torch.load(shard, weights_only=True))
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
