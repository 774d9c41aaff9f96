"""distseq: exact sequence-parallel attention for long-context training on PyTorch.

Public API (all tensors ``[batch, seq, heads, head_dim]``, ``q``/``k``/``v`` local shards)::

    distseq.shard_sequence(x, group=None, dim=1, layout="zigzag", cu_seqlens=None)
    distseq.gather_sequence(x, group=None, dim=1, layout="zigzag", cu_seqlens=None)
    distseq.attention(q, k, v, strategy="ring", group=None, causal=True, layout="zigzag",
                      cu_seqlens=None, scale=None, backend="auto")
    distseq.available_strategies()
"""

from distseq.attention import attention, available_strategies
from distseq.comm import CommCounter
from distseq.sharding import gather_sequence, shard_sequence

__all__ = [
    "CommCounter",
    "attention",
    "available_strategies",
    "gather_sequence",
    "shard_sequence",
]
__version__ = "0.1.0"
