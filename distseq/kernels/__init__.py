"""Local kernels (softmax attention blocks, linear attention) and their backend selectors.

Every backend module (``attention_torch``, ``attention_flash``, ``attention_triton``) exposes
the same three functions, so strategies never care which one runs:

``is_available(device: torch.device, dtype: torch.dtype) -> str | None``
    ``None`` when the backend can run on ``device`` with ``dtype``, otherwise the reason why not.

``forward(q, k, v, *, scale, causal, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
max_seqlen_k=None) -> (out, lse)``
    ``q`` ``[B, Sq, Hq, D]``, ``k``/``v`` ``[B, Sk, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA: query
    head ``h`` reads K/V head ``h // (Hq // Hkv)``). Returns ``out`` ``[B, Sq, Hq, D]`` in
    ``q.dtype`` and ``lse`` ``[B, Hq, Sq]`` float32, the natural-log log-sum-exp of the scaled
    scores of each row. ``causal`` is *bottom-right aligned* (the flash-attn convention): query
    ``i`` sees key ``j`` iff ``j <= i + Sk - Sq``. A row that sees no key has ``out = 0`` and
    ``lse = -inf``. With ``cu_seqlens_q``/``cu_seqlens_k`` (int32 ``[n + 1]``, ``B == 1``) the
    block is ``n`` independent segments: rows of q-segment ``i`` attend only to k-segment ``i``,
    causal alignment applies per segment; segments may be empty. ``max_seqlen_q/k`` are the
    longest segments when the caller knows them on the host (``None``: the backend derives or
    bounds them; deriving reads the device, a host sync on a GPU).

``backward(dout, q, k, v, out, lse, *, scale, causal, cu_seqlens_q=None, cu_seqlens_k=None,
max_seqlen_q=None, max_seqlen_k=None) -> (dq, dk, dv)``
    Gradients of this block given the *final* ``out`` and ``lse`` of the rows (which may merge
    several blocks): ``P = exp(scale * q k^T - lse)``, ``dS = P * (dout v^T - rowsum(dout * out))``.
    ``dq`` ``[B, Sq, Hq, D]``, ``dk``/``dv`` ``[B, Sk, Hkv, D]`` (summed over each K/V head's query
    group), all in ``q.dtype``. ``out`` may be float32 while ``q`` is bf16.

Linear attention backends (``linear_torch``, ``linear_triton``, ``linear_fla``) expose
``is_available`` and:

``forward(q, k, v, log_decay, *, scale, initial_state=None, cu_seqlens=None, chunk_size=64)
-> (o, final_state)``
    ``q``/``k`` ``[B, S, H, Dk]``, ``v`` ``[B, S, H, Dv]``, ``log_decay`` ``[B, S, H]`` float32
    (``g_t <= 0``, natural log) or ``None``; ``initial_state`` ``[N, H, Dk, Dv]`` float32 or
    ``None`` (zeros), ``N = B``, or the segment count with ``cu_seqlens`` (int32 ``[N + 1]``,
    ``B == 1``; segments may be empty and need not be chunk-aligned). Computes
    ``S_t = exp(g_t) S_{t-1} + k_tᵀ v_t``, ``o_t = scale · q_t S_t``, the state restarting from
    ``initial_state[n]`` at every segment. Returns ``o`` ``[B, S, H, Dv]`` in ``q.dtype`` and
    ``final_state`` ``[N, H, Dk, Dv]`` float32.

``backward(do, dfinal_state, q, k, v, log_decay, *, scale, initial_state=None,
cu_seqlens=None, chunk_size=64) -> (dq, dk, dv, dlog_decay, dinitial_state)``
    ``dfinal_state`` may be ``None`` (zeros); ``dlog_decay`` is ``None`` iff ``log_decay`` is;
    ``dinitial_state`` ``[N, H, Dk, Dv]`` float32 is always returned.

Both (and every delta-rule function below) also take ``bounds=None``: ``cu_seqlens``' boundaries
as host ints, when the caller knows them, so that the kernel need not read ``cu_seqlens`` back
(a host sync on a GPU); given only with ``cu_seqlens``.
Delta-rule backends (``delta_torch``, ``delta_fla``) expose ``is_available`` and the same
``forward``/``backward`` with ``beta`` ``[B, S, H]`` after ``v`` (``backward`` returns
``(dq, dk, dv, dbeta, dlog_decay, dinitial_state)``), computing
``S_t = exp(g_t)(I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``, ``o_t = scale · q_t S_t``, plus
``prepare(q, k, v, beta, log_decay, *, scale, cu_seqlens=None, chunk_size=64)``: each
segment's affine map ``(A, M)`` and, via ``outputs()``, its zero-state output and effective
queries (:func:`distseq.kernels.delta_torch.prepare`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS: dict[str, str] = {
    "torch": "distseq.kernels.attention_torch",
    "flash": "distseq.kernels.attention_flash",
    "triton": "distseq.kernels.attention_triton",
}
LINEAR_BACKENDS: dict[str, str] = {
    "torch": "distseq.kernels.linear_torch",
    "fla": "distseq.kernels.linear_fla",
    "triton": "distseq.kernels.linear_triton",
}
DELTA_BACKENDS: dict[str, str] = {
    "torch": "distseq.kernels.delta_torch",
    "fla": "distseq.kernels.delta_fla",
}
# "auto" tries these in order; the first that can run on the device wins.
_AUTO_ORDER = {"cuda": ("flash", "triton", "torch"), "cpu": ("torch",)}
_LINEAR_AUTO_ORDER = {"cuda": ("fla", "triton", "torch"), "cpu": ("torch",)}
_DELTA_AUTO_ORDER = {"cuda": ("fla", "torch"), "cpu": ("torch",)}
# In half precision on CUDA the torch backend runs PyTorch's fused flash/cuDNN kernels
# (attention_cuda), which need no extra package and beat our generic Triton kernel.
_HALF_CUDA_AUTO_ORDER = ("flash", "torch", "triton")


def unavailable_reason(
    name: str, device: torch.device, dtype: torch.dtype, table: dict[str, str] = BACKENDS
) -> str | None:
    """Why backend ``name`` of ``table`` cannot run on ``device``/``dtype``, or ``None``."""
    try:
        module = importlib.import_module(table[name])
    except ImportError as exc:  # an optional dependency (or module) is missing
        return f"import failed ({exc})"
    return module.is_available(device, dtype)


def _resolve(
    what: str, table: dict[str, str], auto: tuple[str, ...], name: str,
    device: torch.device, dtype: torch.dtype,
) -> str:  # fmt: skip
    if name == "auto":
        for candidate in auto:
            if unavailable_reason(candidate, device, dtype, table) is None:
                return candidate
        raise ValueError(f"no {what} backend can run on device {device} with dtype {dtype}")
    if name not in table:
        raise ValueError(
            f"unknown backend {name!r}; choose one of {['auto', *table]} "
            '("auto" picks the fastest available)'
        )
    reason = unavailable_reason(name, device, dtype, table)
    if reason is not None:
        raise ValueError(
            f"backend {name!r} cannot run on device {device} with dtype {dtype}: {reason}; "
            'use backend="auto" or "torch"'
        )
    return name


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The attention backend ``name`` runs as on ``device``/``dtype`` (``"auto"`` resolved)."""
    device = torch.device(device)
    order = _AUTO_ORDER.get(device.type, ("torch",))
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        order = _HALF_CUDA_AUTO_ORDER
    return _resolve("attention", BACKENDS, order, name, device, dtype)


