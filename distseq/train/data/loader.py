"""The per-step batches of one data-parallel rank, and the loader state a checkpoint keeps."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from distseq.train.data.packing import PackedSequence, pack_documents
from distseq.train.data.sources import recall_documents, text_documents
from distseq.train.data.tokenizer import load_tokenizer

if TYPE_CHECKING:  # the config module imports the data package
    from distseq.train.config import Config


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
        data, seed = self.cfg.data, self.cfg.train.seed
        if data.source == "recall":
            docs = recall_documents(data.recall, seed)
        else:
            tokenizer = load_tokenizer(data.tokenizer)
            docs = text_documents(data.paths, tokenizer, data.jsonl_key, seed)
        return pack_documents(docs, data.seq_len, data.pad_multiple)

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
