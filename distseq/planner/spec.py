"""What is being planned: the model (a training config's ``model:`` section) and the cluster."""

from __future__ import annotations

import os
from dataclasses import dataclass

from distseq.planner.units import parse_bytes

LAYER_TYPES = ("softmax", "linear")
_MIXER_MODES = ("softmax", "linear", "hybrid")


@dataclass(frozen=True)
class ModelSpec:
    """A decoder stack; ``layers`` holds one mixer type (``softmax``/``linear``) per layer.

    Keys of the ``model:`` config section (shared with ``launch/train.py``): ``vocab_size``,
    ``d_model``, ``n_layers``, ``n_heads``, ``n_kv_heads``, ``head_dim`` (default
    ``d_model // n_heads``), ``ffn_hidden``, ``mixers`` (``softmax`` | ``linear`` | ``hybrid`` |
    explicit per-layer list) and ``hybrid_ratio`` (``"3:1"`` = 3 linear then 1 softmax).
    """

    vocab_size: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int
    layers: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} = {value!r}; it must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads = {self.n_heads} is not a multiple of model.n_kv_heads = "
                f"{self.n_kv_heads}; pick n_kv_heads dividing n_heads"
            )
        if not self.layers:
            raise ValueError("model.n_layers must be at least 1")
        bad = sorted(set(self.layers) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"model.mixers has unknown layer types {bad}; use {list(LAYER_TYPES)}")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def count(self, layer_type: str) -> int:
        return sum(1 for t in self.layers if t == layer_type)

    @property
    def layer_types(self) -> tuple[str, ...]:
        """The layer types present, in the fixed order of :data:`LAYER_TYPES`."""
        return tuple(t for t in LAYER_TYPES if t in self.layers)

    def layer_params(self) -> int:
        """Parameters of one block: Q/K/V/O projections and a SwiGLU FFN (norms neglected)."""
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        return attn + 3 * self.d_model * self.ffn_hidden

    def params(self) -> int:
        """All parameters, with untied input embedding and output head."""
        return self.n_layers * self.layer_params() + 2 * self.vocab_size * self.d_model


def _layers(section: dict) -> tuple[str, ...]:
    n_layers = section.get("n_layers")
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers <= 0:
        raise ValueError(f"model.n_layers = {n_layers!r}; it must be a positive integer")
    mixers = section.get("mixers", "softmax")
    if isinstance(mixers, (list, tuple)):
        if len(mixers) != n_layers:
            raise ValueError(
                f"model.mixers lists {len(mixers)} layers but model.n_layers = {n_layers}; "
                "give one mixer per layer"
            )
        return tuple(str(m) for m in mixers)
    if mixers not in _MIXER_MODES:
        raise ValueError(
            f"model.mixers = {mixers!r}; use one of {list(_MIXER_MODES)} or a per-layer list"
        )
    if mixers != "hybrid":
        return (mixers,) * n_layers
    ratio = str(section.get("hybrid_ratio", "3:1"))
    try:
        n_linear, n_softmax = (int(x) for x in ratio.split(":"))
        assert n_linear >= 0 and n_softmax >= 0 and n_linear + n_softmax > 0
    except (ValueError, AssertionError):
        raise ValueError(
            f"model.hybrid_ratio = {ratio!r}; write 'LINEAR:SOFTMAX' with non-negative "
            "integers, e.g. '3:1'"
        ) from None
    pattern = ("linear",) * n_linear + ("softmax",) * n_softmax
    return tuple(pattern[i % len(pattern)] for i in range(n_layers))


def model_from_dict(section: dict) -> ModelSpec:
    """Build a :class:`ModelSpec` from a ``model:`` section (a plain mapping)."""
    required = ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden")
    missing = [k for k in required if k not in section]
    if missing:
        raise ValueError(f"model section lacks {missing}; add them (see configs/planner_7b.yaml)")
    n_heads = section["n_heads"]
    d_model = section["d_model"]
    head_dim = section.get("head_dim") or (
        d_model // n_heads if isinstance(n_heads, int) and n_heads > 0 else None
    )
    return ModelSpec(
        vocab_size=section["vocab_size"],
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=section.get("n_kv_heads", n_heads),
        head_dim=head_dim,
        ffn_hidden=section["ffn_hidden"],
        layers=_layers(section),
    )


def load_model(path: str) -> ModelSpec:
    """Read the ``model:`` section of a training config YAML."""
    from omegaconf import OmegaConf

    if not os.path.isfile(path):
        raise ValueError(f"model config {path!r} does not exist; pass e.g. configs/planner_7b.yaml")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(  # noqa: TRY004 - a bad config file is bad input: ValueError
            f"{path} has no 'model:' section; add one with the model's shape keys"
        )
    return model_from_dict(config["model"])


def config_flag(path: str, key: str) -> bool:
    """A boolean from elsewhere in the training config, e.g. ``train.activation_checkpointing``
    (``False`` when absent)."""
    from omegaconf import OmegaConf

    return bool(OmegaConf.select(OmegaConf.load(path), key, default=False))


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class Cluster:
    """``world_size`` ranks, ``gpus_per_node`` per node, ``memory_bytes`` usable per rank."""

    world_size: int
    gpus_per_node: int
    memory_bytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world size {self.world_size!r} must be a positive integer")
        if not _is_power_of_two(self.gpus_per_node):
            raise ValueError(
                f"gpus per node = {self.gpus_per_node!r}; aligned power-of-two groups need a "
                "power of two (1, 2, 4, 8, ...)"
            )
        if self.world_size > self.gpus_per_node and self.world_size % self.gpus_per_node:
            raise ValueError(
                f"world size {self.world_size} is not a whole number of nodes of "
                f"{self.gpus_per_node} GPUs; use a multiple of {self.gpus_per_node}"
            )
        if self.memory_bytes <= 0:
            raise ValueError(f"memory per rank {self.memory_bytes!r} must be positive")

    @classmethod
    def from_strings(cls, gpus: int, gpus_per_node: int, memory: str | int) -> Cluster:
        return cls(int(gpus), int(gpus_per_node), parse_bytes(memory))

    def degrees(self) -> list[int]:
        """Group sizes a plan may use: powers of two up to the world size."""
        out, d = [], 1
        while d <= self.world_size:
            out.append(d)
            d *= 2
        return out

    def spans_nodes(self, degree: int) -> bool:
        """An aligned group larger than a node spans nodes; smaller ones never do."""
        return degree > self.gpus_per_node
