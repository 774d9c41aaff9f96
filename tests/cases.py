"""Per-rank test bodies run inside the distributed pool (module-level, so they pickle)."""

from __future__ import annotations

import torch

import distseq
from distseq.reference import attention_reference


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 for empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().clamp_min(1e-12)
    return ((actual.double() - expected).abs().max() / scale).item()


def make_inputs(seed, batch, total, hq, hkv, dim):
    """Full-sequence q, k, v, dout in float64, identical on every rank (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, total, hq, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, total, hkv, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, total, hkv, dim, generator=gen, dtype=torch.float64)
    dout = torch.randn(batch, total, hq, dim, generator=gen, dtype=torch.float64)
    return q, k, v, dout


def attention_vs_reference(rank, world, case: dict) -> dict[str, float]:
    """Run ``distseq.attention`` on shards and return relative errors of out, dq, dk, dv."""
    docs = case.get("docs")
    total = sum(docs) if docs else case["seq"]
    cu = None
    if docs:
        cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v, dout = make_inputs(
        case.get("seed", 0), case.get("batch", 1), total, case["hq"], case["hkv"], case["dim"]
    )
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, _ = attention_reference(
        *leaves, causal=case["causal"], cu_seqlens_q=cu, cu_seqlens_k=cu
    )
    ref.backward(dout)
    layout = case["layout"]

    def shard(t):
        return distseq.shard_sequence(t, layout=layout, cu_seqlens=cu)

    dtype = case.get("dtype", torch.float32)
    local = [shard(t).to(dtype).requires_grad_() for t in (q, k, v)]
    out = distseq.attention(
        *local,
        strategy=case["strategy"],
        causal=case["causal"],
        layout=layout,
        cu_seqlens=cu,
        backend=case.get("backend", "auto"),
    )
    out.backward(shard(dout).to(dtype))
    return {
        "out": relative_error(out, shard(ref)),
        "dq": relative_error(local[0].grad, shard(leaves[0].grad)),
        "dk": relative_error(local[1].grad, shard(leaves[1].grad)),
        "dv": relative_error(local[2].grad, shard(leaves[2].grad)),
    }
