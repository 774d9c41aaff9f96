"""Per-step batches (packed sequences of one data-parallel rank, or whole documents for the
adaptive planner) and the loader state a checkpoint keeps.

Both loaders walk the source's global document order with a cursor (document position,
token offset inside it): the cursor is the whole loader state, independent of dp, sp, layout
and engine, and restoring it reads nothing (no replay of the stream).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from distseq.train.data.packing import Cursor, PackedSequence, assemble, next_sequence
from distseq.train.data.sources import (
    Document,
    DocumentSource,
    RecallSource,
    ShardSource,
    TextSource,
)
from distseq.train.data.tokenizer import load_tokenizer

if TYPE_CHECKING:  # the config module imports the data package
    from distseq.train.config import Config


def document_source(cfg: Config) -> DocumentSource:
    """The run's deterministic, endless document order (``data.source``)."""
    data, seed = cfg.data, cfg.train.seed
    if data.source == "recall":
        return RecallSource(data.recall, seed)
    if data.source == "shards":
        return ShardSource(data.paths, seed)
    return TextSource(data.paths, load_tokenizer(data.tokenizer), data.jsonl_key, seed)


def document_stream(cfg: Config) -> Iterator[Document]:
    """Whole documents in the run's order."""
    source = document_source(cfg)
    return (source.piece(g, 0, source.length(g)) for g in itertools.count())


def real_tokens(document: Document) -> int:
    """Tokens of ``document`` in the loss: every token but the first can be a target."""
    return sum(document[1][1:])


class StepLoader:
    """Yields, per step, this data-parallel rank's share of the ``global_batch`` packed
    sequences of the step, and the real-token count of the whole step. Every rank walks the
    same order (so all know the count without communicating) and builds tensors only for its
    own sequences. Documents are padded to ``data.pad_multiple``, never to the layout, so
    step ``k`` is the same tokens at any dp, sp, layout and engine.

    ``state_dict()`` is the cursor ``{"document": g, "offset": j}``.
    """

    def __init__(self, cfg: Config, dp_rank: int, dp: int) -> None:
        self.cfg, self.dp_rank, self.dp = cfg, dp_rank, dp
        self.global_batch = cfg.train.global_batch
        self.seq_len, self.multiple = cfg.data.seq_len, cfg.data.pad_multiple
        self.cursor = Cursor(document_source(cfg), self.seq_len)

    def next_step(self) -> tuple[list[PackedSequence], int]:
        """(this rank's sequences, real tokens in the whole global batch)."""
        per_rank = self.global_batch // self.dp
        mine, total = [], 0
        for index in range(self.global_batch):
            docs = next_sequence(self.cursor, self.seq_len, self.multiple)
            total += sum(real_tokens(doc) for doc in docs)
            if index // per_rank == self.dp_rank:
                mine.append(assemble(docs, self.seq_len, self.multiple))
        return mine, total

    def state_dict(self) -> dict[str, int]:
        return self.cursor.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.cursor.load_state_dict(state)


class DocumentLoader:
    """Yields, per step, whole documents (split at ``data.seq_len``) in order until the next
    one would exceed ``train.global_batch * data.seq_len`` tokens: the batch the adaptive
    planner spreads over the ranks. Every rank walks the same order, so all know the batch.
    The batch is chosen from document lengths alone (the shard index), and only the chosen
    documents' tokens are read.

    ``peek()`` returns the next step's documents without consuming them (the planner solves
    one step ahead). ``state_dict()`` is the cursor after the last consumed step.
    """

    def __init__(self, cfg: Config) -> None:
        self.budget = cfg.train.global_batch * cfg.data.seq_len
        self.cursor = Cursor(document_source(cfg), cfg.data.seq_len)
        self._state = self.cursor.state_dict()
        self._ahead: collections.deque[tuple[list[Document], dict[str, int]]] = collections.deque()

    def _take(self) -> tuple[list[Document], dict[str, int]]:
        batch: list[Document] = []
        used = 0
        while True:
            length = self.cursor.next_length()
            if batch and used + length > self.budget:
                return batch, self.cursor.state_dict()
            batch.append(self.cursor.take())
            used += length

    def peek(self) -> list[Document]:
        if not self._ahead:
            self._ahead.append(self._take())
        return self._ahead[0][0]

    def next_step(self) -> tuple[list[Document], int]:
        """(the step's documents, real tokens among them)."""
        batch, self._state = self._ahead.popleft() if self._ahead else self._take()
        return batch, sum(real_tokens(doc) for doc in batch)

    def state_dict(self) -> dict[str, int]:
        return dict(self._state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.cursor.load_state_dict(state)
        self._state = self.cursor.state_dict()
        self._ahead.clear()
