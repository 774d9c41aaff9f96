"""Token mixers: sequence-parallel softmax attention, linear attention and Gated DeltaNet layers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distseq.models.config import GDN_CONV_SIZE, ModelConfig
from distseq.models.context import SequenceContext
from distseq.models.layers import rotary


class SoftmaxAttention(nn.Module):
    """Causal GQA attention with RoPE over the sharded sequence (``distseq.attention``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim, self.theta = cfg.resolved_head_dim, cfg.rope_theta
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        """``x`` ``[B, S_local, d_model]`` -> ``[B, S_local, d_model]``."""
        q = self.wq(x).unflatten(-1, (self.n_heads, self.head_dim))
        k = self.wk(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = self.wv(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        positions = ctx.positions_on(x.device)
        q, k = rotary(q, positions, self.theta), rotary(k, positions, self.theta)
        out = ctx.attention(q, k, v)
        return self.wo(out.flatten(-2))


class LinearAttention(nn.Module):
    """Causal linear attention over the sharded sequence (``distseq.linear_attention``).

    SiLU feature maps keep ``q``/``k`` non-negative so the un-normalised state stays
    well-conditioned; a per-head RMSNorm on the output replaces softmax normalisation (as in
    RetNet / GLA). ``linear_decay``: ``"none"``; ``"constant"`` (RetNet's fixed per-head
    decays ``1 - 2^(-5-h)``); ``"data"`` (GLA-style scalar gate per head and token,
    ``logsigmoid(w_gate x) / 16``). No RoPE: the recurrence is already position-aware.
    """

    GATE_TEMPERATURE = 16.0

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.resolved_head_dim
        width = self.n_heads * self.head_dim
        self.wq = nn.Linear(cfg.d_model, width, bias=False)
        self.wk = nn.Linear(cfg.d_model, width, bias=False)
        self.wv = nn.Linear(cfg.d_model, width, bias=False)
        self.wo = nn.Linear(width, cfg.d_model, bias=False)
        self.out_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
        self.decay = cfg.linear_decay
        if self.decay == "data":
            self.w_gate = nn.Linear(cfg.d_model, self.n_heads, bias=True)
        elif self.decay == "constant":
            rates = 1.0 - 2.0 ** (-5.0 - torch.arange(self.n_heads, dtype=torch.float64))
            self.register_buffer("log_rates", rates.log().float(), persistent=False)

    def _log_decay(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.decay == "data":
            return F.logsigmoid(self.w_gate(x).float()) / self.GATE_TEMPERATURE
        if self.decay == "constant":
            return self.log_rates.to(x.device).expand(*x.shape[:2], self.n_heads)
        return None

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        """``x`` ``[B, S_local, d_model]`` -> ``[B, S_local, d_model]``."""
        q = F.silu(self.wq(x)).unflatten(-1, (self.n_heads, self.head_dim))
        k = F.silu(self.wk(x)).unflatten(-1, (self.n_heads, self.head_dim))
        v = self.wv(x).unflatten(-1, (self.n_heads, self.head_dim))
        out = ctx.linear_attention(
            q, k, v, log_decay=self._log_decay(x), scale=1.0 / math.sqrt(self.head_dim)
        )
        return self.wo(self.out_norm(out).flatten(-2))


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet (Yang et al. 2024; Qwen3-Next's linear layer) over the sharded sequence.

    q/k/v projections through a short causal convolution with SiLU
    (:func:`distseq.causal_conv1d`, its halo crossing ranks), L2-normalised ``q``/``k``,
    ``β = sigmoid(w_β x)``, the data-dependent decay ``g = -exp(A_log)·softplus(w_a x +
    dt_bias)`` (Mamba-2's), :func:`distseq.delta_rule` with ``parallel.linear_strategy``,
    then a per-head RMSNorm gated by ``silu(w_gate x)`` and the output projection.
    ``parallel.linear_backend`` picks the kernel (``auto``, ``torch`` or ``fla``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.resolved_head_dim
        width = self.n_heads * self.head_dim
        self.wq = nn.Linear(cfg.d_model, width, bias=False)
        self.wk = nn.Linear(cfg.d_model, width, bias=False)
        self.wv = nn.Linear(cfg.d_model, width, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(3 * width, GDN_CONV_SIZE))
        nn.init.uniform_(self.conv_weight, -(GDN_CONV_SIZE**-0.5), GDN_CONV_SIZE**-0.5)
        self.w_beta = nn.Linear(cfg.d_model, self.n_heads, bias=True)
        self.w_decay = nn.Linear(cfg.d_model, self.n_heads, bias=False)
        # Per-head decay rates A in [1, 16] and time steps dt in [1e-3, 1e-1] (log-uniform),
        # stored as log A and softplus⁻¹(dt), as Mamba-2 / Gated DeltaNet initialise them.
        self.A_log = nn.Parameter(torch.empty(self.n_heads).uniform_(1, 16).log())
        dt = torch.empty(self.n_heads).uniform_(math.log(1e-3), math.log(1e-1)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.w_gate = nn.Linear(cfg.d_model, width, bias=False)
        self.out_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
        self.wo = nn.Linear(width, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        """``x`` ``[B, S_local, d_model]`` -> ``[B, S_local, d_model]``."""
        qkv = torch.cat([self.wq(x), self.wk(x), self.wv(x)], dim=-1)
        qkv = ctx.causal_conv1d(qkv, self.conv_weight.to(qkv.dtype), activation="silu")
        q, k, v = (t.unflatten(-1, (self.n_heads, self.head_dim)) for t in qkv.chunk(3, dim=-1))
        q, k = (F.normalize(t.float(), dim=-1, eps=1e-6).to(t.dtype) for t in (q, k))
        beta = torch.sigmoid(self.w_beta(x))
        log_decay = -self.A_log.float().exp() * F.softplus(self.w_decay(x).float() + self.dt_bias)
        out = ctx.delta_rule(q, k, v, beta, log_decay=log_decay, scale=self.head_dim**-0.5)
        gate = F.silu(self.w_gate(x)).unflatten(-1, (self.n_heads, self.head_dim))
        return self.wo((self.out_norm(out) * gate).flatten(-2))


MIXER_CLASSES: dict[str, type[nn.Module]] = {
    "softmax": SoftmaxAttention,
    "linear": LinearAttention,
    "gdn": GatedDeltaNet,
}
