"""CUDA-only checks (skipped without a GPU; run by ``make gpu-check``): the ``torch`` backend's
fused kernels (PyTorch's flash and cuDNN attention) against the float64 reference, forward
and backward, causal / varlen / GQA; its exact fallback; the sync-free layer path; the CUDA
LSE merge kernel of csrc/; every linear backend that runs on CUDA (fla where importable)."""

from __future__ import annotations

import pytest
import torch

from distseq.kernels import (
    LINEAR_BACKENDS,
    attention_cuda,
    attention_torch,
    merge,
    resolve_backend,
    select_linear_backend,
    unavailable_reason,
)
from distseq.models import SequenceContext
from distseq.reference import linear_attention_reference
from test_kernels import SHAPES, _block_errors
from tolerance import nan_max

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")
HALF_TOL = 2e-2


def _flash_or_skip() -> None:
    if not torch.backends.cuda.is_flash_attention_available():
        pytest.skip("this torch build has no CUDA flash attention")


@pytest.mark.parametrize("heads", ((4, 2), (4, 4)), ids=("gqa", "mha"))
@pytest.mark.parametrize("causal", (True, False))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}{'-varlen' if s[2] else ''}")
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_torch_backend_fused_flash_matches_reference(dtype, shape, causal, heads):
    _flash_or_skip()
    probe = torch.zeros(1, 1, heads[0], 16, device=CUDA, dtype=dtype)
    assert attention_cuda.fused_kind(probe, varlen=shape[2] is not None) == "flash"
    errors = _block_errors(attention_torch, CUDA, dtype, *shape, causal, *heads)
    assert nan_max(errors.values()) <= HALF_TOL, errors


class _CudnnKernel:
    """The cuDNN path as a block kernel (whole blocks only: square causal or non-causal)."""

    @staticmethod
    def forward(q, k, v, *, scale, causal):
        return attention_cuda.cudnn_forward(q, k, v, scale, causal)

    @staticmethod
    def backward(dout, q, k, v, out, lse, *, scale, causal):
        return attention_cuda.cudnn_backward(dout, q, k, v, out, lse, scale, causal)


@pytest.mark.parametrize("shape, causal", [((37, 37, None), True), ((37, 37, None), False),
                                           ((20, 45, None), False)])  # fmt: skip
def test_cudnn_block_matches_reference(shape, causal):
    if not torch.backends.cudnn.is_available():
        pytest.skip("cuDNN is not available")
    errors = _block_errors(_CudnnKernel, CUDA, torch.bfloat16, *shape, causal)
    assert nan_max(errors.values()) <= HALF_TOL, errors


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}{'-varlen' if s[2] else ''}")
def test_float32_on_cuda_falls_back_to_exact_matmul(shape):
    probe = torch.zeros(1, 1, 4, 16, device=CUDA)
    assert attention_cuda.fused_kind(probe, varlen=shape[2] is not None) is None
    errors = _block_errors(attention_torch, CUDA, torch.float32, *shape, True)
    assert nan_max(errors.values()) <= 1e-4, errors


def test_auto_picks_a_fused_backend_in_half_precision():
    picked = resolve_backend("auto", CUDA, torch.bfloat16)
    assert picked in ("flash", "torch"), picked  # flash-attn when installed, else torch's own


def test_agreed_attention_layer_makes_no_host_sync():
    """A model layer on an agreed batch (one rank): forward and backward with CUDA's sync
    debug mode set to error, so any .item()/.tolist()/nonzero on a device tensor raises."""
    _flash_or_skip()
    ctx = SequenceContext.build((96, 32), layout="contiguous", attention_backend="torch")
    q, k, v = (torch.randn(1, 128, h, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
               for h in (8, 2, 2))  # fmt: skip
    ctx.attention(q, k, v)  # the first call per shape checks and caches its plan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ctx.attention(q, k, v)
        out.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_cuda_merge_kernel_matches_torch_fallback():
    if merge._C is None or not merge._C.with_cuda:
        pytest.skip("distseq._C was built without its CUDA kernel")
    gen = torch.Generator(device=CUDA).manual_seed(0)
    b, s, h, d = 2, 50, 3, 24
    out = torch.randn(b, s, h, d, device=CUDA, generator=gen)
    lse = torch.randn(b, h, s, device=CUDA, generator=gen) * 4
    block_out = torch.randn(b, s, h, d, device=CUDA, generator=gen).bfloat16()
    block_lse = torch.randn(b, h, s, device=CUDA, generator=gen) * 4
    lse[0, 0, :6] = float("-inf")
    block_lse[0, 0, 3:9] = float("-inf")
    fused_out, fused_lse = out.clone(), lse.clone()
    merge._C.lse_merge_(fused_out, fused_lse, block_out, block_lse)
    merge.merge_into_torch(out, lse, block_out, block_lse)
    torch.testing.assert_close(fused_out, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_lse, lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("varlen", (False, True))
@pytest.mark.parametrize("backend", sorted(LINEAR_BACKENDS))
def test_linear_backend_on_cuda_matches_reference(backend, varlen):
    """bf16 forward and backward (with decay, initial state, final-state gradient) against
    the float64 recurrence, as tests/test_linear_triton.py does for Triton in depth."""
    reason = unavailable_reason(backend, CUDA, torch.bfloat16, LINEAR_BACKENDS)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    kernel = select_linear_backend(backend, CUDA, torch.bfloat16)
    gen = torch.Generator(device=CUDA).manual_seed(0)
    s, h, dk, dv = 150, 2, 32, 32
    cu = torch.tensor([0, 40, 40, 150], dtype=torch.int32, device=CUDA) if varlen else None
    batch, states = (1, 3) if varlen else (2, 2)
    q, k, v = (torch.randn(batch, s, h, d, device=CUDA, generator=gen) * (dk**-0.5 if i else 1)
               for i, d in enumerate((dk, dk, dv)))  # fmt: skip
    g = torch.nn.functional.logsigmoid(torch.randn(batch, s, h, device=CUDA, generator=gen) + 3)
    h0 = torch.randn(states, h, dk, dv, device=CUDA, generator=gen)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    kw = dict(scale=None, initial_state=h0, cu_seqlens=cu)
    out, final = kernel.forward(q, k, v, g, **kw)
    do, dfinal = torch.randn_like(out), torch.randn_like(final)
    grads = kernel.backward(do, dfinal, q, k, v, g, **kw)
    leaves = [t.double().requires_grad_() for t in (q, k, v, g, h0)]
    ref_out, ref_final = linear_attention_reference(
        *leaves[:3], log_decay=leaves[3], initial_state=leaves[4], cu_seqlens=cu
    )
    ((ref_out * do.double()).sum() + (ref_final * dfinal.double()).sum()).backward()
    got = [out, final, *grads]
    want = [ref_out, ref_final, *(leaf.grad for leaf in leaves)]
    errors = [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)]
    assert max(errors) <= 3e-2, errors
