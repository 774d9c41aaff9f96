"""Fused linear cross-entropy: the output projection, log-softmax and loss chunk by chunk.

Neither the forward nor the backward ever holds the whole ``[tokens, vocab]`` logits: each
chunk of ``chunk_tokens`` rows is projected, reduced and dropped, then projected again in the
backward (one extra ``tokens x d_model x vocab`` matmul) to form its gradients. Peak memory
of the loss is ``chunk_tokens x vocab`` float32 instead of ``tokens x vocab``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # transformers' and torch's label for "no loss here"


def _row_chunks(rows: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, rows)) for start in range(0, rows, chunk)]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the matmul runs in: autocast's when it is on, else the inputs' promotion."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float32 logits ``[rows, vocab]`` of one chunk of ``hidden`` ``[rows, d]``."""
    return (hidden.to(dtype) @ weight.to(dtype).t()).float()


class _LinearCrossEntropy(torch.autograd.Function):
    """``scale * Σ_labelled (logsumexp(h W^T) - (h W^T)[label])`` over chunks of rows."""

    @staticmethod
    def forward(fctx, hidden, weight, labels, scale: float, chunk: int, dtype: torch.dtype):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for rows in _row_chunks(hidden.shape[0], chunk):
                logits, target = _chunk_logits(hidden[rows], weight, dtype), labels[rows]
                picked = logits.gather(1, target.clamp_min(0)[:, None])[:, 0]
                loss = torch.logsumexp(logits, dim=1) - picked
                total += (loss * (target != IGNORE_INDEX)).sum()
        fctx.save_for_backward(hidden, weight, labels)
        fctx.scale, fctx.chunk, fctx.dtype = scale, chunk, dtype
        return total * scale

    @staticmethod
    def backward(fctx, grad_total):
        hidden, weight, labels = fctx.saved_tensors
        dtype = fctx.dtype
        grad_hidden = torch.empty_like(hidden) if fctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if fctx.needs_input_grad[1]
            else None
        )
        w = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for rows in _row_chunks(hidden.shape[0], fctx.chunk):
                h, target = hidden[rows].to(dtype), labels[rows]
                # d loss / d logits = softmax - onehot(label), per labelled row
                probs = torch.softmax(_chunk_logits(h, w, dtype), dim=1)
                probs[torch.arange(len(target), device=probs.device), target.clamp_min(0)] -= 1
                probs *= ((target != IGNORE_INDEX) * (grad_total * fctx.scale))[:, None]
                probs = probs.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[rows] = (probs @ w).to(grad_hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (probs.t() @ h).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int,
    scale: float = 1.0,
) -> torch.Tensor:
    """``scale`` times the summed cross-entropy of the logits ``hidden @ weight.T``.

    ``hidden`` ``[..., d]`` (any leading shape), ``weight`` ``[vocab, d]`` (the output head;
    tied embeddings welcome), ``labels`` ``[...]`` int64 with ``-100`` for no loss. Returns a
    float32 scalar equal to ``scale * F.cross_entropy(hidden @ weight.T, labels,
    reduction="sum")``, computed ``chunk_tokens`` rows at a time in forward and backward.
    Under autocast the projection runs in autocast's dtype, as ``nn.Linear`` would.
    """
    if hidden.shape[:-1] != labels.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels "
            f"{tuple(labels.shape)}: expected [..., d], [vocab, d] and [...]"
        )
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be positive")
    flat = hidden.reshape(-1, hidden.shape[-1])
    dtype = compute_dtype(hidden, weight)
    return _LinearCrossEntropy.apply(
        flat, weight, labels.reshape(-1).to(hidden.device), scale, chunk_tokens, dtype
    )


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain path: ``Σ`` of the labelled tokens' cross-entropy of float ``logits``
    ``[..., vocab]`` (``labels`` ``[...]``, ``-100``: no loss)."""
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="sum",
                           ignore_index=IGNORE_INDEX)  # fmt: skip
