"""Agree on a batch once, then run every layer on it without agreeing again.

The public entry points (:func:`distseq.attention`, :func:`distseq.linear_attention`,
:func:`distseq.causal_conv1d`) check their inputs and agree on them across the ranks on every
call (:mod:`distseq.validation`): an all-gather and host syncs per layer, repeated under
activation recomputation, which on a GPU stalls the stream once per layer. A model makes many
such calls on one packed batch whose facts (group, document lengths, layout, strategies,
backends) are fixed when the batch is sharded. :func:`agree_batch` checks those facts and
agrees on them once; the :class:`AgreedBatch` it returns is the token the ``*_agreed`` entry
points (``distseq.attention.attention_agreed`` and its siblings) take instead.

Per call, only local host checks remain (shapes, dtypes, heads: tensor metadata, no device
sync, no communication), run once per distinct shape and cached in the token. Every rank runs
the same model on the agreed batch, so such a check fails on every rank alike and cannot leave
a rank blocked in a collective.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from distseq.comm import GroupInfo, ProcessGroup, resolve_group
from distseq.kernels import BACKENDS, LINEAR_BACKENDS
from distseq.layout import ShardLayout, check_divisible, check_layout, shard_layout
from distseq.strategies import ATTENTION_STRATEGIES, LINEAR_STRATEGIES
from distseq.strategies.registry import check_layout_supported
from distseq.validation import signature_code, validate_on_all_ranks

_SIGNATURE = [
    "document lengths", "layout", "attention strategy", "linear strategy",
    "attention backend", "linear backend", "ulysses degree",
]  # fmt: skip


@dataclass(frozen=True, eq=False)
class AgreedBatch:
    """One packed sequence (batch 1) whose sharding every rank of ``info``'s group agreed on.

    Built only by :func:`agree_batch`. ``doc_lengths`` are the global document lengths; the
    host-side facts the layers need (the shard layout, document boundaries) are derived here
    once, never from device tensors.
    """

    info: GroupInfo
    layout: str
    doc_lengths: tuple[int, ...]
    attention_strategy: str
    linear_strategy: str
    attention_backend: str
    linear_backend: str
    ulysses_degree: int | None = None
    _plans: dict[Hashable, Any] = field(default_factory=dict, repr=False)

    @property
    def shard(self) -> ShardLayout:
        return shard_layout(self.doc_lengths, self.info.world_size, self.info.rank, self.layout)

    def check_local_shape(self, op: str, batch: int, seq_local: int) -> None:
        """A layer's ``[batch, S_local]`` must be the agreed sequence's shard."""
        if batch != 1 or seq_local != self.shard.local_length:
            raise ValueError(
                f"{op}: got batch {batch} x {seq_local} local tokens but the agreed batch is 1 "
                f"x {self.shard.local_length} (documents {list(self.doc_lengths)} over "
                f"{self.info.world_size} ranks); pass this rank's shard of the agreed sequence"
            )

    def plan(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` (local checks, no communication) the first time ``key`` is seen."""
        if key not in self._plans:
            self._plans[key] = build()
        return self._plans[key]


def _check_backend(name: str, table: dict[str, str], what: str) -> None:
    if name != "auto" and name not in table:
        raise ValueError(f"unknown {what} backend {name!r}; choose one of {['auto', *table]}")


def agree_batch(
    doc_lengths: Sequence[int],
    *,
    group: ProcessGroup | None = None,
    layout: str = "zigzag",
    attention_strategy: str = "ring",
    linear_strategy: str = "lasp2",
    attention_backend: str = "auto",
    linear_backend: str = "auto",
    ulysses_degree: int | None = None,
) -> AgreedBatch:
    """Check a batch's sharding and options and agree on them across ``group`` (one small
    all-gather, :func:`distseq.validation.validate_on_all_ranks`): bad input raises a
    ``ValueError`` on every rank. Head counts are checked per layer (locally)."""
    info = resolve_group(group)
    built: dict[str, AgreedBatch] = {}

    def check() -> list[int]:
        check_layout(layout)
        lengths = tuple(int(n) for n in doc_lengths)
        if not lengths or min(lengths) < 0:
            raise ValueError(f"doc_lengths {list(lengths)} must be one or more lengths >= 0")
        check_divisible(lengths, info.world_size, layout, "doc_lengths")
        check_layout_supported(ATTENTION_STRATEGIES.get(attention_strategy), layout)
        LINEAR_STRATEGIES.check(linear_strategy, info.world_size, layout)
        _check_backend(attention_backend, BACKENDS, "attention")
        _check_backend(linear_backend, LINEAR_BACKENDS, "linear attention")
        built["batch"] = AgreedBatch(
            info, layout, lengths, attention_strategy, linear_strategy, attention_backend,
            linear_backend, ulysses_degree,
        )  # fmt: skip
        options = (lengths, layout, attention_strategy, linear_strategy, attention_backend,
                   linear_backend, ulysses_degree)  # fmt: skip
        return [signature_code(str(option)) for option in options]

    validate_on_all_ranks("distseq.agree_batch", info, check, _SIGNATURE)
    return built["batch"]
