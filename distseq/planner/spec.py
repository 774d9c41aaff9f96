"""What is being planned: the model (a training config's ``model:`` section) and the cluster."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from distseq.models.config import (
    MIXERS,
    ModelConfig,
    block_parameters,
    check_model_config,
    count_parameters,
    layer_mixers,
    model_config_from_dict,
)

LAYER_TYPES = MIXERS


@dataclass(frozen=True)
class ModelSpec:
    """What the cost model needs of a decoder, derived from its :class:`ModelConfig` by
    :meth:`from_config` (layers from :func:`layer_mixers`, parameters from
    :func:`block_parameters` / :func:`count_parameters`; a Hugging Face model's from
    :meth:`from_hf`), so the planner and the model never disagree. ``layers``: one mixer
    type (``softmax``/``linear``/``gdn``) per layer; ``block_params``: parameters of each block;
    ``params``: the whole model's."""

    vocab_size: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int
    layers: tuple[str, ...]
    block_params: tuple[int, ...]
    params: int

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ModelSpec:
        check_model_config(cfg)
        if cfg.hf_key is not None:
            from distseq.hf.model import load_hf_config

            return cls.from_hf(load_hf_config(cfg), cfg.hf_key)
        return cls(
            vocab_size=cfg.vocab_size,
            d_model=cfg.d_model,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.resolved_head_dim,
            ffn_hidden=cfg.ffn_hidden,
            layers=tuple(layer_mixers(cfg)),
            block_params=tuple(block_parameters(cfg)),
            params=count_parameters(cfg),
        )

    @classmethod
    def from_hf(cls, config, key: str = "model.hf_config") -> ModelSpec:
        """The spec of the ``transformers`` causal LM of ``config`` (a ``PretrainedConfig``):
        parameters counted exactly on the model built on the meta device (biases, q/k norms,
        tied embeddings counted once); every layer a ``softmax`` one (what
        :func:`distseq.hf.apply` shards). ``key`` names the model in errors."""
        from distseq.hf.model import meta_model

        model = meta_model(config, key)
        text = config.get_text_config()
        layers = model.get_decoder().layers
        heads = text.num_attention_heads
        ffn = getattr(text, "intermediate_size", None)
        if not isinstance(ffn, int):  # e.g. mixture-of-experts configs
            raise ValueError(
                f"{key}: the config has no integer intermediate_size ({ffn!r}), which the "
                "planner's memory model needs; only dense causal LMs are supported"
            )
        return cls(
            vocab_size=text.vocab_size,
            d_model=text.hidden_size,
            n_heads=heads,
            n_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            ffn_hidden=ffn,
            layers=("softmax",) * len(layers),
            block_params=tuple(sum(p.numel() for p in layer.parameters()) for layer in layers),
            params=sum(p.numel() for p in model.parameters()),
        )

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def count(self, layer_type: str) -> int:
        return sum(1 for t in self.layers if t == layer_type)

    @property
    def layer_types(self) -> tuple[str, ...]:
        """The layer types present, in the fixed order of :data:`LAYER_TYPES`."""
        return tuple(t for t in LAYER_TYPES if t in self.layers)


_REQUIRED = ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden")


def model_from_dict(section: Mapping[str, Any]) -> ModelSpec:
    """Build a :class:`ModelSpec` from a ``model:`` section (a plain mapping), read exactly as
    training reads it (:func:`distseq.models.model_config_from_dict`). The shape keys are
    required (unless ``hf`` / ``hf_config`` names a Hugging Face model): a plan for the
    schema's tiny default model is almost surely a mistake."""
    hf = "hf" in section or "hf_config" in section
    missing = [k for k in _REQUIRED if k not in section and not hf]
    if missing:
        raise ValueError(f"model section lacks {missing}; add them (see configs/planner_7b.yaml)")
    return ModelSpec.from_config(model_config_from_dict(section))


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
