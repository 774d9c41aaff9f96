"""``causal_lm_loss``: this rank's share of the group's mean token loss, chunked over tokens."""

from __future__ import annotations

import torch

from distseq.comm import ProcessGroup, all_reduce_sum, resolve_group
from distseq.hf.batch import IGNORE_INDEX
from distseq.memory import linear_cross_entropy

DEFAULT_CHUNK_TOKENS = 4096


def _float(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunks(rows: int, chunk: int) -> list[slice]:
    """Row slices (views, not copies) of at most ``chunk`` rows."""
    return [slice(start, min(start + chunk, rows)) for start in range(0, rows, chunk)]


class _SummedCrossEntropy(torch.autograd.Function):
    """``Σ`` over labelled rows of ``logsumexp(logits) - logits[label]``, times ``scale``.

    Each chunk of rows is upcast, reduced and dropped in the forward, and recomputed in the
    backward, so no float32 ``[tokens, vocab]`` copy of the logits ever exists at once.
    """

    @staticmethod
    def forward(fctx, logits, labels, scale: float, chunk: int):
        total = torch.zeros((), dtype=_float(logits[:0]).dtype, device=logits.device)
        for rows in _chunks(logits.shape[0], chunk):
            part, target = _float(logits[rows]), labels[rows]
            picked = part.gather(1, target.clamp_min(0)[:, None])[:, 0]
            total += ((torch.logsumexp(part, dim=1) - picked) * (target != IGNORE_INDEX)).sum()
        fctx.save_for_backward(logits, labels)
        fctx.scale, fctx.chunk = scale, chunk
        return total * scale

    @staticmethod
    def backward(fctx, grad_total):
        logits, labels = fctx.saved_tensors
        grad = torch.empty_like(logits)
        for rows in _chunks(logits.shape[0], fctx.chunk):
            target = labels[rows]
            part = torch.softmax(_float(logits[rows]), dim=1)
            part[torch.arange(len(target), device=part.device), target.clamp_min(0)] -= 1
            weight = (target != IGNORE_INDEX) * (grad_total * fctx.scale)
            grad[rows] = (part * weight[:, None]).to(grad.dtype)
        return grad, None, None, None


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group: ProcessGroup | None = None,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's share of the mean next-token loss over the whole group's batch.

    ``logits`` ``[B, S_local, V]`` and ``labels`` ``[B, S_local]`` (from
    :func:`distseq.hf.shard_batch`, already shifted; ``-100`` = no loss). Returns
    ``Σ local token losses / real tokens of the group``: summed over the ranks it is the
    single-device mean loss, and the ranks' gradients sum to the single-device gradient.
    Computed ``chunk_tokens`` rows at a time, forward and backward.

    With ``weight`` (the output head's ``[V, hidden]``, e.g. ``model.lm_head.weight``) the
    first argument is the final hidden states ``[B, S_local, hidden]`` instead (e.g.
    ``model.model(**batch).last_hidden_state``) and the projection is fused into the chunks
    (:func:`distseq.memory.linear_cross_entropy`): no ``[tokens, V]`` logits exist at all.
    Only for a model whose logits are exactly ``hidden @ weight.T``
    (:func:`distseq.hf.model.plain_output_head` returns its weight).
    """
    width = "hidden" if weight is not None else "vocab"
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"{'hidden states' if weight is not None else 'logits'} {tuple(logits.shape)} and "
            f"labels {tuple(labels.shape)}: expected [batch, seq, {width}] and [batch, seq]"
        )
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be positive")
    info = resolve_group(group)
    labels = labels.to(logits.device)
    count = all_reduce_sum((labels != IGNORE_INDEX).sum().to(torch.float64), info)
    scale = 1.0 / max(float(count), 1.0)  # one host sync per batch, not per layer
    if weight is not None:
        return linear_cross_entropy(logits, weight, labels, chunk_tokens=chunk_tokens,
                                    scale=scale)  # fmt: skip
    flat = logits.reshape(-1, logits.shape[-1])
    return _SummedCrossEntropy.apply(flat, labels.reshape(-1), scale, chunk_tokens)
