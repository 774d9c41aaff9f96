"""Tiny ``transformers`` causal LMs and per-rank test bodies for ``distseq.hf`` (module-level,
so they pickle into the distributed pool).

The reference is transformers itself, unpatched, on one process in float32: one forward of
each row, or, for packed documents, one forward per document (transformers' sdpa/eager paths
do not separate documents that only ``position_ids`` describe) with the logits concatenated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import distseq
import distseq.hf
from cases import relative_error
from distseq.hf.attention import CU_SEQLENS_KWARG, LAYOUT_KWARG
from distseq.strategies import ATTENTION_STRATEGIES
from tolerance import nan_max

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
LAYOUTS = ("contiguous", "zigzag")
VOCAB = 64
# Shapes of the data: one long sequence per row (no position_ids; 48 needs no padding, 40 does
# at P = 3), or packed documents of unequal lengths (position_ids restart at 0), none a
# multiple of 2P for P = 2, 3, 4, so zigzag pads every one; the one-token document has no
# label at all.
SHAPES = {
    "one_sequence": dict(batch=1, length=48),
    "two_rows": dict(batch=2, length=40),
    "packed": dict(docs=[13, 29, 1, 22]),
}

# GQA with Hkv = 12 so that ulysses (P | Hkv) runs at P = 2, 3, 4; everything else tiny.
# initializer_range is raised from transformers' 0.02 so attention is far from uniform (a
# wrong mask or a lost document boundary then changes the loss well beyond the tolerance).
_TINY = dict(
    vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=24, num_key_value_heads=12, head_dim=8, max_position_embeddings=256,
    initializer_range=0.3, tie_word_embeddings=False, use_cache=False,
)  # fmt: skip
# Turn off what distseq refuses (sliding windows), which these configs enable by default.
_FULL_ATTENTION = {"mistral": dict(sliding_window=None)}


def tiny_config(model_type: str, **overrides):
    """A tiny random config of ``model_type`` (any type transformers registers)."""
    from transformers import AutoConfig

    kwargs = {**_TINY, **_FULL_ATTENTION.get(model_type, {}), **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A float32 causal LM of ``tiny_config(model_type, **overrides)``, identical for a seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    return model.float().train()


def make_batch(shape_name: str, seed: int):
    """``SHAPES[shape_name]`` as ``(input_ids [B, S], position_ids [1, S] or None, document
    lengths or None)``."""
    gen = torch.Generator().manual_seed(seed)
    shape = SHAPES[shape_name]
    docs = shape.get("docs")
    if docs is None:
        ids = torch.randint(VOCAB, (shape["batch"], shape["length"]), generator=gen)
        return ids, None, None
    ids = torch.randint(VOCAB, (1, sum(docs)), generator=gen)
    position_ids = torch.cat([torch.arange(n) for n in docs])[None]
    return ids, position_ids, docs


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed cross entropy of ``logits`` ``[B, S, V]`` predicting ``ids[:, 1:]``."""
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="sum")


def reference_loss_and_grads(model, ids: torch.Tensor, docs: list[int] | None):
    """The unpatched model's mean next-token loss (within documents) and its gradients."""
    model.zero_grad(set_to_none=True)
    if docs is None:
        total = _next_token_loss(model(input_ids=ids).logits, ids)
        count = ids.shape[0] * (ids.shape[1] - 1)
    else:
        pieces = ids.split(docs, dim=1)
        total = sum(_next_token_loss(model(input_ids=p).logits, p) for p in pieces)
        count = sum(n - 1 for n in docs)
    loss = total / count
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def sharded_loss_and_grads(model, ids, position_ids, strategy: str, layout: str,
                           merge_documents: bool = False,
                           ulysses_degree: int | None = None):  # fmt: skip
    """``distseq.hf`` on this rank; the loss and gradients summed over the ranks.

    ``merge_documents`` withholds the document boundaries from the attention (a deliberate
    defect, to show the comparison catches one).
    """
    distseq.hf.apply(model, strategy=strategy, layout=layout, ulysses_degree=ulysses_degree)
    model.zero_grad(set_to_none=True)
    local = distseq.hf.shard_batch(ids, position_ids=position_ids, layout=layout)
    if merge_documents:
        del local[CU_SEQLENS_KWARG]
    labels = local.pop("labels")
    loss = distseq.hf.causal_lm_loss(model(**local).logits, labels)
    loss.backward()
    loss = loss.detach()
    dist.all_reduce(loss)
    grads = {}
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad)
        grads[name] = p.grad
    return loss, grads


def hf_vs_transformers(rank, world, model_type: str, shape_name: str, seed: int) -> list[dict]:
    """Every strategy x layout on ``SHAPES[shape_name]`` against the unpatched model.

    Returns one record per (strategy, layout): the loss's relative error, the largest
    gradient relative error over the parameters and the parameter it belongs to.
    """
    reference = tiny_model(model_type, seed)
    ids, position_ids, docs = make_batch(shape_name, seed)
    ref_loss, ref_grads = reference_loss_and_grads(reference, ids, docs)
    records = []
    for strategy in ATTENTION_STRATEGIES:
        for layout in LAYOUTS:
            model = tiny_model(model_type, seed)
            loss, grads = sharded_loss_and_grads(model, ids, position_ids, strategy, layout)
            records.append(dict(strategy=strategy, layout=layout,
                                **_errors(loss, grads, ref_loss, ref_grads)))  # fmt: skip
    return records


