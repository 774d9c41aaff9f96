"""The ``model:`` section of a training config, shared with the planner, and its checks."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

MIXERS = ("softmax", "linear", "gdn")
MIXER_SCHEDULES = ("softmax", "linear", "gdn", "hybrid")
GDN_CONV_SIZE = 4  # the Gated DeltaNet layer's short causal convolution (taps)
LINEAR_DECAYS = ("none", "constant", "data")


@dataclass
class ModelConfig:
    """A Llama-style decoder whose token mixer is chosen per layer, or a Hugging Face model.

    ``mixers`` is ``"softmax"``, ``"linear"``, ``"gdn"`` (Gated DeltaNet), ``"hybrid"``
    (layers follow ``hybrid_ratio`` ``"linear:softmax"``, e.g. ``"3:1"`` = three linear layers
    then one softmax layer, repeated; ``hybrid_linear: gdn`` makes those linear layers Gated
    DeltaNet ones) or an explicit per-layer list such as ``[linear, linear, linear, softmax]``
    or ``[gdn, gdn, gdn, softmax]``.
    ``head_dim`` defaults to ``d_model // n_heads``.

    ``hf``: a local Hugging Face directory (``config.json`` + safetensors, optionally a
    tokenizer) to fine-tune, or ``hf_config``: a ``transformers`` config mapping with its
    ``model_type`` (e.g. ``{model_type: llama, hidden_size: 64, ...}``) for a random-init
    model. Either one replaces the decoder keys above, which must then keep their defaults
    (the Hugging Face config defines vocabulary, heads and layers; see :mod:`distseq.hf.model`).
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None
    ffn_hidden: int = 176
    mixers: Any = "softmax"
    hybrid_ratio: str = "3:1"
    hybrid_linear: str = "linear"  # the recurrent mixer of `hybrid` layers: linear or gdn
    linear_decay: str = "data"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    hf: str | None = None
    hf_config: dict[str, Any] | None = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def hf_key(self) -> str | None:
        """``"model.hf"`` / ``"model.hf_config"``: the key naming a Hugging Face model, or
        ``None`` for distseq's own decoder."""
        if self.hf is not None:
            return "model.hf"
        return "model.hf_config" if self.hf_config is not None else None


HF_KEYS = ("hf", "hf_config")


