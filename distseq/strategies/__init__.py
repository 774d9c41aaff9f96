"""Sequence-parallel strategies: one module each, registered by name on import."""

# delta (the delta-rule strategies) subclasses the linear ones it imports itself.
from distseq.strategies import (  # noqa: F401
    allgather,
    allscan,
    delta,
    lasp2,
    linear_ring,
    ring,
    ulysses,
    usp,
)
from distseq.strategies.base import ATTENTION_STRATEGIES, get_attention_strategy
from distseq.strategies.delta_base import DELTA_STRATEGIES
from distseq.strategies.linear_base import LINEAR_STRATEGIES, get_linear_strategy
from distseq.strategies.registry import Registry

# The registry serving each mixer type of a model (``distseq.models.config.MIXERS``).
REGISTRY_BY_MIXER: dict[str, Registry] = {
    "softmax": ATTENTION_STRATEGIES,
    "linear": LINEAR_STRATEGIES,
    "gdn": DELTA_STRATEGIES,
}

__all__ = [
    "ATTENTION_STRATEGIES",
    "DELTA_STRATEGIES",
    "LINEAR_STRATEGIES",
    "REGISTRY_BY_MIXER",
    "get_attention_strategy",
    "get_linear_strategy",
]
