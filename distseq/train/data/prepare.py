"""``prepare``: tokenize text / JSONL / Hugging Face (Arrow, Parquet) inputs once into token
shards (:mod:`distseq.train.data.shards`) that training memory-maps."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from distseq.train.data.shards import ShardWriter
from distseq.train.data.sources import read_texts
from distseq.train.data.tokenizer import load_tokenizer

DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard file


def prepare(
    inputs: list[str],
    out: str,
    tokenizer: str | None = None,
    key: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
) -> dict:
    """Tokenize every document of ``inputs`` (in order; documents under 2 tokens are dropped,
    as training would) into shards under ``out``; returns the written header.

    ``tokenizer``: a local Hugging Face tokenizer directory, or None for bytes.
    """
    for path in inputs:
        if not Path(path).exists():
            raise ValueError(f"--input {path!r} does not exist")
    tok = load_tokenizer(tokenizer)
    writer = ShardWriter(Path(out), tok.vocab_size, tokenizer or "bytes", shard_tokens)
    bar = tqdm(desc="prepare", unit=" docs", disable=not progress, dynamic_ncols=True)
    tokens = 0
    with bar:
        for path in inputs:
            for text in read_texts(path, key):
                ids = tok.encode(text)
                if len(ids) > 1:
                    writer.add(ids)
                    tokens += len(ids)
                bar.update(1)
                if bar.n % 1024 == 0:
                    bar.set_postfix(tokens=tokens, refresh=False)
    return writer.close()
