"""Per-rank bodies of the Hugging Face training tests (module-level so the gloo pool can
pickle them), and the local model directories they train from."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from adaptive_cases import fixed_plan
from distseq.models import SequenceContext
from distseq.train import Trainer, load_config, validate_config
from train_cases import ROOT, SMALL, fit_and_collect

HF_TINY = os.path.join(ROOT, "configs", "hf_tiny_llama.yaml")
# Characters of the test tokenizer (character level; unknown characters map to [UNK]).
ALPHABET = "abcdefghijklmnopqrstuvwxyz.,"


def build_config(overrides: list[str], world: int):
    return validate_config(load_config(HF_TINY, [*SMALL, *overrides]), world)


def hf_train(rank: int, world: int, overrides: list[str]) -> dict:
    """Train with ``overrides``: losses, history, the last step's full gradients and whether
    the layers were recomputed in the backward (activation checkpointing)."""
    trainer = Trainer(build_config(overrides, world))
    return fit_and_collect(trainer) | {"checkpointing": trainer.model.checkpoint_blocks}


def hf_adaptive(rank: int, world: int, overrides: list[str], steps=None) -> dict:
    """``planner=adaptive``; ``steps`` (micro-steps of ``(ranks, strategies)`` groups)
    replaces the solver by a fixed plan."""
    trainer = Trainer(build_config(["planner=adaptive", *overrides], world))
    if steps is not None:
        trainer.scheduler.solve = lambda lengths: fixed_plan(steps, world, lengths)
    return fit_and_collect(trainer)


def probe_tokens(length: int, vocab: int) -> torch.Tensor:
    """A fixed ``[1, length]`` token sequence (the same on every rank and in the test)."""
    return torch.randint(vocab, (1, length), generator=torch.Generator().manual_seed(7))


def trained_logits(rank: int, world: int, overrides: list[str], length: int) -> dict:
    """Train, then run the trained (still sharded / wrapped) model on :func:`probe_tokens` as
    one document; this rank's logits and the global positions they belong to."""
    trainer = Trainer(build_config(overrides, world))
    history = trainer.fit()
    cfg = trainer.cfg
    ctx = SequenceContext.build(
        [length], group=trainer.mesh.sp_group, layout=cfg.parallel.layout,
        attention_strategy=cfg.parallel.attention_strategy,
    )  # fmt: skip
    tokens = probe_tokens(length, trainer.model.hf.config.vocab_size)
    with torch.no_grad():
        logits = trainer.engine.module(ctx.shard_tokens(tokens), ctx)
    return {
        "losses": [r["loss"] for r in history],
        "positions": ctx.shard.positions.clone(),
        "logits": logits[0].detach().clone(),
        "dp_rank": trainer.mesh.dp_rank,
    }


def initial_weights_match(rank: int, world: int, overrides: list[str], directory: str) -> dict:
    """Build the trainer (``model.hf``) and compare its weights, before any step, with the
    directory's safetensors; then train. Returns the mismatching names, the tokenizer the
    config resolved to, and the losses."""
    from safetensors.torch import load_file

    trainer = Trainer(build_config(overrides, world))
    saved = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        saved |= load_file(path)
    state = {k.removeprefix("hf."): v for k, v in trainer.model.state_dict().items()}
    mismatched = sorted(k for k, v in saved.items() if not torch.equal(state[k], v))
    history = trainer.fit()
    return {
        "mismatched": mismatched,
        "compared": len(saved),
        "tokenizer": trainer.cfg.data.tokenizer,
        "losses": [r["loss"] for r in history],
    }


def make_tokenizer(directory: Path):
    """A character-level fast tokenizer (built offline with ``tokenizers``) saved in
    ``directory``; returns it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{ch: i + 1 for i, ch in enumerate(ALPHABET)}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    tokenizer.save_pretrained(directory)
    return tokenizer


def make_model_dir(directory: Path, **config) -> Path:
    """A local Hugging Face directory: a random tiny Llama (``config`` overrides) with
    safetensors weights and a character-level tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=64)  # fmt: skip
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**(shape | config)))
    model.save_pretrained(directory)
    make_tokenizer(directory)
    return directory


def shipped_losses(rank: int, world: int, overrides: list[str]) -> list[float]:
    """configs/hf_tiny_llama.yaml as shipped (plus ``overrides``)."""
    cfg = validate_config(load_config(HF_TINY, overrides), world)
    return [record["loss"] for record in Trainer(cfg).fit()]
