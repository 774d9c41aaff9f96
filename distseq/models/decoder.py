"""A Llama-style decoder (RMSNorm, RoPE, SwiGLU, GQA) with a token mixer chosen per layer."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from distseq.memory import (
    PLAIN,
    MemoryConfig,
    linear_cross_entropy,
    summed_cross_entropy,
    tiled_module_call,
)
from distseq.memory.offload import offload_context
from distseq.models.config import ModelConfig, check_model_config, layer_mixers
from distseq.models.context import SequenceContext
from distseq.models.layers import SwiGLU
from distseq.models.mixers import MIXER_CLASSES


class DecoderBlock(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig, mixer: str) -> None:
        super().__init__()
        self.mixer_name = mixer
        self.mixer_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = MIXER_CLASSES[mixer](cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        # Sequence tiles of the MLP (memory.mlp_tiles: an integer or "auto"; 1 = plain).
        self.mlp_tiles: int | str = 1

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), ctx)
        return x + tiled_module_call(self.mlp, self.mlp_norm(x), self.mlp_tiles)


class Decoder(nn.Module):
    """Token ids ``[B, S_local]`` (this rank's shard) -> logits ``[B, S_local, vocab]``, or
    with ``labels`` the summed loss of the labelled tokens (see :meth:`forward`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        check_model_config(cfg)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderBlock(cfg, m) for m in layer_mixers(cfg))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Recompute each block in backward (its collectives run again) to keep activation
        # memory at one block per layer boundary.
        self.checkpoint_blocks = False
        self.memory = PLAIN
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by
        ``1/sqrt(2 n_layers)`` (GPT-2) so the residual stream's variance does not grow with
        depth."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.layers:
            for proj in (block.mixer.wo, block.mlp.w_down):
                nn.init.normal_(proj.weight, std=std / math.sqrt(2 * self.cfg.n_layers))

    @property
    def memory(self) -> MemoryConfig:
        """The memory savers in use (:class:`distseq.memory.MemoryConfig`; all off by
        default)."""
        return self._memory

    @memory.setter
    def memory(self, options: MemoryConfig) -> None:
        self._memory = options
        for block in self.layers:
            block.mlp_tiles = options.mlp_tiles

    def forward(
        self, tokens: torch.Tensor, ctx: SequenceContext, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Float32 logits ``[B, S_local, vocab]``; with ``labels`` ``[B, S_local]`` (``-100``:
        no loss) the float32 sum of the labelled tokens' cross-entropy instead, through the
        fused chunked loss when ``memory.loss_chunk_tokens`` is set (no logits tensor)."""
        x = self.embed(tokens)
        for block in self.layers:
            if self.checkpoint_blocks and torch.is_grad_enabled():
                with offload_context(self.memory.offload_checkpoints):
                    x = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x = block(x, ctx)
        x = self.norm(x)
        chunk = self.memory.loss_chunk_tokens
        if labels is not None and chunk:
            return linear_cross_entropy(x, self.lm_head.weight, labels, chunk_tokens=chunk)
        logits = self.lm_head(x).float()
        if labels is None:
            return logits
        return summed_cross_entropy(logits, labels)
