"""Write a trained :class:`~distseq.hf.model.HFCausalLM` as a Hugging Face directory that
``AutoModelForCausalLM.from_pretrained`` loads."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from distseq.hf.model import HFCausalLM

PREFIX = "hf."  # HFCausalLM keeps the transformers model as its submodule ``hf``


def save_hf(
    model: HFCausalLM,
    state: Mapping[str, torch.Tensor],
    directory: str | Path,
    *,
    tokenizer: str | Path | None = None,
) -> None:
    """Write ``state`` (``model``'s whole state dict, keys as ``model.state_dict()`` names
    them, e.g. gathered from shards) to ``directory``: ``config.json`` (naming the attention
    implementation the model had before distseq's, never distseq's registry name),
    safetensors weights, the generation config and, if ``tokenizer`` (a local directory) is
    given, its tokenizer. One process calls it."""
    stray = sorted(name for name in state if not name.startswith(PREFIX))
    if stray:
        raise ValueError(f"state has keys {stray[:3]} outside the wrapped model ({PREFIX}*)")
    weights = {name.removeprefix(PREFIX): tensor for name, tensor in state.items()}
    # save_pretrained writes the live config, whose implementation is distseq's registry name
    # (valid only in this process). transformers 5 leaves the name out of config.json; the
    # swap keeps it out (or the original in) whatever a version or model class serialises.
    config = model.hf.config
    current = config._attn_implementation
    config._attn_implementation = model.original_attn_implementation
    try:
        model.hf.save_pretrained(directory, state_dict=weights)
    finally:
        config._attn_implementation = current
    if tokenizer is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True).save_pretrained(
            directory
        )
