"""distseq's attention function for ``transformers`` models, registered through the public
``AttentionInterface``: the model's own code runs unchanged, and only its attention call goes
sequence-parallel.

transformers calls ``fn(module, query, key, value, attention_mask, scaling=, dropout=, **kwargs)``
with ``query`` ``[B, Hq, S_local, D]`` and ``key``/``value`` ``[B, Hkv, S_local, D]`` (after
RoPE), and takes back ``(out [B, S_local, Hq, D], None)``. Model-forward keyword arguments
reach it: :func:`distseq.hf.shard_batch` passes the global document boundaries as
``distseq_cu_seqlens``; a trainer that changes groups or strategies per step (the adaptive
planner) passes a :class:`distseq.models.SequenceContext` as ``distseq_context``, which then
decides group, layout, strategy, backend and documents instead of :func:`distseq.hf.apply`'s
settings.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

import distseq
from distseq.comm import ProcessGroup, resolve_group

CU_SEQLENS_KWARG = "distseq_cu_seqlens"
CONTEXT_KWARG = "distseq_context"
LAYOUT_KWARG = "distseq_layout"  # the layout shard_batch sharded with, checked against apply's
_names = itertools.count()


@dataclass(frozen=True)
class Settings:
    """What one :func:`distseq.hf.apply` call chose for its model's attention layers."""

    strategy: str
    layout: str
    group: ProcessGroup | None
    backend: str
    ulysses_degree: int | None = None  # usp's Ulysses group size (None: its default)


def refuse(field: str, value: object, fix: str) -> None:
    """The ``ValueError`` for a config ``field`` whose ``value`` distseq cannot run exactly."""
    raise ValueError(
        f"distseq.hf: the model's config.{field}={value!r} needs an attention feature distseq "
        f"does not compute exactly yet; {fix}"
    )


def check_call(module: torch.nn.Module, dropout: float, kwargs: dict) -> None:
    """Refuse what the call asks for that distseq cannot do exactly (never a silent change)."""
    if kwargs.get("sliding_window") is not None:
        refuse("sliding_window", kwargs["sliding_window"], "set it to None for full attention")
    if kwargs.get("softcap") is not None:
        refuse("attn_logit_softcapping", kwargs["softcap"], "set it to None")
    if kwargs.get("s_aux") is not None:
        refuse("sinks (attention sinks)", "present", "use a model without attention sinks")
    if not getattr(module, "is_causal", True):
        refuse("is_causal", False, "only causal (decoder) attention is supported")
    if dropout:
        refuse("attention_dropout", dropout, "set it to 0.0 or call model.eval()")


def _refuse_mask() -> None:
    raise ValueError(
        "distseq.hf: the model was given an attention_mask that masks tokens; pass documents "
        "through distseq.hf.shard_batch(position_ids=...) instead of padding masks"
    )


def distseq_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """transformers' mask hook (``AttentionMaskInterface``) for the distseq attention.

    transformers drops the 2D ``attention_mask`` ``[B, S]`` silently for an attention name
    that has no mask hook, so a padding mask would be ignored; refuse one that masks any
    token. An all-ones mask (a tokenizer's, without padding) changes nothing: ``None``.
    """
    if attention_mask is not None and not bool(attention_mask.all()):
        _refuse_mask()
    return None


def _autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, the autocast dtype for all of ``q, k, v``, as autocast casts sdpa's
    inputs: transformers' RoPE returns float32 ``q``/``k`` beside a bfloat16 ``v`` there."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def make_attention_function(settings: Settings):
    """The function :func:`distseq.hf.apply` registers for one model."""

    def distseq_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          **kwargs):  # fmt: skip
        check_call(module, dropout, kwargs)
        if attention_mask is not None:
            _refuse_mask()
        query, key, value = _autocast_inputs(query, key, value)
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        ctx = kwargs.get(CONTEXT_KWARG)
        if ctx is not None:  # agreed once per batch when the context was built
            return ctx.attention(q, k, v, scale=scaling), None
        sharded = kwargs.get(LAYOUT_KWARG, settings.layout)
        # One rank holds the whole sequence in natural order under either layout.
        if sharded != settings.layout and resolve_group(settings.group).world_size > 1:
            raise ValueError(
                f"distseq.hf: the batch was sharded with layout={sharded!r} but the model "
                f"was applied with layout={settings.layout!r}; pass the same layout to "
                "shard_batch and apply"
            )
        out = distseq.attention(
            q, k, v, strategy=settings.strategy, group=settings.group, causal=True,
            layout=settings.layout, cu_seqlens=kwargs.get(CU_SEQLENS_KWARG), scale=scaling,
            backend=settings.backend, ulysses_degree=settings.ulysses_degree,
        )  # fmt: skip
        return out, None

    return distseq_attention


def new_name() -> str:
    """A fresh registry name: each applied model keeps its own settings."""
    return f"distseq_{next(_names)}"
