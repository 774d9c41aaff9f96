"""Deterministic, endless document orders: associative recall, local text/JSONL/Arrow files,
and pre-tokenized shards, each with random access by global position.

A document is ``(tokens, loss_mask)``: ``loss_mask[i]`` says whether predicting ``tokens[i]``
from the tokens before it counts in the loss.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from distseq.train.data.shards import ShardCorpus
from distseq.train.data.tokenizer import Tokenizer

if TYPE_CHECKING:  # the config module imports this one
    from distseq.train.config import RecallConfig

Document = tuple[list[int], list[bool]]


class DocumentSource(Protocol):
    """Random access to a run's endless document order: ``length(g)`` of the document at
    global position ``g`` (cheap: never reads its tokens where an index exists) and
    ``piece(g, start, stop)``, its tokens ``[start:stop]`` with their loss mask."""

    def length(self, index: int) -> int: ...

    def piece(self, index: int, start: int, stop: int) -> Document: ...


PAD_ID = 0
SEPARATOR_ID = 1
_FIRST_KEY_ID = 2


def recall_vocab_size(rc: RecallConfig) -> int:
    """Token ids the recall task uses: pad, separator, keys, values."""
    return _FIRST_KEY_ID + rc.n_keys + rc.n_values


def recall_document(rc: RecallConfig, seed: int, index: int) -> Document:
    """Document ``index`` of the multi-key associative recall stream.

    ``k1 v1 k2 v2 ... kn vn | filler ... SEP q1 a1 q2 a2 ...``: each query key is followed by
    the value it was paired with at the start of the document; only those answers are in the
    loss. Filler tokens are random values (never keys), so the only earlier occurrence of a
    query key is its pair.
    """
    rng = random.Random(f"recall-{seed}-{index}")
    length = rng.randint(rc.min_len, rc.max_len)
    keys = rng.sample(range(rc.n_keys), rc.n_pairs)
    values = [rng.randrange(rc.n_values) for _ in keys]
    value_base = _FIRST_KEY_ID + rc.n_keys
    tokens: list[int] = []
    for key, value in zip(keys, values):
        tokens += [_FIRST_KEY_ID + key, value_base + value]
    n_filler = length - 2 * rc.n_pairs - 2 * rc.n_queries - 1
    tokens += [value_base + rng.randrange(rc.n_values) for _ in range(n_filler)]
    tokens.append(SEPARATOR_ID)
    mask = [False] * len(tokens)
    for slot in rng.sample(range(rc.n_pairs), rc.n_queries):
        tokens += [_FIRST_KEY_ID + keys[slot], value_base + values[slot]]
        mask += [False, True]
    return tokens, mask


class ListSource:
    """Documents given in memory, in their order (``pack_documents``, tests)."""

    def __init__(self, documents: list[Document]) -> None:
        self.documents = documents

    def length(self, index: int) -> int:
        return len(self.documents[index][0])

    def piece(self, index: int, start: int, stop: int) -> Document:
        tokens, mask = self.documents[index]
        return tokens[start:stop], mask[start:stop]


def _mask(start: int, length: int) -> list[bool]:
    """Loss mask of tokens ``[start:start + length]`` of a plain text document: every token
    but the document's first is a target."""
    return [start > 0] + [True] * (length - 1)


class RecallSource:
    """The recall task as a random-access source: position ``g`` is document ``g``."""

    def __init__(self, rc: RecallConfig, seed: int) -> None:
        self.rc, self.seed = rc, seed
        self._last: tuple[int, Document] | None = None  # the loader asks length, then piece

    def document(self, index: int) -> Document:
        if self._last is None or self._last[0] != index:
            self._last = (index, recall_document(self.rc, self.seed, index))
        return self._last[1]

    def length(self, index: int) -> int:
        return len(self.document(index)[0])

    def piece(self, index: int, start: int, stop: int) -> Document:
        tokens, mask = self.document(index)
        return tokens[start:stop], mask[start:stop]


def _read_plain(path: Path) -> Iterator[str]:
    """Documents separated by blank lines, streamed line by line."""
    block: list[str] = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).strip()
                block = []
    if block:
        yield "".join(block).strip()


def _read_jsonl(path: Path, key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number} is not valid JSON ({exc})") from None
            if not isinstance(record, dict) or key not in record:
                raise ValueError(f"{path}:{number} has no key {key!r} (data.jsonl_key / --key)")
            yield str(record[key])


