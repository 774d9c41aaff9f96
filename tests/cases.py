"""Per-rank test bodies run inside the distributed pool (module-level, so they pickle)."""

from __future__ import annotations

import os

import torch

import distseq
from distseq.kernels import select_backend
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
    """Run ``distseq.attention`` on shards; relative errors of out, dq, dk, dv vs float64.

    For low-precision dtypes the reference uses the inputs rounded to that dtype (the rounding
    of the inputs is not the strategy's error), and ``single_*`` entries give the error of the
    same backend run on the whole sequence in one process, for comparison.
    """
    docs = case.get("docs")
    total = sum(docs) if docs else case["seq"]
    cu = distseq.cu_seqlens(docs) if docs else None
    dtype = case.get("dtype", torch.float32)
    full = make_inputs(
        case.get("seed", 0), case.get("batch", 1), total, case["hq"], case["hkv"], case["dim"]
    )
    q, k, v, dout = (t.to(dtype).double() for t in full)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, _ = attention_reference(*leaves, causal=case["causal"], cu_seqlens_q=cu, cu_seqlens_k=cu)
    ref.backward(dout)
    expected = {"out": ref, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    layout = case["layout"]

    def shard(t):
        return distseq.shard_sequence(t, layout=layout, cu_seqlens=cu)

    local = [shard(t).to(dtype).requires_grad_() for t in (q, k, v)]
    out = distseq.attention(
        *local,
        strategy=case["strategy"],
        causal=case["causal"],
        layout=layout,
        cu_seqlens=cu,
        backend=case.get("backend", "auto"),
        **_options(case),
    )
    out.backward(shard(dout).to(dtype))
    got = {"out": out, "dq": local[0].grad, "dk": local[1].grad, "dv": local[2].grad}
    errors = {name: relative_error(got[name], shard(expected[name])) for name in got}
    if dtype != torch.float32:
        errors.update(_single_process_errors(q, k, v, dout, dtype, case, cu, expected))
    return errors


def _options(case: dict) -> dict:
    """The strategy-specific keyword arguments a case sets (usp's ``ulysses_degree``)."""
    return {"ulysses_degree": case["ulysses_degree"]} if "ulysses_degree" in case else {}


def _single_process_errors(q, k, v, dout, dtype, case, cu, expected) -> dict[str, float]:
    kernel = select_backend(case.get("backend", "auto"), q.device, dtype)
    inputs = [t.to(dtype) for t in (q, k, v)]
    scale = q.shape[-1] ** -0.5
    kwargs = dict(scale=scale, causal=case["causal"], cu_seqlens_q=cu, cu_seqlens_k=cu)
    out, lse = kernel.forward(*inputs, **kwargs)
    grads = kernel.backward(dout.to(dtype), *inputs, out, lse, **kwargs)
    got = {"out": out, "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    return {f"single_{name}": relative_error(got[name], expected[name]) for name in got}


def _shards(world, seq_local=8, hq=4, hkv=2, dim=16, batch=1, dtype=torch.float32):
    return [torch.randn(batch, seq_local, h, dim, dtype=dtype) for h in (hq, hkv, hkv)]


def bad_attention_call(rank, world, kind: str):
    """Call ``distseq.attention`` with the input defect named by ``kind`` (on some ranks)."""
    import torch.distributed as dist

    q, k, v = _shards(world)
    kwargs: dict = {}
    if kind == "zigzag_odd_length":
        q, k, v = _shards(world, seq_local=7)
    elif kind == "varlen_not_divisible":
        total = 8 * world
        cu = torch.tensor([0, 1, total], dtype=torch.int32)
        kwargs = dict(layout="contiguous", cu_seqlens=cu)
    elif kind == "cu_seqlens_wrong_total":
        kwargs = dict(cu_seqlens=torch.tensor([0, 4 * world], dtype=torch.int32))
    elif kind == "gqa_heads":
        q, k, v = _shards(world, hq=3, hkv=2)
    elif kind == "ulysses_heads":
        q, k, v = _shards(world, hq=world + 1, hkv=world + 1)
        kwargs = dict(strategy="ulysses")
    elif kind == "usp_degree_not_dividing_world":
        kwargs = dict(strategy="usp", ulysses_degree=4)  # worlds 2 and 3
    elif kind == "usp_degree_not_dividing_heads":
        q, k, v = _shards(world, hq=world + 1, hkv=1)
        kwargs = dict(strategy="usp", ulysses_degree=world)
    elif kind == "usp_degree_zero":
        kwargs = dict(strategy="usp", ulysses_degree=0)
    elif kind == "ulysses_degree_without_usp":
        kwargs = dict(strategy="ring", ulysses_degree=1)
    elif kind == "unknown_strategy":
        kwargs = dict(strategy="ringg")
    elif kind == "unknown_backend":
        kwargs = dict(backend="cudnn")
    elif kind == "unknown_layout":
        kwargs = dict(layout="striped")
    elif kind == "flash_on_cpu":
        kwargs = dict(backend="flash")
    elif kind == "dtype_mismatch":
        k = k.double()
    elif kind == "device_mismatch":
        k = k.to("meta")
    elif kind == "one_rank_dtype":
        if rank == world - 1:
            v = v.half()
    elif kind == "one_rank_length":
        if rank == 0:
            q, k, v = _shards(world, seq_local=6)
    elif kind == "not_in_group":
        group = dist.new_group([0])
        if rank == 0:
            return "skipped"
        kwargs = dict(group=group)
    else:
        raise AssertionError(f"unknown case {kind}")
    distseq.attention(q, k, v, **kwargs)
    return "no error"


def shard_gather_round_trip(rank, world, cases_list):
    """shard_sequence then gather_sequence restores the tensor; backward reduce-scatters."""
    for total_or_docs, layout, dim in cases_list:
        docs = total_or_docs if isinstance(total_or_docs, list) else None
        total = sum(docs) if docs else total_or_docs
        cu = distseq.cu_seqlens(docs) if docs else None
        shape = [2, 3, 2]
        shape.insert(dim, total)
        full = torch.arange(torch.tensor(shape).prod().item(), dtype=torch.float64).view(shape)
        local = distseq.shard_sequence(full, dim=dim, layout=layout, cu_seqlens=cu)
        assert local.shape[dim] == total // world
        leaf = local.clone().requires_grad_()
        back = distseq.gather_sequence(leaf, dim=dim, layout=layout, cu_seqlens=cu)
        assert torch.equal(back, full), (total_or_docs, layout, dim)
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (back * weight).sum().backward()
        # Every rank's loss uses the gathered tensor, so the shard's gradient is P times its slice.
        expected = distseq.shard_sequence(weight, dim=dim, layout=layout, cu_seqlens=cu) * world
        assert torch.allclose(leaf.grad, expected), (total_or_docs, layout, dim)
    return len(cases_list)


def count_attention_bytes(rank, world, strategy, case: dict):
    """Bytes this rank sends in one forward+backward, per op kind and phase."""
    q, k, v = _shards(
        world, seq_local=case["seq_local"], hq=case["hq"], hkv=case["hkv"], dim=case["dim"],
        dtype=case.get("dtype", torch.float32),
    )  # fmt: skip
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    with distseq.CommCounter() as fwd:
        out = distseq.attention(
            q, k, v, strategy=strategy, causal=True, layout=case.get("layout", "zigzag"),
            **_options(case),
        )  # fmt: skip
    with distseq.CommCounter() as bwd:
        out.sum().backward()
    return {"forward": fwd.bytes_sent, "backward": bwd.bytes_sent,
            "forward_received": fwd.bytes_received, "control": fwd.control_bytes}  # fmt: skip


def attention_in_subgroups(rank, world, case: dict) -> dict[str, float]:
    """Split the world into groups of ``case['group_size']``; each runs its own problem."""
    import torch.distributed as dist

    size = case["group_size"]
    groups = [dist.new_group(list(range(s, s + size))) for s in range(0, world, size)]
    mine = groups[rank // size]
    q, k, v, dout = make_inputs(rank // size, 1, case["seq"], case["hq"], case["hkv"], case["dim"])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, _ = attention_reference(*leaves, causal=True)
    ref.backward(dout)

    def shard(t):
        return distseq.shard_sequence(t, group=mine, layout="zigzag")

    local = [shard(t).float().requires_grad_() for t in (q, k, v)]
    out = distseq.attention(*local, strategy=case["strategy"], group=mine, **_options(case))
    out.backward(shard(dout).float())
    full = distseq.gather_sequence(out.detach(), group=mine)
    return {
        "out": relative_error(full, ref),
        "dq": relative_error(local[0].grad, shard(leaves[0].grad)),
        "dk": relative_error(local[1].grad, shard(leaves[1].grad)),
        "dv": relative_error(local[2].grad, shard(leaves[2].grad)),
    }


def communication_and_compute_order(rank, world, strategy: str) -> list[str]:
    """The sequence of 'post'/'wait'/'compute' events of one forward and backward."""
    import torch.distributed as dist

    from distseq.kernels import attention_torch

    events: list[str] = []
    originals = {
        "batch_isend_irecv": dist.batch_isend_irecv,
        "all_gather_single": dist.all_gather_single,
    }

    def posting(name):
        def wrapper(*args, **kwargs):
            work = originals[name](*args, **kwargs)
            events.append("post")
            return work

        return wrapper

    def computing(fn, label):
        def wrapper(*args, **kwargs):
            events.append(label)
            return fn(*args, **kwargs)

        return wrapper

    fwd, bwd = attention_torch.forward, attention_torch.backward
    try:
        dist.batch_isend_irecv = posting("batch_isend_irecv")
        dist.all_gather_single = posting("all_gather_single")
        attention_torch.forward = computing(fwd, "forward")
        attention_torch.backward = computing(bwd, "backward")
        q, k, v = (t.requires_grad_() for t in _shards(world))
        os.environ["DISTSEQ_CHECK_RANKS"] = "0"  # keep the agreement's all-gather out of the log
        out = distseq.attention(q, k, v, strategy=strategy, backend="torch")
        out.sum().backward()
    finally:
        dist.batch_isend_irecv = originals["batch_isend_irecv"]
        dist.all_gather_single = originals["all_gather_single"]
        attention_torch.forward, attention_torch.backward = fwd, bwd
        os.environ.pop("DISTSEQ_CHECK_RANKS", None)
    return events
