"""Deterministic, infinite document streams: local text/JSONL files and associative recall.

A document is ``(tokens, loss_mask)``: ``loss_mask[i]`` says whether predicting ``tokens[i]``
from the tokens before it counts in the loss.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from distseq.train.data.tokenizer import Tokenizer

if TYPE_CHECKING:  # the config module imports this one
    from distseq.train.config import RecallConfig

Document = tuple[list[int], list[bool]]

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


def recall_documents(rc: RecallConfig, seed: int) -> Iterator[Document]:
    index = 0
    while True:
        yield recall_document(rc, seed, index)
        index += 1


def _read_texts(path: Path, jsonl_key: str) -> list[str]:
    """``.jsonl``: one document per line (field ``jsonl_key``); otherwise documents are
    separated by blank lines."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        docs = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if jsonl_key not in record:
                raise ValueError(f"{path}:{number} has no key {jsonl_key!r} (data.jsonl_key)")
            docs.append(str(record[jsonl_key]))
        return docs
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def text_documents(
    paths: list[str], tokenizer: Tokenizer, jsonl_key: str, seed: int
) -> Iterator[Document]:
    """Tokenized documents of the files, reshuffled every epoch (seeded), forever."""
    tokenized = []
    for path in paths:
        for text in _read_texts(Path(path), jsonl_key):
            ids = tokenizer.encode(text)
            if len(ids) > 1:
                tokenized.append(ids)
    if not tokenized:
        raise ValueError(f"data.paths {paths} contain no document with at least 2 tokens")
    epoch = 0
    while True:
        order = list(range(len(tokenized)))
        random.Random(f"text-{seed}-{epoch}").shuffle(order)
        for i in order:
            ids = tokenized[i]
            yield ids, [False] + [True] * (len(ids) - 1)
        epoch += 1
