"""A Hugging Face causal LM as a model of distseq's trainer.

``model.hf`` (a local directory: ``config.json``, ``*.safetensors``, optionally a tokenizer) or
``model.hf_config`` (a ``transformers`` config mapping with its ``model_type``, random init)
in a training config name the model; :func:`build_hf_model` loads it (never downloads),
routes its attention through :func:`distseq.hf.apply` and wraps it in :class:`HFCausalLM`,
which the trainer calls exactly like :class:`distseq.models.Decoder`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from distseq.comm import ProcessGroup
from distseq.hf.apply import apply, check_config
from distseq.hf.attention import refuse
from distseq.memory import (
    PLAIN,
    MemoryConfig,
    linear_cross_entropy,
    summed_cross_entropy,
    tile_module,
)
from distseq.models.config import ModelConfig
from distseq.models.context import SequenceContext

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

# What marks a directory as holding a tokenizer that AutoTokenizer can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _transformers(key: str):
    try:
        import transformers
    except ImportError as exc:
        raise ValueError(
            f"{key} needs the 'transformers' and 'safetensors' packages: pip install "
            "'distseq[hf]' (or use distseq's own decoder: remove the key)"
        ) from exc
    return transformers


def has_tokenizer(directory: str | Path) -> bool:
    """Whether ``directory`` holds a Hugging Face tokenizer."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def _directory(cfg: ModelConfig) -> Path:
    path = Path(cfg.hf)
    if not path.is_dir():
        raise ValueError(
            f"model.hf={cfg.hf!r} is not a local directory; distseq never downloads: put the "
            "model's config.json and *.safetensors there (e.g. with huggingface-cli download)"
        )
    missing = [
        what
        for what, present in (
            ("config.json", (path / "config.json").is_file()),
            ("*.safetensors weights", any(path.glob("*.safetensors"))),
        )
        if not present
    ]
    if missing:
        raise ValueError(f"model.hf={cfg.hf!r} lacks {' and '.join(missing)}")
    return path


def _config_from_mapping(cfg: ModelConfig) -> PretrainedConfig:
    transformers = _transformers("model.hf_config")
    section = dict(cfg.hf_config)
    model_type = section.pop("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise ValueError(
            f"model.hf_config.model_type={model_type!r} is not a model type transformers "
            f"{transformers.__version__} registers; use e.g. llama, qwen2, qwen3 or mistral"
        )
    config = transformers.AutoConfig.for_model(model_type, **section)
    # A misspelt key becomes a stray attribute; keys the config consumes (rope_theta into
    # rope_parameters) do not.
    stray = set(config.to_dict()) - set(type(config)().to_dict())
    unknown = sorted(stray & set(section))
    if unknown:
        raise ValueError(
            f"model.hf_config has keys {unknown} that {type(config).__name__} does not define; "
            "check their spelling"
        )
    return config


def load_hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """The ``transformers`` config that ``cfg`` (with ``model.hf`` or ``model.hf_config``)
    names; a ``ValueError`` naming the key for a missing directory or a bad mapping."""
    if cfg.hf is None:
        return _config_from_mapping(cfg)
    path = _directory(cfg)
    transformers = _transformers("model.hf")
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"model.hf={cfg.hf!r}: config.json cannot be read: {exc}") from None


def _causal_lm(key: str, make):
    try:
        return make()
    except ValueError as exc:  # transformers: a config class without a causal-LM head
        raise ValueError(f"{key}: not a causal LM transformers can build: {exc}") from None


def meta_model(config: PretrainedConfig, key: str = "model.hf_config") -> PreTrainedModel:
    """The model of ``config`` on the meta device: shapes and parameter counts, no memory."""
    transformers = _transformers(key)
    with torch.device("meta"):
        return _causal_lm(key, lambda: transformers.AutoModelForCausalLM.from_config(config))


def check_trainable(model: PreTrainedModel, key: str) -> None:
    """Refuse, naming ``key`` and the config field, what distseq cannot train exactly: the
    attention features :func:`distseq.hf.apply` refuses, and attention dropout (training
    runs with dropout on)."""
    dropout = getattr(model.config.get_text_config(), "attention_dropout", 0.0) or 0.0
    try:
        check_config(model)
        if dropout:
            refuse("attention_dropout", dropout, "set it to 0.0")
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


# Config fields of models whose logits are more than ``lm_head(hidden)`` (scaled or capped).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def plain_output_head(model: PreTrainedModel) -> torch.Tensor | None:
    """The output head's weight ``[vocab, hidden]`` when the logits are exactly
    ``hidden @ weight.T`` (a bias-free linear head, no scaling or capping), else ``None``."""
    head = model.get_output_embeddings()
    config = model.config.get_text_config()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return head.weight


