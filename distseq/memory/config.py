"""The ``memory:`` section of a training config: what trades recomputation for memory."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DEFAULT_LOSS_CHUNK_TOKENS = 4096


@dataclass
class MemoryConfig:
    """``loss_chunk_tokens``: tokens per chunk of the fused output projection + cross-entropy
    (0: the plain path, which materialises float32 logits ``[S_local, vocab]``).
    ``mlp_tiles``: sequence tiles of every MLP, recomputed in backward (1: off; ``auto``:
    ``ceil(tokens / d_model)``, so a tile's ``[tile, ffn_hidden]`` intermediates are no
    larger than one MLP weight). ``offload_checkpoints``: keep each checkpointed layer's
    input in host memory (needs ``train.activation_checkpointing``)."""

    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS
    mlp_tiles: Any = "auto"
    offload_checkpoints: bool = False


# Everything off: the behaviour of a model built without a training config.
PLAIN = MemoryConfig(loss_chunk_tokens=0, mlp_tiles=1, offload_checkpoints=False)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_memory_config(mem: MemoryConfig, checkpointing: str | bool = "full") -> None:
    """Raise ``ValueError`` naming the ``memory.*`` key of the first invalid value."""
    chunk = mem.loss_chunk_tokens
    if not _is_int(chunk) or chunk < 0:
        raise ValueError(
            f"memory.loss_chunk_tokens={chunk!r} must be an integer >= 0 (0 turns the chunked "
            f"loss off; {DEFAULT_LOSS_CHUNK_TOKENS} is the default)"
        )
    tiles = mem.mlp_tiles
    if tiles != "auto" and (not _is_int(tiles) or tiles < 1):
        raise ValueError(
            f"memory.mlp_tiles={tiles!r} must be 'auto' or an integer >= 1 (1 turns tiling off)"
        )
    if not isinstance(mem.offload_checkpoints, bool):
        raise ValueError(f"memory.offload_checkpoints={mem.offload_checkpoints!r} must be a bool")
    if mem.offload_checkpoints and checkpointing in ("none", False):
        raise ValueError(
            "memory.offload_checkpoints=true offloads checkpointed layers' inputs, but "
            "train.activation_checkpointing is off; enable it (full or selective) or set "
            "memory.offload_checkpoints=false"
        )


def resolve_mlp_tiles(tiles: int | str, tokens: int, d_model: int) -> int:
    """The number of sequence tiles for ``tokens`` rows (``auto``: ``ceil(tokens / d_model)``),
    at most one tile per token."""
    count = math.ceil(tokens / d_model) if tiles == "auto" else int(tiles)
    return max(1, min(count, tokens))


def memory_config_from_yaml(path: str) -> MemoryConfig:
    """The checked ``memory:`` section of the training config at ``path`` (schema defaults
    for what it does not set), for tools that read a config without training it."""
    from omegaconf import OmegaConf

    section = OmegaConf.select(OmegaConf.load(path), "memory", default=None) or {}
    merged = OmegaConf.merge(OmegaConf.structured(MemoryConfig), section)
    mem = OmegaConf.to_object(merged)
    checkpointing = OmegaConf.select(OmegaConf.load(path), "train.activation_checkpointing")
    check_memory_config(mem, bool(checkpointing))
    return mem