def parse_hybrid_ratio(ratio: str) -> tuple[int, int]:
    """``"3:1"`` -> ``(3, 1)`` (linear layers, softmax layers per period)."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(ratio))
    if not match or int(match[1]) + int(match[2]) == 0:
        raise ValueError(
            f"model.hybrid_ratio={ratio!r} is not 'LINEAR:SOFTMAX' with non-negative integers "
            "(e.g. '3:1'); quote it in YAML, which reads an unquoted 3:1 as the number 181"
        )
    return int(match[1]), int(match[2])


def layer_mixers(cfg: ModelConfig) -> list[str]:
    """The mixer of every layer (``"softmax"`` or ``"linear"``), validated; distseq's own
    decoder only (a Hugging Face model's layers are in its config: ``ModelSpec.from_config``)."""
    if cfg.hf_key is not None:
        raise ValueError(
            f"{cfg.hf_key} names a Hugging Face model, not distseq's decoder: build it with "
            "distseq.hf.model.build_hf_model and describe it with ModelSpec.from_config"
        )
    schedule = cfg.mixers
    if isinstance(schedule, str):
        if schedule not in MIXER_SCHEDULES:
            raise ValueError(
                f"model.mixers={schedule!r}; choose one of {list(MIXER_SCHEDULES)} or a "
                f"per-layer list of {list(MIXERS)}"
            )
        if schedule != "hybrid":
            return [schedule] * cfg.n_layers
        n_linear, n_softmax = parse_hybrid_ratio(cfg.hybrid_ratio)
        period = [cfg.hybrid_linear] * n_linear + ["softmax"] * n_softmax
        return [period[i % len(period)] for i in range(cfg.n_layers)]
    layers = [str(m) for m in schedule]
    if len(layers) != cfg.n_layers or any(m not in MIXERS for m in layers):
        raise ValueError(
            f"model.mixers={layers} must list exactly model.n_layers={cfg.n_layers} entries, "
            f"each one of {list(MIXERS)}"
        )
    return layers


def check_hf_keys(cfg: ModelConfig) -> None:
    """A Hugging Face model is named by exactly one of ``model.hf`` / ``model.hf_config``,
    and the decoder keys it replaces keep their defaults (a set one would be ignored)."""
    if cfg.hf is not None and cfg.hf_config is not None:
        raise ValueError(
            "model.hf and model.hf_config are both set; keep model.hf (a local directory to "
            "fine-tune) or model.hf_config (a random-init model), not both"
        )
    if cfg.hf is not None and (not isinstance(cfg.hf, str) or not cfg.hf):
        raise ValueError(f"model.hf={cfg.hf!r} must be a local directory path")
    if cfg.hf_config is not None and not (
        isinstance(cfg.hf_config, Mapping) and isinstance(cfg.hf_config.get("model_type"), str)
    ):
        raise ValueError(
            f"model.hf_config={cfg.hf_config!r} is not a mapping with a model_type; add e.g. "
            "model_type: llama (any causal LM type transformers registers)"
        )
    defaults = ModelConfig()
    ignored = [
        f"model.{f.name}={getattr(cfg, f.name)!r}"
        for f in fields(ModelConfig)
        if f.name not in HF_KEYS and getattr(cfg, f.name) != getattr(defaults, f.name)
    ]
    if ignored:
        raise ValueError(
            f"{', '.join(ignored)} would be ignored: with {cfg.hf_key} the Hugging Face config "
            "defines the model; remove these keys (or set them in model.hf_config)"
        )


def check_model_config(cfg: ModelConfig) -> None:
    """Raise ``ValueError`` naming the ``model.*`` key of the first invalid value. For a
    Hugging Face model only the keys are checked here; :func:`distseq.hf.model.load_hf_config`
    reads its config."""
    if cfg.hf_key is not None:
        check_hf_keys(cfg)
        return
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"model.{key}={value!r} must be a positive integer")
    if cfg.head_dim is not None and (not isinstance(cfg.head_dim, int) or cfg.head_dim <= 0):
        raise ValueError(f"model.head_dim={cfg.head_dim!r} must be a positive integer or null")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(
            f"model.n_heads={cfg.n_heads} must be a multiple of model.n_kv_heads="
            f"{cfg.n_kv_heads} (grouped-query attention)"
        )
    if cfg.head_dim is None and cfg.d_model % cfg.n_heads:
        raise ValueError(
            f"model.d_model={cfg.d_model} is not divisible by model.n_heads={cfg.n_heads}; "
            "set model.head_dim explicitly"
        )
    head_dim = cfg.resolved_head_dim
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"model.head_dim={head_dim} must be a positive even number (RoPE)")
    parse_hybrid_ratio(cfg.hybrid_ratio)
    if cfg.linear_decay not in LINEAR_DECAYS:
        raise ValueError(
            f"model.linear_decay={cfg.linear_decay!r}; choose one of {list(LINEAR_DECAYS)}"
        )
    if cfg.hybrid_linear not in ("linear", "gdn"):
        raise ValueError(f"model.hybrid_linear={cfg.hybrid_linear!r}; choose linear or gdn")
    if not cfg.rope_theta > 0:
        raise ValueError(f"model.rope_theta={cfg.rope_theta} must be positive")
    if not cfg.init_std > 0:
        raise ValueError(f"model.init_std={cfg.init_std} must be positive")
    layer_mixers(cfg)


def model_config_from_dict(section: Mapping[str, Any]) -> ModelConfig:
    """A checked :class:`ModelConfig` from a ``model:`` mapping (as a YAML file gives it)."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"model section has unknown keys {unknown}; known keys: {sorted(known)}")
    cfg = ModelConfig(**section)
    check_model_config(cfg)
    return cfg


def block_parameters(cfg: ModelConfig) -> list[int]:
    """Parameters of every :class:`~distseq.models.DecoderBlock` (mixer, SwiGLU, two norms)."""
    d, hd = cfg.d_model, cfg.resolved_head_dim
    softmax = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    linear = (
        d * hd * 4 * cfg.n_heads
        + (d * cfg.n_heads + cfg.n_heads) * (cfg.linear_decay == "data")
        + hd
    )
    # Gated DeltaNet: q/k/v, gate and output projections, the q/k/v conv, the beta (with
    # bias) and decay projections, the decay's A_log and dt_bias, the output norm.
    gdn = (
        5 * d * hd * cfg.n_heads
        + GDN_CONV_SIZE * 3 * hd * cfg.n_heads
        + 2 * d * cfg.n_heads
        + 3 * cfg.n_heads
        + hd
    )
    mixer = {"softmax": softmax, "linear": linear, "gdn": gdn}
    rest = 3 * d * cfg.ffn_hidden + 2 * d
    return [mixer[m] + rest for m in layer_mixers(cfg)]


def count_parameters(cfg: ModelConfig) -> int:
    """Parameter count of :class:`distseq.models.Decoder` for ``cfg`` (no tensors built)."""
    embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return embed + sum(block_parameters(cfg)) + cfg.d_model
