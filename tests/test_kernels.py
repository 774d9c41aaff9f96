"""Every local block backend against the dense float64 reference, and the fused LSE merge
(distseq._C) against its torch fallback."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import cases
from distseq.kernels import attention_torch, merge, select_backend, unavailable_reason
from distseq.reference import attention_reference
from tolerance import nan_max

ROOT = Path(__file__).resolve().parent.parent
FP32_TOL = 1e-4

# (Sq, Sk, segments): square, bottom-right causal with Sk > Sq and Sq > Sk, and varlen blocks
# with an empty segment and segments of different q/k lengths (as the ring's half blocks).
SHAPES = [
    (37, 37, None),
    (20, 45, None),
    (45, 20, None),
    (30, 42, ([0, 10, 10, 30], [0, 14, 20, 42])),
]


def _backend_or_skip(name: str, dtype: torch.dtype = torch.float32):
    reason = unavailable_reason(name, torch.device("cpu"), dtype)
    if name == "flash" or (name == "triton" and reason is not None):
        cuda = torch.device("cuda") if torch.cuda.is_available() else None
        reason = "needs CUDA" if cuda is None else unavailable_reason(name, cuda, dtype)
        if reason is not None:
            pytest.skip(f"{name}: {reason}")
        return select_backend(name, cuda, dtype), cuda
    if reason is not None:
        pytest.fail(f"{name} should run on CPU here: {reason}")
    return select_backend(name, torch.device("cpu"), dtype), torch.device("cpu")


def _block_errors(kernel, device, dtype, sq, sk, segments, causal, hq=4, hkv=2, dim=16):
    gen = torch.Generator().manual_seed(sq * 100 + sk)
    batch = 1 if segments else 2
    q = torch.randn(batch, sq, hq, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, sk, hkv, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, sk, hkv, dim, generator=gen, dtype=torch.float64)
    dout = torch.randn(batch, sq, hq, dim, generator=gen, dtype=torch.float64)
    q, k, v, dout = (t.to(dtype).double() for t in (q, k, v, dout))
    cu_q = cu_k = None
    if segments:
        cu_q, cu_k = (torch.tensor(s, dtype=torch.int32) for s in segments)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attention_reference(*leaves, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    ref.backward(dout)
    kw = dict(scale=dim**-0.5, causal=causal)
    if segments:
        kw.update(cu_seqlens_q=cu_q.to(device), cu_seqlens_k=cu_k.to(device))
    inputs = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    out, lse = kernel.forward(*inputs, **kw)
    grads = kernel.backward(dout.to(device=device, dtype=dtype), *inputs, out, lse, **kw)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), seen), "rows that see no key must be -inf"
    errors = {
        "out": cases.relative_error(out.cpu(), ref),
        "lse": cases.relative_error(lse.cpu()[seen], ref_lse[seen]),
    }
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        errors[name] = cases.relative_error(got.cpu(), leaf.grad)
    return errors


@pytest.mark.parametrize("causal", (True, False))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}{'-varlen' if s[2] else ''}")
@pytest.mark.parametrize("backend", ("torch", "triton", "flash"))
def test_block_backend_matches_reference(backend, shape, causal):
    dtype = torch.bfloat16 if backend == "flash" else torch.float32
    kernel, device = _backend_or_skip(backend, dtype)
    errors = _block_errors(kernel, device, dtype, *shape, causal)
    tol = FP32_TOL if dtype == torch.float32 else 2e-2
    assert nan_max(errors.values()) <= tol, errors


def test_triton_backend_bf16_and_odd_head_dim():
    kernel, device = _backend_or_skip("triton")
    errors = _block_errors(kernel, device, torch.bfloat16, 33, 33, None, True, dim=24)
    assert nan_max(errors.values()) <= 2e-2, errors


def test_auto_backend_on_cpu_is_torch():
    assert select_backend("auto", torch.device("cpu"), torch.float32) is attention_torch


@pytest.mark.parametrize("world", (2, 3))
def test_ring_and_allgather_with_triton_backend(pools, world):
    """The strategies run unchanged on the Triton kernels (interpreted on CPU)."""
    if unavailable_reason("triton", torch.device("cpu"), torch.float32) is not None:
        pytest.skip("triton cannot run here")
    for strategy, layout in (("ring", "zigzag"), ("allgather", "contiguous")):
        case = dict(
            strategy=strategy, layout=layout, causal=True, hq=4, hkv=2, dim=16,
            seq=world * 2 * 6, batch=1, seed=5, backend="triton", docs=[world * 4, world * 8],
        )  # fmt: skip
        errors = pools(world).run(cases.attention_vs_reference, case)
        worst = nan_max(nan_max(e.values()) for e in errors)
        assert worst <= FP32_TOL, errors


def _compiled_merge():
    if merge._C is None:
        if os.environ.get("CI"):
            pytest.fail("distseq._C was not built (setup.py should compile csrc/ in CI)")
        pytest.skip("distseq._C is not built (pip install --no-build-isolation -e .)")
    return merge._C


@pytest.mark.parametrize("block_dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_fused_merge_matches_torch_fallback(block_dtype):
    compiled = _compiled_merge()
    gen = torch.Generator().manual_seed(0)
    b, s, h, d = 2, 50, 3, 24
    base = torch.randn(b, 2 * s, h, d, generator=gen)
    lse = torch.randn(b, h, 2 * s, generator=gen) * 4
    block_out = torch.randn(b, s, h, d, generator=gen).to(block_dtype)
    block_lse = torch.randn(b, h, s, generator=gen) * 4
    # Rows that saw no key yet, on one side or both.
    lse[0, 0, s : s + 6] = float("-inf")
    block_lse[0, 0, 3:9] = float("-inf")
    results = []
    for fused in (True, False):
        out, acc = base.clone(), lse.clone()
        # Accumulators are strided views (the zigzag back half), as in the strategies.
        view_out, view_lse = out[:, s:], acc[:, :, s:]
        if fused:
            compiled.lse_merge_(view_out, view_lse, block_out, block_lse)
        else:
            merge.merge_into_torch(view_out, view_lse, block_out, block_lse)
        results.append((out, acc))
    (fused_out, fused_lse), (ref_out, ref_lse) = results
    torch.testing.assert_close(fused_out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_lse, ref_lse, rtol=1e-6, atol=1e-6)
    assert torch.equal(fused_out[:, :s], base[:, :s]), "rows outside the view must not change"
    assert torch.isneginf(fused_lse[0, 0, s + 3 : s + 6]).all()
    assert torch.all(fused_out[0, s + 3 : s + 6, 0] == 0)


def test_fused_merge_rejects_bad_shapes():
    compiled = _compiled_merge()
    out, lse = torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 4)
    with pytest.raises(RuntimeError, match="must be \\[B, H, S\\]"):
        compiled.lse_merge_(out, lse, out.clone(), torch.zeros(1, 4, 2))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_merge_kernel_compiles(tmp_path):
    """The CUDA source stays buildable even where no GPU can run it."""
    cmd = ["nvcc", "-c", "-std=c++17", f"-I{ROOT / 'csrc'}", "-DDISTSEQ_WITH_CUDA"]
    cmd += [str(ROOT / "csrc" / "lse_merge_cuda.cu"), "-o", str(tmp_path / "merge.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_triton_varlen_with_host_maxima_is_identical():
    """Maxima given by the caller (no device read) change nothing, exact or upper bounds."""
    kernel, device = _backend_or_skip("triton")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, 2, 16, generator=gen).to(device) for n in (30, 42, 42))
    cu_q, cu_k = (torch.tensor(s, dtype=torch.int32, device=device)
                  for s in ([0, 10, 10, 30], [0, 14, 20, 42]))  # fmt: skip
    kw = dict(scale=0.25, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    derived = kernel.forward(q, k, v, **kw)
    for maxima in ((20, 22), (30, 42)):
        given = kernel.forward(q, k, v, **kw, max_seqlen_q=maxima[0], max_seqlen_k=maxima[1])
        assert all(torch.equal(a, b) for a, b in zip(derived, given)), maxima
