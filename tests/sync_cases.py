"""Per-rank bodies of tests/test_layer_sync.py: what a model's layers launch per batch."""

from __future__ import annotations

import dataclasses

import torch

import distseq
from distseq.models import Decoder, ModelConfig, SequenceContext

DOCS = (24, 16)  # two documents, divisible by 2P chunks at P = 2


def _calls(counter: distseq.CommCounter) -> dict[str, int]:
    return {name: n for name, n in counter.calls.items() if n}


def model_step_calls(rank, world, mixers: list[str], strategies: dict, agreed: bool) -> dict:
    """The ``torch.distributed`` calls of one batch (context build, forward, backward) of a
    decoder with ``mixers`` and activation checkpointing; ``agreed=False`` runs the same
    layers through the checked public entry points (a context without ``agreed``)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=len(mixers), n_heads=2, n_kv_heads=1,
                      ffn_hidden=32, mixers=mixers)  # fmt: skip
    model = Decoder(cfg)
    model.checkpoint_blocks = True
    tokens = torch.randint(0, 32, (1, sum(DOCS)))
    with distseq.CommCounter() as counter:
        ctx = SequenceContext.build(DOCS, **strategies)
        if not agreed:
            ctx = dataclasses.replace(ctx, agreed=None)
        loss = model(ctx.shard_tokens(tokens), ctx).sum()
        loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return {"calls": _calls(counter), "control": counter.control_calls, "loss": loss.item(),
            "grads": grads}  # fmt: skip


def layer_calls(rank, world, layer: str, strategies: dict) -> dict:
    """The calls of one layer's forward and of its backward on an agreed batch."""
    torch.manual_seed(rank)
    ctx = SequenceContext.build(DOCS, **strategies)
    n = ctx.shard.local_length
    if layer == "conv":
        inputs = [torch.randn(1, n, 6).requires_grad_()]
        weight = torch.randn(6, 4)
        run = lambda: ctx.causal_conv1d(inputs[0], weight, activation="silu")  # noqa: E731
    else:
        inputs = [torch.randn(1, n, 2, 8).requires_grad_() for _ in range(3)]
        run = lambda: getattr(ctx, layer)(*inputs)  # noqa: E731
    with distseq.CommCounter() as forward:
        out = run()
    with distseq.CommCounter() as backward:
        out.sum().backward()
    return {"forward": _calls(forward), "backward": _calls(backward),
            "control": forward.control_calls + backward.control_calls}  # fmt: skip


def disagreeing_batch(rank, world) -> str:
    """Rank 1 shards other documents than rank 0: every rank must raise, none hang."""
    docs = DOCS if rank == 0 else (16, 24)
    try:
        SequenceContext.build(docs)
    except ValueError as exc:
        return str(exc)
    return "built"


def wrong_layer_shape(rank, world) -> str:
    """A layer called with a shard that is not the agreed batch's: a local ValueError."""
    ctx = SequenceContext.build(DOCS)
    q = torch.randn(1, ctx.shard.local_length + 2, 2, 8)
    try:
        ctx.attention(q, q, q)
    except ValueError as exc:
        return str(exc)
    return "ran"
