"""Data: tokenizers, document sources, token shards, varlen packing, and the per-step loaders."""

from distseq.train.data.loader import DocumentLoader, StepLoader, real_tokens
from distseq.train.data.packing import (
    PackedSequence,
    pack_documents,
    pack_group,
    padded_length,
)
from distseq.train.data.prepare import prepare
from distseq.train.data.shards import ShardCorpus, read_meta
from distseq.train.data.sources import recall_document, recall_vocab_size
from distseq.train.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "DocumentLoader",
    "PackedSequence",
    "ShardCorpus",
    "StepLoader",
    "load_tokenizer",
    "pack_documents",
    "pack_group",
    "padded_length",
    "prepare",
    "read_meta",
    "real_tokens",
    "recall_document",
    "recall_vocab_size",
]