def _read_arrow(path: Path, key: str) -> Iterator[str]:
    """A Hugging Face dataset saved to disk (a directory of ``.arrow`` files), a ``.parquet``
    file or an ``.arrow`` file: column ``key``, streamed in record batches."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ValueError(
            f"{path} is a Hugging Face / Arrow dataset; reading it needs the 'pyarrow' package "
            "(pip install pyarrow)"
        ) from exc
    files = (
        sorted(path.glob("*.arrow")) + sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    )
    if not files:
        raise ValueError(f"{path} holds no .arrow or .parquet files")
    for file in files:
        if file.suffix == ".parquet":
            reader = pq.ParquetFile(file)
            if key not in reader.schema_arrow.names:
                raise ValueError(f"{file} has no column {key!r} (data.jsonl_key / --key)")
            batches = reader.iter_batches(columns=[key])
        else:
            with pa.memory_map(str(file)) as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_file(source).read_all()
            if key not in table.column_names:
                raise ValueError(f"{file} has no column {key!r} (data.jsonl_key / --key)")
            batches = table.select([key]).to_batches()
        for batch in batches:
            yield from (str(text) for text in batch.column(0).to_pylist())


def read_texts(path: str | Path, key: str) -> Iterator[str]:
    """The documents of one input: ``.jsonl`` (field ``key``), ``.parquet`` / ``.arrow`` or a
    Hugging Face dataset directory (column ``key``), else plain text (blank-line separated)."""
    path = Path(path)
    if path.is_dir() or path.suffix in (".parquet", ".arrow"):
        return _read_arrow(path, key)
    if path.suffix == ".jsonl":
        return _read_jsonl(path, key)
    return _read_plain(path)


class Shuffled:
    """``count`` documents visited epoch after epoch, each epoch in a seeded permutation:
    global position ``g`` is document ``order(g // count)[g % count]``. Only the current
    epoch's permutation is held."""

    def __init__(self, count: int, permutation: Callable[[int], list[int] | np.ndarray]):
        self.count, self._permutation = count, permutation
        self._epoch: tuple[int, list[int] | np.ndarray] | None = None

    def __call__(self, position: int) -> int:
        epoch, within = divmod(position, self.count)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._permutation(epoch))
        return int(self._epoch[1][within])


class TextSource:
    """Local text / JSONL / Arrow documents, tokenized up front and held in memory (fine for
    small corpora; ``prepare`` shards and ``data.source: shards`` for large ones)."""

    def __init__(self, paths: list[str], tokenizer: Tokenizer, key: str, seed: int) -> None:
        self.documents = [
            ids
            for path in paths
            for ids in map(tokenizer.encode, read_texts(path, key))
            if len(ids) > 1
        ]
        if not self.documents:
            raise ValueError(f"data.paths {paths} contain no document with at least 2 tokens")

        def permutation(epoch: int) -> list[int]:
            order = list(range(len(self.documents)))
            random.Random(f"text-{seed}-{epoch}").shuffle(order)
            return order

        self.order = Shuffled(len(self.documents), permutation)

    def length(self, index: int) -> int:
        return len(self.documents[self.order(index)])

    def piece(self, index: int, start: int, stop: int) -> Document:
        ids = self.documents[self.order(index)]
        return ids[start:stop], _mask(start, len(ids[start:stop]))


class ShardSource:
    """Pre-tokenized shards (``data.source: shards``), memory-mapped: nothing is read until a
    piece is asked for, and lengths come from the index. The order depends only on the seed
    and the corpus."""

    def __init__(self, directories: list[str], seed: int) -> None:
        self.corpus = ShardCorpus(directories)
        count = len(self.corpus)
        self.order = Shuffled(
            count, lambda epoch: np.random.default_rng([seed, epoch]).permutation(count)
        )

    def length(self, index: int) -> int:
        return self.corpus.length(self.order(index))

    def piece(self, index: int, start: int, stop: int) -> Document:
        tokens = self.corpus.tokens(self.order(index), start, stop).tolist()
        return tokens, _mask(start, len(tokens))


def text_documents(
    paths: list[str], tokenizer: Tokenizer, jsonl_key: str, seed: int
) -> Iterator[Document]:
    """Tokenized documents of the files, reshuffled every epoch (seeded), forever."""
    source = TextSource(paths, tokenizer, jsonl_key, seed)
    for index in itertools.count():
        yield source.piece(index, 0, source.length(index))