def _errors(loss, grads, ref_loss, ref_grads) -> dict:
    """The loss's relative error, the largest gradient relative error over the parameters,
    the parameter it belongs to and the parameter count."""
    errors = {name: relative_error(grads[name], ref_grads[name]) for name in ref_grads}
    return dict(loss=relative_error(loss, ref_loss), grad=nan_max(errors.values()),
                worst_param=max(errors, key=errors.__getitem__), params=len(errors))  # fmt: skip


def usp_degree_vs_transformers(rank, world, ulysses_degree: int, seed: int) -> list[dict]:
    """``apply(strategy="usp", ulysses_degree=...)`` per layout on packed documents against
    the unpatched Llama, with the ``torch.distributed`` ops each run launched (they tell the
    degree: only a Ulysses group of the whole world all-to-alls as one collective)."""
    reference = tiny_model("llama", seed)
    ids, position_ids, docs = make_batch("packed", seed)
    ref_loss, ref_grads = reference_loss_and_grads(reference, ids, docs)
    records = []
    for layout in LAYOUTS:
        model = tiny_model("llama", seed)
        with distseq.CommCounter() as counter:
            loss, grads = sharded_loss_and_grads(
                model, ids, position_ids, "usp", layout, ulysses_degree=ulysses_degree
            )
        ops = sorted(op for op, n in counter.calls.items() if n)
        records.append(dict(layout=layout, ops=ops, **_errors(loss, grads, ref_loss, ref_grads)))
    return records


def merged_documents_error(rank, world, model_type: str, seed: int) -> dict[str, float]:
    """Errors of the packed case when the attention is not told the documents."""
    reference = tiny_model(model_type, seed)
    ids, position_ids, docs = make_batch("packed", seed)
    ref_loss, ref_grads = reference_loss_and_grads(reference, ids, docs)
    model = tiny_model(model_type, seed)
    loss, grads = sharded_loss_and_grads(
        model, ids, position_ids, "ring", "zigzag", merge_documents=True
    )
    worst = nan_max(relative_error(grads[name], ref_grads[name]) for name in ref_grads)
    return {"loss": relative_error(loss, ref_loss), "grad": worst}


def gathered_batch(rank, world, shape_name: str, layout: str, seed: int) -> dict[str, list]:
    """``shard_batch``'s local tensors gathered back into global order, as lists."""
    ids, position_ids, _ = make_batch(shape_name, seed)
    local = distseq.hf.shard_batch(ids, position_ids=position_ids, layout=layout)
    cu = local.pop(CU_SEQLENS_KWARG, None)
    assert local.pop(LAYOUT_KWARG) == layout
    out = {
        key: distseq.gather_sequence(t, layout=layout, cu_seqlens=cu).tolist()
        for key, t in local.items()
    }
    out["cu_seqlens"] = None if cu is None else cu.tolist()
    return out


def _bad_heads_model(world: int):
    """Heads (query and key/value) one more than the group size: ulysses cannot split them."""
    heads = world + 1
    return tiny_model(
        "llama", num_attention_heads=heads, num_key_value_heads=heads, hidden_size=8 * heads
    )


def _not_registry_model(world: int):
    """A transformers causal LM whose attention does not go through the registry."""
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=4))


_BAD_MODELS = {
    "ulysses_heads": _bad_heads_model,
    "not_registry": _not_registry_model,
    "not_pretrained": lambda world: torch.nn.Linear(4, 4),
}
_BAD_CONFIGS = {
    "mistral_sliding_window": ("mistral", dict(sliding_window=16)),
    "qwen2_sliding_window": (
        "qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=0),
    ),
    "gemma2_softcapping": ("gemma2", dict(sliding_window=None)),  # attn_logit_softcapping 50
    "attention_dropout": ("llama", dict(attention_dropout=0.1)),  # refused in training
}  # fmt: skip


def bad_hf_call(rank, world, kind: str):
    """One training step through ``distseq.hf`` with the defect named by ``kind``."""
    ids, position_ids, _ = make_batch("packed", seed=0)
    if kind == "position_ids_gap":
        position_ids = position_ids.clone()
        position_ids[0, 6:13] += 1  # the first document skips position 6
    elif kind == "position_ids_start":
        position_ids = position_ids + 1
    elif kind == "position_ids_batch":
        ids, position_ids = ids.expand(2, -1), position_ids.expand(2, -1)
    if kind in _BAD_MODELS:
        model = _BAD_MODELS[kind](world)
    else:
        model_type, overrides = _BAD_CONFIGS.get(kind, ("llama", {}))
        model = tiny_model(model_type, **overrides)
    strategy = "ulysses" if kind == "ulysses_heads" else "ring"
    distseq.hf.apply(model, strategy=strategy, layout="zigzag")
    local = distseq.hf.shard_batch(
        ids,
        position_ids=position_ids,
        layout="contiguous" if kind == "layout_mismatch" else "zigzag",
        pad_to_multiple=kind != "unpadded",
    )
    labels = local.pop("labels")
    if kind == "padding_mask":
        local["attention_mask"] = torch.ones_like(local["input_ids"])
        local["attention_mask"][:, :2] = 0
    distseq.hf.causal_lm_loss(model(**local).logits, labels).backward()
    return "no error"
