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
from distseq.train.data.sources import PAD_ID, Document, DocumentSource, ListSource


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


@dataclass
class Cursor:
    """Walks a source's document order in pieces of at most ``max_len`` tokens: a longer
    document is cut, and each piece is its own document. ``(document, offset)`` is the
    position of the next piece."""

    source: DocumentSource
    max_len: int
    document: int = 0
    offset: int = 0

    def next_length(self) -> int:
        """Length of the next piece (from the index where there is one: no tokens read)."""
        return min(self.max_len, self.source.length(self.document) - self.offset)

    def take(self) -> Document:
        length = self.next_length()
        tokens, mask = self.source.piece(self.document, self.offset, self.offset + length)
        self.offset += length
        if self.offset >= self.source.length(self.document):
            self.document, self.offset = self.document + 1, 0
        # the piece's first token has no context inside the piece
        return tokens, [False, *mask[1:]]

    def state_dict(self) -> dict[str, int]:
        """The loader state: the position of the next piece in the global order."""
        return {"document": self.document, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if set(state) != {"document", "offset"}:
            raise ValueError(
                f"loader state {state} is not a data position {{'document', 'offset'}} (a "
                "checkpoint from an older distseq whose loader replayed the stream); start fresh"
            )
        self.document, self.offset = int(state["document"]), int(state["offset"])


def next_sequence(
    cursor: Cursor, seq_len: int, multiple: int, end: int | None = None
) -> list[Document]:
    """Greedy in-order packing: the pieces at ``cursor`` that fit one ``seq_len`` sequence
    when each is padded to ``multiple``, stopping before document ``end`` if given."""
    docs: list[Document] = []
    used = 0
    while cursor.document != end:
        need = padded_length(cursor.next_length(), multiple)
        if docs and used + need > seq_len:
            break
        docs.append(cursor.take())
        used += need
    return docs


def pack_documents(
    documents: Iterable[Document], seq_len: int, multiple: int
) -> Iterator[PackedSequence]:
    """Greedy in-order packing of finitely many ``documents``; ``seq_len % multiple == 0``.
    The last partial sequence is emitted."""
    if multiple <= 0 or seq_len % multiple:
        raise ValueError(f"seq_len {seq_len} must be a positive multiple of {multiple}")
    docs = list(documents)
    cursor = Cursor(ListSource(docs), seq_len)
    while cursor.document < len(docs):
        yield assemble(next_sequence(cursor, seq_len, multiple, len(docs)), seq_len, multiple)
