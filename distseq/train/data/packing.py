"""Varlen packing: documents -> fixed-length sequences with global ``cu_seqlens``.

Each document is padded to ``multiple`` (``data.pad_multiple``: a fixed multiple that every
sharding layout of the run divides, so the packing does not depend on the layout), the
sequence's unused tail becomes one padding segment, and padding is masked out of the loss.
Targets are next tokens *within* a document; a document's last token predicts nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from distseq.layout import cu_seqlens
from distseq.train.data.sources import PAD_ID, Document


@dataclass(frozen=True)
class PackedSequence:
    """``tokens``/``targets`` int64 ``[seq_len]``, ``loss_mask`` bool ``[seq_len]``;
    ``doc_lengths`` are the padded segment lengths (sum ``seq_len``, each a multiple of the
    packing multiple)."""

    tokens: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    doc_lengths: tuple[int, ...]

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return cu_seqlens(self.doc_lengths)

    @property
    def real_tokens(self) -> int:
        return int(self.loss_mask.sum())


def padded_length(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def split_document(doc: Document, max_len: int) -> list[Document]:
    """Cut a document longer than ``max_len`` into pieces (each piece is its own document)."""
    tokens, mask = doc
    pieces = []
    for start in range(0, len(tokens), max_len):
        piece_mask = list(mask[start : start + max_len])
        piece_mask[0] = False  # the piece's first token has no context inside the piece
        pieces.append((tokens[start : start + max_len], piece_mask))
    return pieces


def assemble(docs: list[Document], seq_len: int, multiple: int) -> PackedSequence:
    """``docs`` at the start of a ``seq_len`` sequence, each padded to ``multiple``; the rest
    is one padding segment."""
    tokens = torch.full((seq_len,), PAD_ID, dtype=torch.long)
    targets = torch.full((seq_len,), PAD_ID, dtype=torch.long)
    loss_mask = torch.zeros(seq_len, dtype=torch.bool)
    lengths, start = [], 0
    for doc_tokens, doc_mask in docs:
        n = len(doc_tokens)
        ids = torch.tensor(doc_tokens, dtype=torch.long)
        tokens[start : start + n] = ids
        targets[start : start + n - 1] = ids[1:]
        loss_mask[start : start + n - 1] = torch.tensor(doc_mask[1:], dtype=torch.bool)
        lengths.append(padded_length(n, multiple))
        start += lengths[-1]
    if start < seq_len:
        lengths.append(seq_len - start)
    return PackedSequence(tokens, targets, loss_mask, tuple(lengths))


def pack_group(documents: list[Document], multiple: int) -> PackedSequence:
    """All of ``documents`` in one sequence, each padded to ``multiple`` and nothing after
    them: what one adaptive-planner group runs (``multiple`` = its layout's divisor)."""
    total = sum(padded_length(len(tokens), multiple) for tokens, _ in documents)
    return assemble(documents, total, multiple)


def pack_documents(
    documents: Iterable[Document], seq_len: int, multiple: int
) -> Iterator[PackedSequence]:
    """Greedy in-order packing; ``seq_len % multiple == 0``. Stops when ``documents`` ends
    (the last partial sequence is emitted)."""
    if multiple <= 0 or seq_len % multiple:
        raise ValueError(f"seq_len {seq_len} must be a positive multiple of {multiple}")
    current: list[Document] = []
    used = 0
    for doc in documents:
        for piece in split_document(doc, seq_len):
            need = padded_length(len(piece[0]), multiple)
            if used + need > seq_len:
                yield assemble(current, seq_len, multiple)
                current, used = [], 0
            current.append(piece)
            used += need
    if current:
        yield assemble(current, seq_len, multiple)
