"""Tokenizers: built-in bytes, or a local Hugging Face tokenizer directory (never downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids ``0..255``."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer:
    """A local ``tokenizers`` / ``transformers`` tokenizer directory, loaded offline."""

    def __init__(self, directory: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ValueError(
                f"data.tokenizer={directory!r} needs the 'transformers' package "
                "(pip install transformers), or leave data.tokenizer unset for bytes"
            ) from exc
        self._tok = AutoTokenizer.from_pretrained(str(Path(directory)), local_files_only=True)
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)


def load_tokenizer(directory: str | None) -> Tokenizer:
    return ByteTokenizer() if directory is None else HFTokenizer(directory)
