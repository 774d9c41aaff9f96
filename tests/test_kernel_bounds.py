"""Host-side segment bounds for the chunked linear and delta-rule kernels: the same numbers as
``cu_seqlens`` alone, without reading ``cu_seqlens`` back, and index tables copied once."""

from __future__ import annotations

import pytest
import torch

from distseq.kernels import delta_torch, linear_torch
from distseq.kernels.common import host_bounds

BOUNDS = (0, 5, 5, 19, 30)  # an empty segment, segments not chunk-aligned


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts ``Tensor.tolist`` calls (a device-to-host sync on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.Tensor.tolist
        return func(*args, **(kwargs or {}))


def _inputs():
    gen = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, 30, 2, 8, generator=gen) for _ in range(4))
    k = torch.nn.functional.normalize(k, dim=-1)
    g, beta = -torch.rand(1, 30, 2, generator=gen), torch.rand(1, 30, 2, generator=gen)
    return q, k, v, do, g, beta


def _linear(bounds_kw):
    q, k, v, do, g, _ = _inputs()
    kw = {"scale": 0.3, "chunk_size": 4, **bounds_kw}
    out = linear_torch.forward(q, k, v, g, **kw)
    return [*out, *linear_torch.backward(do, None, q, k, v, g, **kw)]


def _delta(bounds_kw):
    q, k, v, do, g, beta = _inputs()
    kw = {"scale": 0.3, "chunk_size": 4, **bounds_kw}
    prepared = delta_torch.prepare(q, k, v, beta, g, **kw)
    out = delta_torch.forward(q, k, v, beta, g, **kw)
    grads = delta_torch.backward(do, None, q, k, v, beta, g, **kw)
    maps = delta_torch.maps(q, k, beta, g, **{k: v for k, v in kw.items() if k != "scale"})
    return [*out, prepared.memories, prepared.transitions, *prepared.outputs(), *grads, *maps]


@pytest.mark.parametrize("run", [_linear, _delta], ids=["linear_torch", "delta_torch"])
def test_bounds_give_identical_results_without_reading_cu_seqlens(run):
    cu = torch.tensor(BOUNDS, dtype=torch.int32)
    expected = run({"cu_seqlens": cu})
    with HostReads() as mode:
        got = run({"cu_seqlens": cu, "bounds": BOUNDS})
    assert mode.reads == 0
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_pack_plan_is_built_once_per_shape_and_device():
    linear_torch._pack_plan.cache_clear()
    _linear({"cu_seqlens": torch.tensor(BOUNDS, dtype=torch.int32), "bounds": BOUNDS})
    info = linear_torch._pack_plan.cache_info()
    assert info.misses == 1 and info.hits > 0, info


def test_host_bounds():
    cu = torch.tensor(BOUNDS, dtype=torch.int32)
    assert host_bounds(cu, None) == BOUNDS
    assert host_bounds(cu, list(BOUNDS)) == BOUNDS
    assert host_bounds(None, None) is None
    with pytest.raises(ValueError, match="do not match cu_seqlens of 5 entries"):
        host_bounds(cu, BOUNDS[:-1])
    with pytest.raises(ValueError, match="given without cu_seqlens"):
        host_bounds(None, BOUNDS)
