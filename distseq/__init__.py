"""distseq: exact sequence-parallel softmax and linear attention for long-context training.

Public API (all tensors ``[batch, seq, heads, head_dim]``, ``q``/``k``/``v`` local shards)::

    distseq.shard_sequence(x, group=None, dim=1, layout="zigzag", cu_seqlens=None)
    distseq.gather_sequence(x, group=None, dim=1, layout="zigzag", cu_seqlens=None)
    distseq.attention(q, k, v, strategy="ring", group=None, causal=True, layout="zigzag",
                      cu_seqlens=None, scale=None, backend="auto")
    distseq.linear_attention(q, k, v, strategy="lasp2", group=None, log_decay=None,
                             layout="contiguous", cu_seqlens=None, scale=None,
                             initial_state=None, output_final_state=False, backend="auto")
    distseq.delta_rule(q, k, v, beta, strategy="lasp2", group=None, log_decay=None,
                       layout="contiguous", cu_seqlens=None, scale=None, initial_state=None,
                       output_final_state=False, backend="auto")   # beta [batch, seq, heads]
    distseq.causal_conv1d(x, weight, bias=None, group=None, layout="contiguous",
                          cu_seqlens=None, activation=None)     # x [batch, seq, channels]
    distseq.available_strategies()
    distseq.cu_seqlens(lengths, device=None)   # int32 [n + 1] boundaries of documents
"""

from distseq.attention import attention, available_strategies
from distseq.comm import CommCounter
from distseq.conv import causal_conv1d
from distseq.delta_rule import delta_rule
from distseq.layout import cu_seqlens
from distseq.linear_attention import linear_attention
from distseq.sharding import gather_sequence, shard_sequence

__all__ = [
    "CommCounter",
    "attention",
    "available_strategies",
    "causal_conv1d",
    "cu_seqlens",
    "delta_rule",
    "gather_sequence",
    "linear_attention",
    "shard_sequence",
]
__version__ = "0.1.0"
