"""Pre-tokenized token shards: the on-disk format, its writer and a lazy, validating reader.

A shard directory holds ``meta.json`` (written last, atomically, so a half-written directory
has none) and per shard ``shard_NNNNN.bin`` (the documents' tokens back to back, ``uint16``
when every id fits, else ``uint32``) plus ``shard_NNNNN.idx`` (``int64`` offsets, one more
than the shard's documents: document ``i`` is ``tokens[idx[i]:idx[i + 1]]``). As in Megatron
and nanoGPT the reader memory-maps both, so a rank touches only the pages of the documents it
reads; document lengths come from the index alone.
"""

from __future__ import annotations

import functools
import json
import os
from bisect import bisect_right
from pathlib import Path

import numpy as np

FORMAT = "distseq-shards"
VERSION = 1
META = "meta.json"
_OFFSET = np.dtype(np.int64)


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id of a ``vocab_size`` vocabulary fits, else ``uint32``."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ShardWriter:
    """Appends documents to ``directory``, starting a new shard after ``shard_tokens`` tokens;
    :meth:`close` writes the header. Only the current shard's offsets are held in memory."""

    def __init__(self, directory: Path, vocab_size: int, tokenizer: str, shard_tokens: int):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens={shard_tokens} must be positive")
        self.directory, self.vocab_size, self.tokenizer = directory, vocab_size, tokenizer
        self.dtype, self.shard_tokens = token_dtype(vocab_size), shard_tokens
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META).unlink(missing_ok=True)  # the directory is incomplete until close()
        self.shards: list[dict[str, object]] = []
        self._file = None
        self._offsets: list[int] = []

    def add(self, ids: list[int] | np.ndarray) -> None:
        """Append one document (token ids ``< vocab_size``)."""
        array = np.asarray(ids)
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            raise ValueError(
                f"token id {int(array.max())} is outside the tokenizer's vocabulary of "
                f"{self.vocab_size}"
            )
        if self._file is None:
            name = f"shard_{len(self.shards):05d}"
            self._file = open(self.directory / f"{name}.bin", "wb")  # noqa: SIM115
            self._offsets = [0]
        array.astype(self.dtype).tofile(self._file)
        self._offsets.append(self._offsets[-1] + array.size)
        if self._offsets[-1] >= self.shard_tokens:
            self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._file is not None
        self._file.close()
        name = Path(self._file.name).stem
        np.asarray(self._offsets, dtype=_OFFSET).tofile(self.directory / f"{name}.idx")
        self.shards.append(
            {"name": name, "documents": len(self._offsets) - 1, "tokens": self._offsets[-1]}
        )
        self._file = None

    def close(self) -> dict[str, object]:
        """Finish the last shard and write ``meta.json``; returns the header."""
        if self._file is not None:
            self._finish_shard()
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer,
            "documents": sum(int(s["documents"]) for s in self.shards),
            "tokens": sum(int(s["tokens"]) for s in self.shards),
            "shards": self.shards,
        }
        tmp = self.directory / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.replace(tmp, self.directory / META)
        return meta


def read_meta(directory: str | Path) -> dict:
    """The header of a shard directory; ValueError naming the file if it is missing or bad."""
    path = Path(directory) / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"{path} does not exist: {directory} is not a complete shard directory "
            "(write one with `python -m distseq.data prepare`)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); re-run prepare") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} header")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path} has version {meta.get('version')}; this reader reads {VERSION}")
    return meta


class _Shard:
    """One shard: sizes are checked on open (``stat`` only); the files are mapped, and the
    index's ends checked, on first use."""

    def __init__(self, directory: Path, entry: dict, dtype: np.dtype) -> None:
        self.name, self.dtype = entry["name"], dtype
        self.bin, self.idx = directory / f"{self.name}.bin", directory / f"{self.name}.idx"
        self.documents, self.tokens = int(entry["documents"]), int(entry["tokens"])
        self._check_size(self.bin, self.tokens * dtype.itemsize, f"{self.tokens} tokens")
        self._check_size(self.idx, (self.documents + 1) * _OFFSET.itemsize,
                         f"{self.documents + 1} offsets")  # fmt: skip

    @functools.cached_property
    def offsets(self) -> np.memmap:
        offsets = np.memmap(self.idx, dtype=_OFFSET, mode="r")
        if offsets[0] != 0 or offsets[-1] != self.tokens:
            end = self.documents * _OFFSET.itemsize
            raise ValueError(
                f"{self.idx}: offsets run {int(offsets[0])} (byte offset 0) .. "
                f"{int(offsets[-1])} (byte offset {end}) but the shard holds "
                f"{self.tokens} tokens; the index is malformed"
            )
        return offsets

    @functools.cached_property
    def data(self) -> np.memmap:
        return np.memmap(self.bin, dtype=self.dtype, mode="r")

    @staticmethod
    def _check_size(path: Path, expected: int, what: str) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ValueError(f"shard file {path} is missing") from None
        if size != expected:
            state = "truncated" if size < expected else "malformed (too long)"
            raise ValueError(
                f"shard file {path} is {state}: it ends at byte offset {size} but the header "
                f"says {what} ({expected} bytes); re-run prepare"
            )

    def span(self, document: int) -> tuple[int, int]:
        start, stop = int(self.offsets[document]), int(self.offsets[document + 1])
        if not 0 <= start <= stop <= self.tokens:
            raise ValueError(
                f"{self.idx}: document {document} spans {start}..{stop} (byte offset "
                f"{document * _OFFSET.itemsize}), outside the shard's {self.tokens} tokens or "
                "backwards; the index is malformed"
            )
        return start, stop


class ShardCorpus:
    """Random access to the documents of one or more shard directories, read lazily.

    ``length(i)`` reads only the index; ``tokens(i, start, stop)`` the requested slice.
    """

    def __init__(self, directories: list[str]) -> None:
        self.shards: list[_Shard] = []
        self.vocab_size = 0
        for directory in directories:
            meta = read_meta(directory)
            dtype = np.dtype(meta["dtype"])
            self.vocab_size = max(self.vocab_size, int(meta["vocab_size"]))
            self.shards += [_Shard(Path(directory), entry, dtype) for entry in meta["shards"]]
        self._first = np.cumsum([0] + [s.documents for s in self.shards]).tolist()
        if self._first[-1] == 0:
            raise ValueError(f"shard directories {directories} hold no documents")

    def __len__(self) -> int:
        return self._first[-1]

    def _locate(self, index: int) -> tuple[_Shard, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} of {len(self)}")
        which = bisect_right(self._first, index) - 1
        return self.shards[which], index - self._first[which]

    def length(self, index: int) -> int:
        shard, local = self._locate(index)
        start, stop = shard.span(local)
        return stop - start

    def tokens(self, index: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens ``[start:stop]`` of document ``index`` (an int64 copy)."""
        shard, local = self._locate(index)
        first, last = shard.span(local)
        stop = last - first if stop is None else min(stop, last - first)
        piece = np.asarray(shard.data[first + start : first + stop], dtype=np.int64)
        if piece.size and piece.max() >= self.vocab_size:
            raise ValueError(
                f"{shard.bin}: token {int(piece.max())} near byte offset "
                f"{(first + start) * shard.data.itemsize} exceeds the header's vocab_size "
                f"{self.vocab_size}; the shard is malformed"
            )
        return piece
