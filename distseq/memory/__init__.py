"""Long-sequence memory: fused chunked loss, tiled MLP, offloaded checkpoints, tensor peaks.

Each piece trades recomputation (or host memory) for device memory and is exact against the
plain path; the ``memory:`` section of a training config (:class:`MemoryConfig`) turns them
on.
"""

from distseq.memory.config import PLAIN, MemoryConfig, check_memory_config, resolve_mlp_tiles
from distseq.memory.loss import IGNORE_INDEX, linear_cross_entropy, summed_cross_entropy
from distseq.memory.tiling import tile_module, tiled_apply, tiled_module_call

__all__ = [
    "IGNORE_INDEX",
    "PLAIN",
    "MemoryConfig",
    "check_memory_config",
    "linear_cross_entropy",
    "resolve_mlp_tiles",
    "summed_cross_entropy",
    "tile_module",
    "tiled_apply",
    "tiled_module_call",
]
