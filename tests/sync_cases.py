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


def _layer(rank: int, layer: str, strategies: dict, heads: int):
    """A ``SequenceContext`` method ``layer`` on random inputs of this rank's shard (``heads``
    heads of 8): the function running it."""
    torch.manual_seed(rank)
    ctx = SequenceContext.build(DOCS, **strategies)
    n = ctx.shard.local_length
    if layer == "conv":
        x, weight = torch.randn(1, n, 6).requires_grad_(), torch.randn(6, 4)
        return lambda: ctx.causal_conv1d(x, weight, activation="silu")
    inputs = [torch.randn(1, n, heads, 8).requires_grad_() for _ in range(3)]
    if layer == "delta_rule":
        k = torch.nn.functional.normalize(inputs[1].detach(), dim=-1).requires_grad_()
        beta, log_decay = torch.rand(1, n, heads), -torch.rand(1, n, heads)
        return lambda: ctx.delta_rule(inputs[0], k, inputs[2], beta, log_decay=log_decay)
    return lambda: getattr(ctx, layer)(*inputs)


def layer_calls(rank, world, layer: str, strategies: dict, heads: int = 2) -> dict:
    """The calls of one layer's forward and of its backward on an agreed batch."""
    run = _layer(rank, layer, strategies, heads)
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


# Tensor methods that read a tensor's values on the host: a device-to-host sync on a GPU.
_HOST_READS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__")


class HostToDevice(torch.overrides.TorchFunctionMode):
    """Records the calls that copy host data to a device on a GPU: ``Tensor.to`` given a
    device (on CPU a no-op, but the same call) and tensors built from host values; and, in
    ``reads``, the calls that read a tensor back to the host (a sync on a GPU). A CPU run
    cannot see the copies themselves, only the calls that make them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and _names_device(args[1:], kwargs):
            self.calls.append(f"Tensor.to{tuple(type(a).__name__ for a in args[1:])}")
        elif func in (torch.tensor, torch.as_tensor, torch.Tensor.cuda):
            self.calls.append(func.__name__)
        elif getattr(func, "__name__", None) in _HOST_READS:
            self.reads.append(func.__name__)
        return func(*args, **kwargs)


def _names_device(args, kwargs) -> bool:
    devices = (torch.device, str, torch.Tensor)  # a tensor argument: "to its device"
    return "device" in kwargs or any(isinstance(a, devices) for a in args)


def layer_host_copies(rank, world, layer: str, strategies: dict, heads: int) -> list[list[str]]:
    """Host-to-device copy calls of a layer's forward + backward on an agreed batch: on the
    first call (cold device caches) and on the next (as a model's second layer); then the
    host reads of both calls."""
    from distseq.kernels import linear_torch
    from distseq.layout import shard_tensor
    from distseq.strategies import usp

    # the pool's workers may have run this shard before
    for cache in (shard_tensor, usp._ring_order, linear_torch._pack_plan):
        cache.cache_clear()
    run = _layer(rank, layer, strategies, heads)
    calls = []
    for _ in range(2):
        with HostToDevice() as copies:
            run().sum().backward()
        calls.append(copies)
    return [c.calls for c in calls] + [c.reads for c in calls]