def resolve_linear_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The linear-attention backend ``name`` runs as (``"auto"`` resolved)."""
    device = torch.device(device)
    order = _LINEAR_AUTO_ORDER.get(device.type, ("torch",))
    return _resolve("linear attention", LINEAR_BACKENDS, order, name, device, dtype)


def resolve_delta_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The delta-rule backend ``name`` runs as (``"auto"`` resolved)."""
    device = torch.device(device)
    order = _DELTA_AUTO_ORDER.get(device.type, ("torch",))
    return _resolve("delta rule", DELTA_BACKENDS, order, name, device, dtype)


def describe_backends(
    attention: str, linear: str, device: torch.device, dtype: torch.dtype
) -> dict[str, str]:
    """What the configured backends run as, for logs: ``{"attention": "torch (cuda fused
    flash)", "linear": "triton"}``; ``"unavailable: ..."`` where one cannot run."""
    from distseq.kernels import attention_cuda

    described = {}
    for family, name, resolve in (
        ("attention", attention, resolve_backend),
        ("linear", linear, resolve_linear_backend),
    ):
        try:
            resolved = resolve(name, device, dtype)
        except ValueError as exc:
            described[family] = f"unavailable: {exc}"
            continue
        if family == "attention" and resolved == "torch":
            resolved += f" ({attention_cuda.describe_torch_path(torch.device(device), dtype)})"
        described[family] = resolved
    return described


def select_backend(name: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """Return the attention kernel module for ``name`` (or the best available for ``"auto"``)."""
    return importlib.import_module(BACKENDS[resolve_backend(name, device, dtype)])


def select_linear_backend(name: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """Return the linear-attention kernel module for ``name`` (``"auto"``: fastest available)."""
    return importlib.import_module(LINEAR_BACKENDS[resolve_linear_backend(name, device, dtype)])


def select_delta_backend(name: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """Return the delta-rule kernel module for ``name`` (``"auto"``: fastest available)."""
    return importlib.import_module(DELTA_BACKENDS[resolve_delta_backend(name, device, dtype)])
