"""Hugging Face ``transformers`` causal LMs under sequence parallelism, with no copy of the
model's code: :func:`apply` routes the model's attention through distseq (transformers' public
``AttentionInterface``), :func:`shard_batch` gives each rank its share of a batch, and
:func:`causal_lm_loss` its share of the loss.

    model = distseq.hf.apply(model, strategy="ring", layout="zigzag")
    local = distseq.hf.shard_batch(input_ids, position_ids=position_ids, layout="zigzag")
    labels = local.pop("labels")
    loss = distseq.hf.causal_lm_loss(model(**local).logits, labels)
    # or, never building the [tokens, vocab] logits (fused, chunked):
    loss = distseq.hf.causal_lm_loss(model.model(**local).last_hidden_state, labels,
                                     weight=model.lm_head.weight)
"""

from distseq.hf.apply import apply
from distseq.hf.batch import shard_batch
from distseq.hf.loss import causal_lm_loss

__all__ = ["apply", "causal_lm_loss", "shard_batch"]
