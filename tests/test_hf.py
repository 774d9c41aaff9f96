"""``distseq.hf`` against transformers itself (unpatched, one process, float32): the loss and
every parameter gradient of tiny random Llama, Qwen2, Qwen3 and Mistral models at P = 2, 3, 4
for every softmax strategy x layout; ``causal_lm_loss`` and ``shard_batch`` on their own; bad
input raising ``ValueError`` on every rank without a hang."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import distseq.hf
import hf_cases
from distseq.hf.batch import IGNORE_INDEX
from distseq.strategies import ATTENTION_STRATEGIES

WORLD_SIZES = (2, 3, 4)
LOSS_TOL = 1e-5
GRAD_TOL = 1e-4  # max |difference| / max |reference|, per parameter
LOSS_ALONE_TOL = 1e-6


def _in_default_run(model_type: str, shape: str, world: int) -> bool:
    """Packed documents for every model type x P; one long sequence once per model type (P
    rotating) and two rows once. Every call covers all strategies x layouts."""
    index = hf_cases.MODEL_TYPES.index(model_type)
    if shape == "packed":
        return True
    if shape == "one_sequence":
        return world == WORLD_SIZES[index % len(WORLD_SIZES)]
    return index == 0 and world == WORLD_SIZES[-1]


MATRIX = [
    pytest.param(
        model_type, shape, world, id=f"{model_type}-{shape}-P{world}",
        marks=() if _in_default_run(model_type, shape, world) else pytest.mark.slow,
    )
    for model_type in hf_cases.MODEL_TYPES
    for shape in hf_cases.SHAPES
    for world in WORLD_SIZES
]  # fmt: skip


@pytest.mark.parametrize("model_type, shape, world", MATRIX)
def test_matches_transformers(pools, model_type, shape, world):
    seed = 10 * hf_cases.MODEL_TYPES.index(model_type) + world  # data differ per model too
    records = pools(world).run(hf_cases.hf_vs_transformers, model_type, shape, seed)
    for rank_records in records:
        covered = {(r["strategy"], r["layout"]) for r in rank_records}
        assert covered == set(itertools.product(ATTENTION_STRATEGIES, hf_cases.LAYOUTS))
        for r in rank_records:
            assert r["params"] > 0, r
            assert r["loss"] <= LOSS_TOL, r  # a NaN fails too
            assert r["grad"] <= GRAD_TOL, r


@pytest.mark.parametrize("world, degree", [(2, 1), (4, 2)])
def test_apply_ulysses_degree_matches_transformers(pools, world, degree):
    """``apply(ulysses_degree=)`` reaches usp: at P = 2 a degree of 1 (a ring of two, where
    the default is one Ulysses pair) and at P = 4 usp 2x2 (the default: one group of four)."""
    records = pools(world).run(hf_cases.usp_degree_vs_transformers, degree, world)
    for rank_records in records:
        assert {r["layout"] for r in rank_records} == set(hf_cases.LAYOUTS)
        for r in rank_records:
            assert r["params"] > 0 and r["loss"] <= LOSS_TOL and r["grad"] <= GRAD_TOL, r
            # neither runs one all-to-all over the whole world (the default degree's)
            assert "all_to_all_single" not in r["ops"] and "batch_isend_irecv" in r["ops"], r


def test_apply_refuses_ulysses_degree_for_other_strategies():
    model = hf_cases.tiny_model("llama")
    with pytest.raises(ValueError, match="ulysses_degree=2 applies to strategy 'usp' only"):
        distseq.hf.apply(model, strategy="ring", ulysses_degree=2)
    with pytest.raises(ValueError, match="usp: ulysses_degree=5 must be a positive integer"):
        distseq.hf.apply(model, strategy="usp", ulysses_degree=5)


def test_comparison_catches_merged_documents(pools):
    """The comparison can fail: withholding the document boundaries from the attention (so
    documents attend to each other) puts the loss and gradients far outside the tolerance."""
    for errors in pools(2).run(hf_cases.merged_documents_error, "llama", 0):
        assert errors["loss"] > 100 * LOSS_TOL, errors
        assert errors["grad"] > 100 * GRAD_TOL, errors


def _expected_batch(shape_name: str, multiple: int) -> dict[str, list]:
    """What ``shard_batch`` must hold, in global order, built from the unsharded batch: each
    document padded to ``multiple``, its labels the next token of the same document."""
    ids, _, docs = hf_cases.make_batch(shape_name, seed=5)
    docs = docs or [ids.shape[1]]
    out: dict[str, list] = {"input_ids": [], "position_ids": [], "labels": []}
    for row in ids.tolist():
        rows: dict[str, list] = {key: [] for key in out}
        for doc in _split(row, docs):
            pad = -len(doc) % multiple
            rows["input_ids"] += doc + [0] * pad
            rows["position_ids"] += list(range(len(doc) + pad))
            rows["labels"] += doc[1:] + [IGNORE_INDEX] * (1 + pad)
        for key in out:
            out[key].append(rows[key])
    padded = [n + -n % multiple for n in docs]
    out["cu_seqlens"] = [0, *itertools.accumulate(padded)] if shape_name == "packed" else None
    return out


@pytest.mark.parametrize("world", (3, 4))
@pytest.mark.parametrize("layout", hf_cases.LAYOUTS)
@pytest.mark.parametrize("shape_name", ("packed", "two_rows"))
def test_shard_batch_labels_across_shard_boundaries(pools, shape_name, layout, world):
    """The ranks' shards, put back together, are the padded batch with every label (the next
    token within the document) present exactly once: none lost at a shard boundary."""
    multiple = world * (2 if layout == "zigzag" else 1)
    expected = _expected_batch(shape_name, multiple)
    ids, _, docs = hf_cases.make_batch(shape_name, seed=5)
    shifted = [
        [label for doc in _split(row, docs or [ids.shape[1]]) for label in doc[1:]]
        for row in ids.tolist()
    ]
    for got in pools(world).run(hf_cases.gathered_batch, shape_name, layout, 5):
        assert got == expected
        # The union of the ranks' labels is the unsharded batch's shifted labels.
        real = [[label for label in row if label != IGNORE_INDEX] for row in got["labels"]]
        assert real == shifted


def _split(row: list[int], lengths: list[int]) -> list[list[int]]:
    bounds = [0, *itertools.accumulate(lengths)]
    return [row[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("chunk", (1, 7, 10_000))
def test_causal_lm_loss_matches_cross_entropy(chunk):
    """One process: the mean over labelled tokens, value and gradient, for any chunking."""
    gen = torch.Generator().manual_seed(chunk)
    logits = torch.randn(2, 19, 37, generator=gen) * 3
    labels = torch.randint(37, (2, 19), generator=gen)
    labels[0, 5:9] = IGNORE_INDEX
    labels[1, -1] = IGNORE_INDEX
    upstream = 1.7  # a gradient other than 1 flows into the loss
    mine, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = distseq.hf.causal_lm_loss(mine, labels, chunk_tokens=chunk)
    expected = F.cross_entropy(ref.view(-1, 37), labels.view(-1), ignore_index=IGNORE_INDEX)
    (loss * upstream).backward()
    (expected * upstream).backward()
    assert hf_cases.relative_error(loss, expected) <= LOSS_ALONE_TOL
    assert hf_cases.relative_error(mine.grad, ref.grad) <= LOSS_ALONE_TOL


def test_causal_lm_loss_without_labels_is_zero():
    """A batch with no labelled token (all padding) gives 0 and zero gradients, not NaN."""
    logits = torch.randn(1, 5, 11, requires_grad=True)
    loss = distseq.hf.causal_lm_loss(logits, torch.full((1, 5), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_attention_dropout_runs_in_eval_mode():
    """Dropout is refused only when it would be applied: in eval mode the model runs."""
    model = distseq.hf.apply(hf_cases.tiny_model("llama", attention_dropout=0.1)).eval()
    ids, _, _ = hf_cases.make_batch("one_sequence", seed=1)
    reference = hf_cases.tiny_model("llama", attention_dropout=0.1).eval()
    local = distseq.hf.shard_batch(ids, layout="contiguous")
    del local["labels"]
    with torch.no_grad():
        got = model(**local).logits
        assert hf_cases.relative_error(got, reference(input_ids=ids).logits) <= GRAD_TOL


# kind -> words every rank's ValueError must contain (the value and the fix); {w} is P, {w1}
# P + 1 and {m} the zigzag multiple 2P.
BAD_INPUT = {
    "mistral_sliding_window": ["config.sliding_window=16", "set it to None"],
    "qwen2_sliding_window": ["config.sliding_window=16", "set it to None"],
    "gemma2_softcapping": ["config.attn_logit_softcapping=50.0", "set it to None"],
    "attention_dropout": ["config.attention_dropout=0.1", "set it to 0.0", "model.eval()"],
    "padding_mask": ["attention_mask", "shard_batch(position_ids=...)"],
    "position_ids_gap": ["position_ids[0, 6] = 7 after 5", "restart at 0"],
    "position_ids_start": ["position_ids[0, 0] = 1", "must start at 0"],
    "position_ids_batch": ["position_ids (2, 65)", "batch 1"],
    "unpadded": ["document 0 has 13 tokens", "not a multiple of {m}", "pad_to_multiple=True"],
    "ulysses_heads": ["ulysses", "{w1} query heads", "group size {w}", "strategies that can"],
    "not_registry": ["BloomForCausalLM", "AttentionInterface", "use a model class"],
    "not_pretrained": ["PreTrainedModel", "got Linear", "AutoModelForCausalLM"],
    "layout_mismatch": ["sharded with layout='contiguous'", "applied with layout='zigzag'"],
}


@pytest.mark.parametrize("world", (2, 3))
@pytest.mark.parametrize("kind", sorted(BAD_INPUT))
def test_bad_input_raises_on_every_rank(pools, kind, world):
    outcomes = pools(world).run_raw(hf_cases.bad_hf_call, kind, timeout=60)
    multiple = 2 * world  # zigzag
    words = [w.format(w=world, w1=world + 1, m=multiple) for w in BAD_INPUT[kind]]
    if kind == "unpadded":
        words.append(f"pad it to {-(-13 // multiple) * multiple}")
    for outcome in outcomes:
        assert not outcome.ok, f"rank {outcome.rank} accepted {kind}"
        assert outcome.error_type == "ValueError", outcome.traceback
        for word in words:
            assert word in outcome.message, f"{word!r} not in {outcome.message!r}"