def offload_layer_checkpoints(layers: nn.ModuleList, enabled: bool) -> None:
    """Run each layer's checkpoint function (set by transformers' gradient checkpointing)
    under :class:`distseq.memory.offload.OffloadInputs`, so its saved input lives in host
    memory; ``enabled=False`` restores the plain one."""
    from distseq.memory.offload import offload_context

    for layer in layers:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        func = getattr(func, "distseq_plain", func)
        if func is None or not enabled:
            if func is not None:
                layer._gradient_checkpointing_func = func
            continue

        def offloaded(*args, _func=func, **kwargs):
            with offload_context(True):
                return _func(*args, **kwargs)

        offloaded.distseq_plain = func
        layer._gradient_checkpointing_func = offloaded


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM called like :class:`distseq.models.Decoder`:
    ``forward(tokens [B, S_local], ctx)`` -> float logits ``[B, S_local, vocab]``.

    Each call passes ``ctx`` to every attention layer (``distseq_context``), so the layers use
    its group, layout, strategy, backend and documents (what the adaptive planner changes per
    micro-batch), and its per-document positions as ``position_ids`` (RoPE). ``hf`` is the
    wrapped model; ``original_attn_implementation`` what it used before distseq's.
    """

    def __init__(self, model: PreTrainedModel, original_attn_implementation: str | None) -> None:
        super().__init__()
        self.hf = model
        self.original_attn_implementation = original_attn_implementation
        self.memory = PLAIN

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers (what FSDP shards one by one)."""
        return self.hf.get_decoder().layers

    @property
    def checkpoint_blocks(self) -> bool:
        """Recompute each decoder layer in the backward (non-reentrant ``torch`` checkpoint
        through the model's own mechanism; the layer's collectives run again)."""
        return self.hf.is_activation_checkpointing

    @checkpoint_blocks.setter
    def checkpoint_blocks(self, enabled: bool) -> None:
        if not enabled:
            self.hf.activation_checkpointing_disable()
        elif not self.hf.supports_gradient_checkpointing:
            raise ValueError(
                f"train.activation_checkpointing=true but {type(self.hf).__name__} does not "
                "support activation checkpointing; set it to false"
            )
        else:
            self.hf.activation_checkpointing_enable({"use_reentrant": False})
            offload_layer_checkpoints(self.layers, self.memory.offload_checkpoints)

    @property
    def memory(self) -> MemoryConfig:
        """The memory savers in use (:class:`distseq.memory.MemoryConfig`; all off by
        default): the MLP of every decoder layer is tiled, the offload wraps the layers'
        checkpoint function."""
        return self._memory

    @memory.setter
    def memory(self, options: MemoryConfig) -> None:
        self._memory = options
        for layer in self.layers:
            if isinstance(getattr(layer, "mlp", None), nn.Module):
                tile_module(layer.mlp, options.mlp_tiles)
        offload_layer_checkpoints(self.layers, options.offload_checkpoints)

    def forward(
        self, tokens: torch.Tensor, ctx: SequenceContext, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Float logits ``[B, S_local, vocab]``, or with ``labels`` (``-100``: no loss) the
        summed loss of the labelled tokens, fused and chunked over the hidden states when
        ``memory.loss_chunk_tokens`` is set and the output head is a plain projection."""
        positions = ctx.positions.to(tokens.device)[None].expand_as(tokens)
        kwargs = dict(input_ids=tokens, position_ids=positions, distseq_context=ctx,
                      use_cache=False)  # fmt: skip
        chunk = self.memory.loss_chunk_tokens
        head = plain_output_head(self.hf)
        if labels is not None and chunk and head is not None:
            hidden = self.hf.get_decoder()(**kwargs).last_hidden_state
            return linear_cross_entropy(hidden, head, labels, chunk_tokens=chunk)
        logits = self.hf(**kwargs).logits.float()
        if labels is None:
            return logits
        return summed_cross_entropy(logits, labels)


def build_hf_model(
    cfg: ModelConfig,
    *,
    strategy: str = "ring",
    layout: str = "zigzag",
    group: ProcessGroup | None = None,
    backend: str = "auto",
) -> HFCausalLM:
    """Load ``model.hf`` (its weights, local files only) or initialise ``model.hf_config``
    randomly (seed torch first: every rank must build the same weights), in float32 (the
    trainer's master weights; ``train.dtype`` sets the compute dtype), in training mode, with
    :func:`distseq.hf.apply`'s attention (``strategy``/``layout``/``group``/``backend`` are
    the defaults each call's context overrides)."""
    key = cfg.hf_key
    transformers = _transformers(key)
    config = load_hf_config(cfg)
    auto = transformers.AutoModelForCausalLM
    if cfg.hf is not None:
        model = _causal_lm(key, lambda: auto.from_pretrained(
            cfg.hf, config=config, local_files_only=True, dtype=torch.float32))  # fmt: skip
    else:
        model = _causal_lm(key, lambda: auto.from_config(config, dtype=torch.float32))
    check_trainable(model, key)
    original = model.config._attn_implementation
    apply(model, strategy=strategy, layout=layout, group=group, backend=backend)
    return HFCausalLM(model.train(), original)
