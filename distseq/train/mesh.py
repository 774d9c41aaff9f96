"""Process-group start-up and the ``dp x sp`` device mesh."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

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


def launched_rank() -> int:
    """Global rank before any process-group work (torchrun's ``RANK``; 0 for a plain run)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device, timeout_s: float) -> None:
    """Join torchrun's rendezvous (env://), or start a one-process group for a plain run; a
    collective that waits ``timeout_s`` seconds for a peer (e.g. a dead rank) raises.

    An already initialised group (tests, notebooks) is kept.
    """
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    if "RANK" in os.environ:
        _warn_if_restarts_cannot_rejoin()
        dist.init_process_group(_backend(device), timeout=timeout)
    else:
        dist.init_process_group(
            _backend(device), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )


def _warn_if_restarts_cannot_rejoin() -> None:
    """torchrun shares its rendezvous store with the workers unless told not to; restarted
    workers then read the previous attempt's addresses from it and fail to connect
    (pytorch/pytorch#135712), so ``--max-restarts`` needs the opt-out in torchrun's env."""
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if shared and restarts and launched_rank() == 0:
        warnings.warn(
            f"torchrun --max-restarts {restarts} without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: "
            "restarted workers may fail to connect (pytorch/pytorch#135712); launch as "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --max-restarts N ...",
            RuntimeWarning,
            stacklevel=3,
        )


def _group_options(device: torch.device, timeout_s: float) -> tuple[str, object]:
    """Options giving the mesh's sub-groups ``timeout_s`` too (``new_group`` would otherwise
    use torch's default, 30 min for gloo and 10 min for NCCL, whatever the world's is)."""
    backend = _backend(device)
    options = (
        dist.ProcessGroupNCCL.Options() if backend == "nccl" else dist.ProcessGroupGloo._Options()
    )
    options._timeout = timedelta(seconds=timeout_s)
    return backend, options


@dataclass(frozen=True)
class Mesh:
    """``mesh`` has dims ``("dp", "sp")``; sequence shards live on ``sp``. Parameters are
    replicated over both dims, so gradients are reduced over all ``dp x sp`` ranks (``flat``)."""

    mesh: DeviceMesh
    device: torch.device
    timeout_s: float

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
        override = _group_options(self.device, self.timeout_s)
        return self.mesh._flatten("dp_sp", backend_override=override)


def build_mesh(dp: int, sp: int, device: torch.device, timeout_s: float) -> Mesh:
    """The ``dp x sp`` mesh; its groups time out after ``timeout_s`` seconds."""
    override = _group_options(device, timeout_s)
    mesh = init_device_mesh(
        device.type, (dp, sp), mesh_dim_names=("dp", "sp"),
        backend_override={"dp": override, "sp": override},
    )  # fmt: skip
    return Mesh(mesh, device, timeout_s)
