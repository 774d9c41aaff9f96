"""Per-step batches (packed sequences of one data-parallel rank, or whole documents for the
adaptive planner) and the loader state a checkpoint keeps."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from distseq.train.data.packing import PackedSequence, pack_documents, split_document
from distseq.train.data.sources import Document, recall_documents, text_documents
from distseq.train.data.tokenizer import load_tokenizer

if TYPE_CHECKING:  # the config module imports the data package
    from distseq.train.config import Config


def document_stream(cfg: Config) -> Iterator[Document]:
    """The run's deterministic, endless document stream (``data.source``)."""
    data, seed = cfg.data, cfg.train.seed
    if data.source == "recall":
        return recall_documents(data.recall, seed)
    tokenizer = load_tokenizer(data.tokenizer)
    return text_documents(data.paths, tokenizer, data.jsonl_key, seed)


class StepLoader:
    """Yields, per step, the ``global_batch`` packed sequences of the whole step (every rank
    packs the same deterministic stream, so each knows the step's real-token count without
    communicating) and this data-parallel rank's share of them.

    ``state_dict()`` is ``{"sequences": consumed}``; restoring fast-forwards the stream.
    """

    def __init__(self, cfg: Config, dp_rank: int, dp: int) -> None:
        self.cfg, self.dp_rank, self.dp = cfg, dp_rank, dp
        self.global_batch = cfg.train.global_batch
        self.consumed = 0
        self._stream = self._new_stream()

    def _new_stream(self) -> Iterator[PackedSequence]:
        data = self.cfg.data
        return pack_documents(document_stream(self.cfg), data.seq_len, data.pad_multiple)

    def next_step(self) -> tuple[list[PackedSequence], int]:
        """(this rank's sequences, real tokens in the whole global batch)."""
        batch = list(itertools.islice(self._stream, self.global_batch))
        self.consumed += len(batch)
        per_rank = self.global_batch // self.dp
        mine = batch[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        return mine, sum(seq.real_tokens for seq in batch)

    def state_dict(self) -> dict[str, int]:
        return {"sequences": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._stream = self._new_stream()
        self.consumed = int(state["sequences"])
        for _ in itertools.islice(self._stream, self.consumed):
            pass


def real_tokens(document: Document) -> int:
    """Tokens of ``document`` in the loss: every token but the first can be a target."""
    return sum(document[1][1:])


class DocumentLoader:
    """Yields, per step, whole documents (split at ``data.seq_len``) in stream order until the
    next one would exceed ``train.global_batch * data.seq_len`` tokens: the batch the adaptive
    planner spreads over the ranks. Every rank reads the same stream, so all know the batch.

    ``peek()`` returns the next step's documents without consuming them (the planner solves
    one step ahead). ``state_dict()`` is ``{"steps": consumed}``; restoring fast-forwards.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.budget = cfg.train.global_batch * cfg.data.seq_len
        self.consumed = 0
        self._restart()

    def _restart(self) -> None:
        max_len = self.cfg.data.seq_len
        docs = document_stream(self.cfg)
        self._pieces = (piece for doc in docs for piece in split_document(doc, max_len))
        self._held: Document | None = None
        self._ahead: collections.deque[list[Document]] = collections.deque()

    def _take(self) -> list[Document]:
        batch: list[Document] = []
        used = 0
        while True:
            piece = self._held if self._held is not None else next(self._pieces)
            self._held = None
            if batch and used + len(piece[0]) > self.budget:
                self._held = piece
                return batch
            batch.append(piece)
            used += len(piece[0])

    def peek(self) -> list[Document]:
        if not self._ahead:
            self._ahead.append(self._take())
        return self._ahead[0]

    def next_step(self) -> tuple[list[Document], int]:
        """(the step's documents, real tokens among them)."""
        batch = self._ahead.popleft() if self._ahead else self._take()
        self.consumed += 1
        return batch, sum(real_tokens(doc) for doc in batch)

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._restart()
        self.consumed = 0
        for _ in range(int(state["steps"])):
            self.next_step()
