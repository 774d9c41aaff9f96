"""A Llama-style decoder (RMSNorm, RoPE, SwiGLU, GQA) with a token mixer chosen per layer."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), ctx)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """Token ids ``[B, S_local]`` (this rank's shard) -> logits ``[B, S_local, vocab]``."""

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

    def forward(self, tokens: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.layers:
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x = block(x, ctx)
        return self.lm_head(self.norm(x)).float()
