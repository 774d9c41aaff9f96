"""What a decoder needs to know about the sequence sharding of one packed batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

import distseq
from distseq.agreed import AgreedBatch, agree_batch
from distseq.attention import attention_agreed
from distseq.comm import ProcessGroup
from distseq.conv import causal_conv1d_agreed
from distseq.delta_rule import delta_rule_agreed
from distseq.layout import ShardLayout, cu_seqlens
from distseq.linear_attention import linear_attention_agreed


def document_positions(shard: ShardLayout) -> torch.Tensor:
    """Position of each of the shard's tokens inside its own document, ``[S_local]`` int64."""
    starts = cu_seqlens(shard.doc_lengths).long()  # searchsorted wants positions' dtype
    doc = torch.searchsorted(starts[1:], shard.positions, right=True)
    return shard.positions - starts[doc]


@dataclass(frozen=True)
class SequenceContext:
    """One packed sequence (batch 1) sharded over ``group`` in ``layout``.

    ``cu_seqlens`` are the *global* int32 document boundaries; ``positions`` ``[S_local]``
    are each local token's position inside its own document (RoPE restarts per document),
    derived from :class:`distseq.layout.ShardLayout` so they follow the sharding layout.
    ``attention_backend`` / ``linear_backend`` name the local kernels of the softmax / linear
    layers (``distseq.kernels.BACKENDS`` / ``LINEAR_BACKENDS``, or ``"auto"``).
    ``ulysses_degree``: the Ulysses group size when ``attention_strategy`` is ``"usp"``.

    :meth:`build` checks all this and agrees on it across the group once (``agreed``, see
    :mod:`distseq.agreed`); the layers then call :meth:`attention` / :meth:`linear_attention`
    / :meth:`causal_conv1d`, which launch only the strategy's own communication. A context
    constructed without ``agreed`` checks and agrees on every call instead.
    """

    group: ProcessGroup | None
    layout: str
    shard: ShardLayout
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    attention_strategy: str = "ring"
    linear_strategy: str = "lasp2"
    attention_backend: str = "auto"
    linear_backend: str = "auto"
    ulysses_degree: int | None = None
    agreed: AgreedBatch | None = field(default=None, compare=False, repr=False)
    _device_positions: dict[torch.device, torch.Tensor] = field(
        default_factory=dict, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        agreed = self.agreed
        if agreed is None:
            return
        names = ("layout", "attention_strategy", "linear_strategy", "attention_backend",
                 "linear_backend", "ulysses_degree")  # fmt: skip
        mine = (self.shard.doc_lengths, *(getattr(self, name) for name in names))
        theirs = (agreed.doc_lengths, *(getattr(agreed, name) for name in names))
        if mine != theirs:
            raise ValueError(
                f"SequenceContext {mine} differs from what its ranks agreed on {theirs}; "
                "build a new context with SequenceContext.build (or pass agreed=None)"
            )

    @classmethod
    def build(
        cls,
        doc_lengths: Sequence[int],
        *,
        group: ProcessGroup | None = None,
        layout: str = "zigzag",
        attention_strategy: str = "ring",
        linear_strategy: str = "lasp2",
        attention_backend: str = "auto",
        linear_backend: str = "auto",
        ulysses_degree: int | None = None,
    ) -> SequenceContext:
        agreed = agree_batch(
            doc_lengths, group=group, layout=layout, attention_strategy=attention_strategy,
            linear_strategy=linear_strategy, attention_backend=attention_backend,
            linear_backend=linear_backend, ulysses_degree=ulysses_degree,
        )  # fmt: skip
        shard = agreed.shard
        return cls(
            group=group,
            layout=layout,
            shard=shard,
            cu_seqlens=cu_seqlens(shard.doc_lengths),
            positions=document_positions(shard),
            attention_strategy=attention_strategy,
            linear_strategy=linear_strategy,
            attention_backend=attention_backend,
            linear_backend=linear_backend,
            ulysses_degree=ulysses_degree,
            agreed=agreed,
        )

    def positions_on(self, device: torch.device) -> torch.Tensor:
        """:attr:`positions` on ``device``, copied once (not once per layer: a host-to-device
        copy stalls a GPU's stream)."""
        if device not in self._device_positions:
            self._device_positions[device] = self.positions.to(device)
        return self._device_positions[device]

    def shard_tokens(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard ``[B, S_local, ...]`` of a full packed tensor ``[B, S, ...]``."""
        return full.index_select(1, self.shard.positions.to(full.device))

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
    ) -> torch.Tensor:
        """Causal :func:`distseq.attention` of this rank's ``q``/``k``/``v`` shards
        ``[1, S_local, H, D]`` over the batch, with the context's strategy and backend."""
        if self.agreed is not None:
            return attention_agreed(q, k, v, self.agreed, causal=True, scale=scale)
        return distseq.attention(
            q, k, v, strategy=self.attention_strategy, group=self.group, causal=True,
            layout=self.layout, cu_seqlens=self.cu_seqlens, scale=scale,
            backend=self.attention_backend, ulysses_degree=self.ulysses_degree,
        )  # fmt: skip

    def linear_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        log_decay: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """:func:`distseq.linear_attention` of this rank's shards over the batch (no initial
        or final state), with the context's strategy and backend."""
        if self.agreed is not None:
            return linear_attention_agreed(q, k, v, self.agreed, log_decay=log_decay, scale=scale)
        return distseq.linear_attention(
            q, k, v, strategy=self.linear_strategy, group=self.group, log_decay=log_decay,
            layout=self.layout, cu_seqlens=self.cu_seqlens, scale=scale,
            backend=self.linear_backend,
        )  # fmt: skip

    def delta_rule(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        beta: torch.Tensor,
        *,
        log_decay: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """:func:`distseq.delta_rule` of this rank's shards over the batch (no initial or final
        state), with the context's linear strategy and backend."""
        if self.agreed is not None:
            return delta_rule_agreed(q, k, v, beta, self.agreed, log_decay=log_decay, scale=scale)
        return distseq.delta_rule(
            q, k, v, beta, strategy=self.linear_strategy, group=self.group, log_decay=log_decay,
            layout=self.layout, cu_seqlens=self.cu_seqlens, scale=scale,
            backend=self.linear_backend,
        )  # fmt: skip

    def causal_conv1d(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        activation: str | None = None,
    ) -> torch.Tensor:
        """:func:`distseq.causal_conv1d` of this rank's shard ``x`` ``[1, S_local, C]``."""
        if self.agreed is not None:
            return causal_conv1d_agreed(x, weight, bias, self.agreed, activation=activation)
        return distseq.causal_conv1d(
            x, weight, bias, group=self.group, layout=self.layout, cu_seqlens=self.cu_seqlens,
            activation=activation,
        )  # fmt: skip
