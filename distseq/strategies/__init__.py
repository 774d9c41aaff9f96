"""Sequence-parallel strategies: one module each, registered by name on import."""

from distseq.strategies import allgather, ring, ulysses  # noqa: F401  (registration)
from distseq.strategies.base import ATTENTION_STRATEGIES, get_attention_strategy

__all__ = ["ATTENTION_STRATEGIES", "get_attention_strategy"]
