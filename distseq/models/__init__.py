"""Decoder models whose token mixers run sequence-parallel through distseq.

``Decoder(cfg)(tokens, ctx)``: ``tokens`` ``[B, S_local]`` is this rank's shard of a packed
sequence described by ``ctx`` (:class:`SequenceContext`); returns logits ``[B, S_local, V]``.
"""

from distseq.models.config import (
    ModelConfig,
    block_parameters,
    check_model_config,
    count_parameters,
    layer_mixers,
    model_config_from_dict,
)
from distseq.models.context import SequenceContext
from distseq.models.decoder import Decoder, DecoderBlock

__all__ = [
    "Decoder",
    "DecoderBlock",
    "ModelConfig",
    "SequenceContext",
    "block_parameters",
    "check_model_config",
    "count_parameters",
    "layer_mixers",
    "model_config_from_dict",
]
