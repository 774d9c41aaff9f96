"""One description of a model: the planner's ``ModelSpec`` of every shipped config equals the
model that training builds from it (layer by layer, parameter for parameter), distseq's
decoder or the Hugging Face model of ``model.hf_config``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distseq.models import Decoder, count_parameters
from distseq.planner import load_model, model_from_dict
from distseq.train import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_every_shipped_config_is_covered():
    assert len(CONFIGS) >= 7 and any("hybrid" in p.name for p in CONFIGS)


def _check_hf_spec(spec, cfg) -> None:
    """A Hugging Face model (``model.hf`` / ``model.hf_config``): the transformers model."""
    from transformers import AutoModelForCausalLM

    from distseq.hf.model import load_hf_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_hf_config(cfg))
    layers = model.get_decoder().layers
    assert spec.layers == ("softmax",) * len(layers)
    assert spec.block_params == tuple(sum(p.numel() for p in b.parameters()) for b in layers)
    assert spec.params == sum(p.numel() for p in model.parameters())
    attention = layers[0].self_attn
    assert (spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim) == (
        attention.q_proj.out_features,
        attention.k_proj.out_features,
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_planner_spec_is_the_model(path):
    cfg = load_config(path).model
    spec = load_model(str(path))
    if cfg.hf_key is not None:
        _check_hf_spec(spec, cfg)
        return
    with torch.device("meta"):  # shapes only: the 7B config builds in milliseconds
        model = Decoder(cfg)
    assert spec.layers == tuple(block.mixer_name for block in model.layers)
    assert spec.block_params == tuple(
        sum(p.numel() for p in block.parameters()) for block in model.layers
    )
    # parameters() yields a tied embedding once, as the optimizer and ZeRO see it
    assert spec.params == sum(p.numel() for p in model.parameters()) == count_parameters(cfg)
    attention = next((b.mixer for b in model.layers if b.mixer_name == "softmax"), None)
    if attention is not None:
        assert (spec.n_heads, spec.n_kv_heads, spec.head_dim) == (
            attention.n_heads,
            attention.n_kv_heads,
            attention.head_dim,
        )


def test_hybrid_1b_counts_linear_layers_gates_and_all():
    """The 1B hybrid config: 1.327 B parameters (the planner said 1.213 B before it read the
    model's own description: linear layers at the K/V head count, no data gate)."""
    spec = load_model(str(next(p for p in CONFIGS if p.name == "hybrid_1b_128k_8gpu.yaml")))
    assert spec.params == 1_327_141_408


@pytest.mark.parametrize("tie", (False, True))
def test_tied_embeddings_are_counted_once(tie):
    section = {"vocab_size": 1000, "d_model": 64, "n_layers": 2, "n_heads": 4,
               "ffn_hidden": 128, "tie_embeddings": tie}  # fmt: skip
    spec = model_from_dict(section)
    untied = model_from_dict({**section, "tie_embeddings": False})
    assert untied.params - spec.params == (1000 * 64 if tie else 0)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"n_heads": "four"}, r"model\.n_heads='four' must be a positive integer"),
        ({"n_heads": 3}, r"model\.n_heads=3 must be a multiple of model\.n_kv_heads=2"),
        ({"mixers": ["linear", "bogus"]}, r"bogus"),
        ({"hybrid_ratio": 181, "mixers": "hybrid"}, r"hybrid_ratio=181"),
        ({"heads": 4}, r"unknown keys \['heads'\]"),
    ],
)
def test_planner_reads_the_section_as_training_does(section, message):
    base = {"vocab_size": 100, "d_model": 64, "n_layers": 2, "n_heads": 4, "ffn_hidden": 8}
    with pytest.raises(ValueError, match=message):
        model_from_dict({**base, **section})
