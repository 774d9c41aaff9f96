"""``apply``: switch a ``transformers`` model's attention to a distseq strategy."""

from __future__ import annotations

import torch

from distseq.comm import ProcessGroup, resolve_group
from distseq.hf.attention import (
    Settings,
    distseq_mask,
    make_attention_function,
    new_name,
    refuse,
)
from distseq.kernels import BACKENDS
from distseq.layout import check_layout
from distseq.strategies import ATTENTION_STRATEGIES


def _effective_sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


def check_config(model: torch.nn.Module) -> None:
    """Refuse, naming the config field, what distseq cannot compute exactly yet."""
    config = model.config
    checks = (
        ("sliding_window", _effective_sliding_window(config), "set it to None (full attention)"),
        ("attn_logit_softcapping", getattr(config, "attn_logit_softcapping", None),
         "set it to None"),
        ("use_bidirectional_attention", getattr(config, "use_bidirectional_attention", None)
         or None, "only causal attention is supported"),
        ("sinks (attention sinks)",
         "present" if any(hasattr(m, "sinks") for m in model.modules()) else None,
         "use a model without attention sinks"),
    )  # fmt: skip
    for field, value, fix in checks:
        if value is not None:
            refuse(field, value, fix)


def apply(
    model: torch.nn.Module,
    *,
    strategy: str = "ring",
    layout: str = "zigzag",
    group: ProcessGroup | None = None,
    backend: str = "auto",
    ulysses_degree: int | None = None,
) -> torch.nn.Module:
    """Route every attention layer of ``model`` (a ``transformers.PreTrainedModel`` whose
    attention goes through transformers' ``AttentionInterface``) through
    :func:`distseq.attention` with ``strategy``/``layout`` over ``group`` (``None``: WORLD).
    ``ulysses_degree`` (``strategy="usp"`` only, refused for the others): ranks per Ulysses
    group, ``None`` for usp's default (see :func:`distseq.attention`).

    Registers a distseq attention function under a fresh name and switches the model to it;
    returns the same model. Feed it :func:`distseq.hf.shard_batch`'s output. Raises
    ``ValueError`` for what it cannot run exactly (sliding windows, logit softcapping,
    non-causal attention, attention sinks; dropout > 0 when training is refused at the call)
    and for a model whose attention does not use the registry.
    """
    from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"distseq.hf.apply needs a transformers PreTrainedModel, got {type(model).__name__}; "
            "pass a model built by transformers (e.g. AutoModelForCausalLM.from_pretrained)"
        )
    check_layout(layout)
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {['auto', *BACKENDS]}")
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    world = resolve_group(group).world_size
    ATTENTION_STRATEGIES.check(strategy, world, heads, kv_heads, layout, ulysses_degree)
    check_config(model)
    name = new_name()
    settings = Settings(strategy=strategy, layout=layout, group=group, backend=backend,
                        ulysses_degree=ulysses_degree)  # fmt: skip
    AttentionInterface.register(name, make_attention_function(settings))
    AttentionMaskInterface.register(name, distseq_mask)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' "
            "AttentionInterface (it kept attn_implementation="
            f"{model.config._attn_implementation!r}); distseq.hf cannot shard it: use a model "
            "class whose attention layers call that registry (e.g. Llama, Qwen2, Qwen3, Mistral)"
        )
    return model
