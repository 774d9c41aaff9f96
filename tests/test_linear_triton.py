"""The Triton linear-attention kernels against the float64 token-by-token recurrence.

On a machine with CUDA the kernels run natively on the GPU. Without one they run on CPU tensors
through Triton's interpreter, which must be switched on before the kernels are defined, hence
the environment variable set ahead of their import.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from distseq.reference import linear_attention_reference
from test_kernel_bounds import HostReads

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # read by triton.jit when the kernels are defined
pytest.importorskip("triton")
linear_triton = importlib.import_module("distseq.kernels.linear_triton")

pytestmark = pytest.mark.skipif(
    linear_triton.is_available(DEVICE, torch.float32) is not None,
    reason=str(linear_triton.is_available(DEVICE, torch.float32)),
)
FP32_TOL = 1e-4


@pytest.fixture(autouse=True)
def _factories_on_device():
    with DEVICE:  # torch.randn, torch.tensor, ... in these tests allocate on DEVICE
        yield


def _log_decay(kind: str, batch: int, seq: int, heads: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "constant":
        return torch.full((batch, seq, heads), -0.3)
    # Data-dependent, from ~0 down to about -10: exercises both mild and strong decay.
    return F.logsigmoid(3 * torch.randn(batch, seq, heads))


def _inputs(batch, seq, heads, dk, dv, decay, n_states, with_init, dtype=torch.float32):
    q = torch.randn(batch, seq, heads, dk).to(dtype)
    k = torch.randn(batch, seq, heads, dk).to(dtype)
    v = torch.randn(batch, seq, heads, dv).to(dtype)
    g = _log_decay(decay, batch, seq, heads)
    h0 = torch.randn(n_states, heads, dk, dv) if with_init else None
    return q, k, v, g, h0


def _reference(q, k, v, g, h0, do, dht, *, scale, cu_seqlens):
    """Float64 outputs and gradients of ``(o * do).sum() + (h_T * dh_T).sum()``.

    A missing initial state is a zero one, so that its gradient exists too.
    """
    if h0 is None:
        h0 = torch.zeros(len(cu_seqlens) - 1 if cu_seqlens is not None else q.shape[0],
                         q.shape[2], q.shape[3], v.shape[3])  # fmt: skip
    leaves = [None if t is None else t.double().requires_grad_() for t in (q, k, v, g, h0)]
    out, final = linear_attention_reference(
        *leaves[:3], log_decay=leaves[3], scale=scale, initial_state=leaves[4],
        cu_seqlens=cu_seqlens,
    )  # fmt: skip
    loss = (out * do.double()).sum()
    if dht is not None:
        loss = loss + (final * dht.double()).sum()
    loss.backward()
    return out.detach(), final.detach(), [None if t is None else t.grad for t in leaves]


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item()
    return (got.double() - want).abs().max().item() / max(scale, 1e-30)


def _check(case, *, chunk_size=16, tol=FP32_TOL, scale=None, cu_seqlens=None, with_dfinal=True):
    q, k, v, g, h0 = case
    out, final = linear_triton.forward(
        q, k, v, g, scale=scale, initial_state=h0, cu_seqlens=cu_seqlens, chunk_size=chunk_size
    )
    assert out.dtype == q.dtype and out.shape == v.shape
    assert final.dtype == torch.float32
    do = torch.randn(v.shape).to(q.dtype)
    dht = torch.randn(final.shape) if with_dfinal else None
    grads = linear_triton.backward(
        do, dht, q, k, v, g, scale=scale, initial_state=h0, cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
    )  # fmt: skip
    ref_out, ref_final, ref_grads = _reference(
        q, k, v, g, h0, do, dht, scale=scale, cu_seqlens=cu_seqlens
    )
    errors = {"o": _rel_err(out, ref_out), "final_state": _rel_err(final, ref_final)}
    for name, got, want in zip(
        ("dq", "dk", "dv", "dlog_decay", "dinitial_state"), grads, ref_grads
    ):
        if want is None:
            assert got is None, f"{name} must be None without log_decay"
            continue
        assert got.shape == want.shape, name
        errors[name] = _rel_err(got, want)
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"relative max errors above {tol}: {bad}"
    return errors


@pytest.mark.parametrize("with_init", [False, True], ids=["zero_init", "init"])
@pytest.mark.parametrize("decay", ["none", "constant", "data"])
def test_batched_matches_reference(decay, with_init):
    torch.manual_seed(0)
    # 37 tokens: two full chunks of 16 and a partial one; Dk != Dv.
    _check(_inputs(2, 37, 1, 16, 32, decay, 2, with_init))


@pytest.mark.parametrize("decay", ["none", "data"])
def test_varlen_matches_reference(decay):
    torch.manual_seed(1)
    # Empty segments (first, middle, last), one chunk-aligned, others crossing chunk borders.
    cu = torch.tensor([0, 0, 5, 5, 21, 40, 40], dtype=torch.int32)
    _check(_inputs(1, 40, 1, 16, 32, decay, 6, True), cu_seqlens=cu)


def test_host_bounds_read_nothing_back_and_tables_are_cached():
    """Given ``cu_seqlens``' bounds on the host, the kernels give the same bits without
    reading ``cu_seqlens`` back, and build their chunk tables once per shape and device."""
    torch.manual_seed(2)
    q, k, v, g, h0 = _inputs(1, 40, 1, 16, 16, "data", 3, True)
    bounds = (0, 5, 21, 40)
    cu, do = torch.tensor(bounds, dtype=torch.int32), torch.randn(v.shape)

    def run(**extra):
        kw = {"scale": None, "initial_state": h0, "cu_seqlens": cu, "chunk_size": 16, **extra}
        out = linear_triton.forward(q, k, v, g, **kw)
        return [*out, *linear_triton.backward(do, None, q, k, v, g, **kw)]

    expected = run()
    linear_triton._chunk_tables.cache_clear()
    with HostReads() as mode:
        got = run(bounds=bounds)
    assert mode.reads == 0
    assert linear_triton._chunk_tables.cache_info().misses == 1
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_several_state_blocks_and_heads(monkeypatch):
    torch.manual_seed(6)
    # 16 x 16 state blocks and Dv tiles: Dk = 24, Dv = 40 give 2 x 3 partly masked blocks.
    monkeypatch.setattr(linear_triton, "_tile_sizes", lambda block_dk, dv: (16, 16, 1))
    cu = torch.tensor([0, 7, 30], dtype=torch.int32)
    _check(_inputs(1, 30, 2, 24, 40, "data", 2, True), cu_seqlens=cu)


def test_strided_inputs_explicit_scale_no_dfinal():
    torch.manual_seed(2)
    # q, k, v, g as views of one fused projection (token stride 2 * 20 + 24 + 1), as a model
    # would pass them. Dk = 20, Dv = 24: head dims padded to 32 inside the kernels.
    fused = torch.randn(1, 50, 1, 65)
    q, k, v, g = fused.split([20, 20, 24, 1], dim=-1)
    g = F.logsigmoid(g[..., 0])
    _check((q, k, v, g, torch.randn(1, 1, 20, 24)), scale=0.3, with_dfinal=False)


def test_single_chunk_longer_than_sequence():
    torch.manual_seed(3)
    _check(_inputs(2, 9, 1, 16, 16, "constant", 2, False), chunk_size=32)


def test_extreme_decay_stays_finite():
    torch.manual_seed(5)
    q, k, v, _, h0 = _inputs(1, 48, 1, 16, 16, "none", 1, True)
    # The chunk-local cumulative log decay reaches -3000: exp(G_t) alone would underflow and
    # exp(-G_s) overflow, so only exponents of differences <= 0 may be taken. Those differences
    # come from an fp32 cumsum (as the contract pins), with absolute error ~ 2^-24 * |G| ~ 2e-4
    # here, hence a tolerance of 1e-3 instead of 1e-4 (measured 2.4e-4).
    g = torch.full((1, 48, 1), -0.05)
    g[0, 5::7] = -1000.0
    _check((q, k, v, g, h0), tol=1e-3)


@pytest.mark.parametrize("varlen", [False, True], ids=["batched", "varlen"])
def test_empty_sequence_passes_states_through(varlen):
    cu = torch.tensor([0, 0], dtype=torch.int32) if varlen else None
    q, v, g = torch.randn(1, 0, 1, 16), torch.randn(1, 0, 1, 32), torch.zeros(1, 0, 1)
    h0, dht = torch.randn(1, 1, 16, 32), torch.randn(1, 1, 16, 32)
    out, final = linear_triton.forward(q, q, v, g, scale=None, initial_state=h0, cu_seqlens=cu)
    assert out.shape == v.shape and torch.equal(final, h0)
    grads = linear_triton.backward(
        out, dht, q, q, v, g, scale=None, initial_state=h0, cu_seqlens=cu
    )
    assert [t.shape for t in grads[:4]] == [q.shape, q.shape, v.shape, g.shape]
    assert torch.equal(grads[4], dht)


def test_bf16_matches_reference():
    torch.manual_seed(4)
    # bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3). Outputs are rounded to bf16,
    # the decayed scores / state / decayed q, k are rounded to bf16 once more before each dot
    # (accumulation stays fp32), and dlog_decay is a suffix sum of per-token q.dq - k.dk whose
    # errors add up over the segment. Seeds 0-3 measured at most 1.3e-2 (dlog_decay), 0.9e-2
    # for the rest; 3e-2 is ~15 roundoffs.
    cu = torch.tensor([0, 11, 40], dtype=torch.int32)
    errors = _check(
        _inputs(1, 40, 2, 16, 32, "data", 2, True, dtype=torch.bfloat16), cu_seqlens=cu, tol=3e-2
    )
    # ... yet far above fp32 error: catches the dots silently running on fp32 operands.
    assert max(errors.values()) > 10 * FP32_TOL


def test_is_available_reasons(monkeypatch):
    assert linear_triton.is_available(DEVICE, torch.float32) is None
    assert linear_triton.is_available(DEVICE, torch.bfloat16) is None
    assert "unsupported dtype" in linear_triton.is_available(DEVICE, torch.float64)
    assert "not supported" in linear_triton.is_available(torch.device("meta"), torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu_reason = linear_triton.is_available(torch.device("cpu"), torch.float32)
    assert "TRITON_INTERPRET=1" in cpu_reason


def _bad_call(**overrides):
    args = {
        "q": torch.randn(1, 8, 2, 16), "k": torch.randn(1, 8, 2, 16),
        "v": torch.randn(1, 8, 2, 32), "log_decay": None, "scale": None,
        "initial_state": None, "cu_seqlens": None, "chunk_size": 16,
    }  # fmt: skip
    args.update(overrides)
    # The parametrized tensors were made at collection time, on CPU.
    args = {name: a.to(DEVICE) if isinstance(a, torch.Tensor) else a for name, a in args.items()}
    q, k, v, g = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("log_decay")
    linear_triton.forward(q, k, v, g, **args)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"q": torch.randn(8, 2, 16)}, "4-D"),
        ({"k": torch.randn(1, 8, 2, 8)}, "q and k must match"),
        ({"v": torch.randn(1, 7, 2, 32)}, "v must agree"),
        ({"v": torch.randn(1, 8, 2, 32).double()}, "dtypes differ"),
        ({"q": torch.randn(1, 8, 2, 300), "k": torch.randn(1, 8, 2, 300)}, "at most 256"),
        ({"log_decay": torch.zeros(1, 8)}, "log_decay"),
        ({"initial_state": torch.zeros(1, 2, 32, 16)}, "initial_state has shape"),
        ({"chunk_size": 24}, "chunk_size"),
        ({"chunk_size": 8}, "chunk_size"),
        ({"scale": -1.0}, "scale"),
        ({"cu_seqlens": torch.tensor([0, 3, 7], dtype=torch.int32)}, "cu_seqlens ends at 7"),
        ({"cu_seqlens": torch.tensor([0, 5, 3, 8], dtype=torch.int32)}, "non-decreasing"),
        (
            {
                "q": torch.randn(2, 8, 2, 16),
                "k": torch.randn(2, 8, 2, 16),
                "v": torch.randn(2, 8, 2, 32),
                "cu_seqlens": torch.tensor([0, 8], dtype=torch.int32),
            },
            "batch size 1",
        ),
        (
            {
                "q": torch.randn(1, 8, 2, 16).double(),
                "k": torch.randn(1, 8, 2, 16).double(),
                "v": torch.randn(1, 8, 2, 32).double(),
            },
            "unsupported dtype",
        ),
    ],
)
def test_bad_inputs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        _bad_call(**overrides)


def test_backward_bad_gradients_raise():
    q, k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 32)
    with pytest.raises(ValueError, match="do"):
        linear_triton.backward(torch.randn(1, 8, 2, 16), None, q, k, v, None, scale=None)
    with pytest.raises(ValueError, match="dfinal_state"):
        linear_triton.backward(torch.randn_like(v), torch.zeros(2, 2, 16, 32), q, k, v, None,
                               scale=None)  # fmt: skip


# Compiles every kernel for sm_90 (Triton's bundled ptxas; no GPU needed) in a process without
# TRITON_INTERPRET, which catches what the interpreter lets through (dtype mismatches in dots,
# layouts, constexpr misuse) on machines without a GPU.
_COMPILE_FOR_GPU = textwrap.dedent(
    """
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from distseq.kernels import linear_triton as lt

    IN_DTYPE = {"Q", "K", "V", "DO", "O", "X", "Y", "S_ALL", "H_ALL", "DH_ALL", "DQ", "DK_OUT",
                "DV_OUT"}
    INT32 = {"CU", "CHUNK_OFFSETS", "CHUNK_ROW", "CHUNK_START"}

    def signature(kernel, constexprs, dtype):
        sig = {}
        for name in inspect.signature(kernel.fn).parameters:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in INT32:
                sig[name] = "*i32"
            elif name.isupper():
                sig[name] = "*" + (dtype if name in IN_DTYPE else "fp32")
            else:
                sig[name] = "fp32" if name == "scale" else "i32"
        return sig

    for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
        common = dict(HAS_DECAY=True, VARLEN=True, DK=24, DV=40, CHUNK=16, BLOCK_V=16,
                      PRECISION=precision, UPCAST=False)
        for kernel, extra in (
            (lt._recurrence_kernel, dict(REVERSE=False, HAS_INIT=True, BLOCK_K=16)),
            (lt._recurrence_kernel, dict(REVERSE=True, HAS_INIT=True, BLOCK_K=16)),
            (lt._output_kernel, dict(BLOCK_DK=32)),
            (lt._grads_kernel, dict(BLOCK_DK=32)),
        ):
            constexprs = {**common, **extra}
            source = ASTSource(kernel, signature(kernel, constexprs, dtype), constexprs)
            triton.compile(source, target=GPUTarget("cuda", 90, 32))
    """
)


@pytest.mark.slow
def test_kernels_compile_for_gpu():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_GPU], check=False, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
