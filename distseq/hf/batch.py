"""``shard_batch``: one rank's share of a batch for a Hugging Face causal LM.

Labels are made *before* sharding (a token's label is the next token of the same document), so
no label is lost at a shard boundary; documents are padded to the layout's multiple, the
padding masked out of the loss (label ``-100``).
"""

from __future__ import annotations

import torch

from distseq.comm import ProcessGroup, resolve_group
from distseq.hf.attention import CU_SEQLENS_KWARG, LAYOUT_KWARG
from distseq.layout import check_layout, chunks_per_rank, cu_seqlens
from distseq.memory.loss import IGNORE_INDEX  # noqa: F401 (re-exported: label "no loss here")
from distseq.sharding import shard_sequence


def _check_ids(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.is_floating_point():
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be an integer tensor [batch, seq], got {shape}")


def document_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the documents that packed ``position_ids`` ``[1, S]`` describe (restarting at
    0 at each document, as ``DataCollatorWithFlattening`` makes them)."""
    pos = position_ids[0].tolist()
    if not pos or pos[0] != 0:
        got = f"position_ids[0, 0] = {pos[0]}" if pos else "empty position_ids"
        raise ValueError(
            f"{got}: packed position_ids must start at 0 (the first document's first token) "
            "and count 0, 1, 2, ... within each document"
        )
    starts = [0]
    for t in range(1, len(pos)):
        if pos[t] == 0:
            starts.append(t)
        elif pos[t] != pos[t - 1] + 1:
            raise ValueError(
                f"position_ids[0, {t}] = {pos[t]} after {pos[t - 1]}: packed position_ids must "
                "count 0, 1, 2, ... within each document and restart at 0 at the next one"
            )
    return [end - start for start, end in zip(starts, [*starts[1:], len(pos)])]


def _pad_plan(lengths: list[int], multiple: int, pad_to_multiple: bool) -> list[int]:
    padded = [-(-n // multiple) * multiple for n in lengths]
    if padded != lengths and not pad_to_multiple:
        bad = next(i for i, (n, p) in enumerate(zip(lengths, padded)) if n != p)
        raise ValueError(
            f"document {bad} has {lengths[bad]} tokens, not a multiple of {multiple} (the "
            f"layout's multiple over this group); pad it to {padded[bad]} or pass "
            "pad_to_multiple=True"
        )
    return padded


def shard_batch(
    input_ids: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    group: ProcessGroup | None = None,
    layout: str = "zigzag",
    pad_to_multiple: bool = True,
) -> dict[str, torch.Tensor]:
    """This rank's share of ``input_ids`` ``[B, S]`` (identical on every rank of ``group``).

    Without ``position_ids`` every row is one document; with them (batch 1, transformers'
    packing convention) they define the documents. Returns, each ``[B, S_local]``:
    ``input_ids``, ``position_ids`` (each token's position inside its document, so RoPE is
    right) and ``labels`` (the next token of the same document, ``-100`` at document ends and
    on padding); also ``distseq_layout`` (checked against :func:`distseq.hf.apply`'s) and, for
    packed documents, ``distseq_cu_seqlens`` (the global int32 boundaries the attention
    layers read). Pop ``labels`` and call ``model(**rest)``.
    """
    _check_ids("input_ids", input_ids)
    check_layout(layout)
    info = resolve_group(group)
    multiple = info.world_size * chunks_per_rank(layout)
    batch, seq = input_ids.shape
    if position_ids is None:
        lengths, packed = [seq], False
    else:
        _check_ids("position_ids", position_ids)
        if position_ids.shape != input_ids.shape or batch != 1:
            raise ValueError(
                f"position_ids {tuple(position_ids.shape)} must have input_ids' shape "
                f"{tuple(input_ids.shape)} with batch 1 (packed documents)"
            )
        lengths, packed = document_lengths(position_ids), True
    padded = _pad_plan(lengths, multiple, pad_to_multiple)
    # Source column of every padded position (-1: padding).
    source = torch.full((sum(padded),), -1, dtype=torch.long)
    labels_from = torch.full_like(source, -1)
    positions = torch.empty_like(source)
    start = out = 0
    for n, p in zip(lengths, padded):
        source[out : out + n] = torch.arange(start, start + n)
        labels_from[out : out + n - 1] = torch.arange(start + 1, start + n)
        positions[out : out + p] = torch.arange(p)
        start, out = start + n, out + p
    ids = input_ids[:, source.clamp_min(0)].masked_fill(source < 0, 0)
    labels = input_ids[:, labels_from.clamp_min(0)].masked_fill(labels_from < 0, IGNORE_INDEX)
    cu = cu_seqlens(padded) if packed else None
    full = {"input_ids": ids, "position_ids": positions.expand(batch, -1), "labels": labels}
    local = {
        key: shard_sequence(t.to(input_ids.device), group=group, layout=layout, cu_seqlens=cu)
        for key, t in full.items()
    }
    local[LAYOUT_KWARG] = layout
    if packed:
        local[CU_SEQLENS_KWARG] = cu.to(input_ids.device)
    return local
