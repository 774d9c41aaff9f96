"""Data: tokenizers, document sources, varlen packing, and the per-step loader."""

from distseq.train.data.loader import StepLoader
from distseq.train.data.packing import PackedSequence, pack_documents, padded_length
from distseq.train.data.sources import recall_document, recall_vocab_size
from distseq.train.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "PackedSequence",
    "StepLoader",
    "load_tokenizer",
    "pack_documents",
    "padded_length",
    "recall_document",
    "recall_vocab_size",
]
