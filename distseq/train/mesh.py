"""Process-group start-up and the ``dp x sp`` device mesh."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def launched_world_size() -> int:
    """World size before any process-group work: torchrun's ``WORLD_SIZE``, an already
    initialised group's size, or 1 for a plain ``python`` run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is visible; use cpu or auto")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(device: torch.device) -> None:
    """Join torchrun's rendezvous (env://), or start a one-process group for a plain run.

    An already initialised group (tests, notebooks) is kept.
    """
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


@dataclass(frozen=True)
class Mesh:
    """``mesh`` has dims ``("dp", "sp")``; sequence shards live on ``sp``. Parameters are
    replicated over both dims, so gradients are reduced over all ``dp x sp`` ranks (``flat``)."""

    mesh: DeviceMesh
    device: torch.device

    @property
    def sp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("sp")

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")

    @property
    def dp(self) -> int:
        return self.mesh.size(0)

    @property
    def sp(self) -> int:
        return self.mesh.size(1)

    @property
    def world_size(self) -> int:
        return self.mesh.size()

    def flat(self) -> DeviceMesh:
        """The 1-D ``dp_sp`` mesh over every rank (FSDP shards over it, as torchtitan does)."""
        return self.mesh._flatten("dp_sp")


def build_mesh(dp: int, sp: int, device: torch.device) -> Mesh:
    mesh = init_device_mesh(device.type, (dp, sp), mesh_dim_names=("dp", "sp"))
    return Mesh(mesh, device)
