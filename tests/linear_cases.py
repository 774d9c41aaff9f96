"""Per-rank bodies of the linear-attention and causal-conv tests (module-level, so they pickle)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

import distseq
from cases import relative_error
from distseq.reference import delta_rule_reference, linear_attention_reference

# case["op"]: the reference, the distributed op, and its positional inputs.
OPS = {
    "linear": (linear_attention_reference, distseq.linear_attention, ("q", "k", "v")),
    "delta": (delta_rule_reference, distseq.delta_rule, ("q", "k", "v", "beta")),
}


def log_decay_for(kind: str, batch: int, total: int, heads: int, gen) -> torch.Tensor | None:
    """``none``, ``constant`` (RetNet: head ``h`` decays by ``1 - 2^(-2-h)``), or ``data``."""
    if kind == "none":
        return None
    if kind == "constant":
        per_head = torch.tensor([math.log(1 - 2.0 ** (-2 - h)) for h in range(heads)])
        return per_head.expand(batch, total, heads).clone().double()
    return -F.softplus(torch.randn(batch, total, heads, generator=gen, dtype=torch.float64))


def linear_inputs(case: dict):
    """Full-sequence float64 inputs (seeded, identical on every rank) and the cu_seqlens."""
    docs = case.get("docs")
    batch = 1 if docs else case.get("batch", 2)
    total = sum(docs) if docs else case["seq"]
    heads, dk, dv = case.get("heads", 2), case.get("dk", 8), case.get("dv", 4)
    gen = torch.Generator().manual_seed(case.get("seed", 0))
    q = torch.randn(batch, total, heads, dk, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, total, heads, dk, generator=gen, dtype=torch.float64) / 2
    v = torch.randn(batch, total, heads, dv, generator=gen, dtype=torch.float64)
    g = log_decay_for(case["decay"], batch, total, heads, gen)
    states = len(docs) if docs else batch
    h0 = torch.randn(states, heads, dk, dv, generator=gen, dtype=torch.float64)
    do = torch.randn(batch, total, heads, dv, generator=gen, dtype=torch.float64)
    dh = torch.randn(states, heads, dk, dv, generator=gen, dtype=torch.float64)
    cu = distseq.cu_seqlens(docs) if docs else None
    beta = None
    if case.get("op") == "delta":  # unit keys and beta in [0, 1] keep the recurrence bounded
        k = F.normalize(k, dim=-1)
        beta = torch.rand(batch, total, heads, generator=gen, dtype=torch.float64)
    return {"q": q, "k": k, "v": v, "beta": beta, "g": g, "h0": h0, "do": do, "dh": dh}, cu


def linear_vs_reference(rank, world, case_list: list[dict]) -> list[dict[str, float]]:
    """Relative errors of o, dq, dk, dv, dlog_decay, final state, d(initial state) vs float64.

    Loss ``(o·do).sum() + (h_T·dh_T).sum()``: every rank returns ``h_T``, and the final-state
    gradient is summed over ranks, so each rank adds ``(h_T·dh_T).sum() / P``. Only rank 0
    gets the initial state's gradient; ``dinit`` is its error there and ``|dinit|`` elsewhere.
    """
    return [_one_linear_case(rank, world, case) for case in case_list]


def _one_linear_case(rank, world, case):
    group, size = None, world
    if case.get("group_size"):  # split the world into groups, each with its own problem
        size = case["group_size"]
        groups = [dist.new_group(list(range(s, s + size))) for s in range(0, world, size)]
        case = dict(case, seed=case.get("seed", 0) + 100 * (rank // size))
        group, rank = groups[rank // size], rank % size
    full, cu = linear_inputs(case)
    reference, op, positional = OPS[case.get("op", "linear")]
    names = [n for n in ("q", "k", "v", "beta", "g", "h0") if full[n] is not None]
    ref_leaves = {n: full[n].clone().requires_grad_() for n in names}
    ref_o, ref_h = reference(
        *(ref_leaves[n] for n in positional), log_decay=ref_leaves.get("g"),
        initial_state=ref_leaves["h0"], cu_seqlens=cu,
    )  # fmt: skip
    ((ref_o * full["do"]).sum() + (ref_h * full["dh"]).sum()).backward()
    layout = case.get("layout", "contiguous")

    def shard(t):
        return distseq.shard_sequence(t, group=group, layout=layout, cu_seqlens=cu)

    local = {n: (full[n] if n == "h0" else shard(full[n])).float().requires_grad_() for n in names}
    o, h = op(
        *(local[n] for n in positional), strategy=case["strategy"], log_decay=local.get("g"),
        layout=layout, cu_seqlens=cu, initial_state=local["h0"], output_final_state=True,
        group=group, backend=case.get("backend", "auto"),
    )  # fmt: skip
    ((o * shard(full["do"]).float()).sum() + (h * full["dh"].float()).sum() / size).backward()
    errors = {"o": relative_error(o, shard(ref_o)), "final": relative_error(h, ref_h)}
    for n in ("q", "k", "v", "beta", "g"):
        if n in local:
            errors[f"d{n}"] = relative_error(local[n].grad, shard(ref_leaves[n].grad))
    dinit = local["h0"].grad
    if rank == 0:
        errors["dinit"] = relative_error(dinit, ref_leaves["h0"].grad)
    else:
        errors["dinit"] = dinit.abs().max().item()
    return errors


def count_linear_bytes(rank, world, strategy, case: dict) -> dict[str, int]:
    """Bytes this rank sends/receives in one linear-attention forward and backward."""
    gen = torch.Generator().manual_seed(rank)
    b, s, h, dk, dv = case["batch"], case["seq_local"], case["heads"], case["dk"], case["dv"]
    q, k = (torch.randn(b, s, h, dk, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(b, s, h, dv, generator=gen).requires_grad_()
    g = (-torch.rand(b, s, h, generator=gen)).requires_grad_()
    final = case.get("output_final_state", False)
    _, op, positional = OPS[case.get("op", "linear")]
    beta = torch.rand(b, s, h, generator=gen).requires_grad_()
    inputs = {"q": q, "k": k, "v": v, "beta": beta}
    with distseq.CommCounter() as fwd:
        out = op(
            *(inputs[n] for n in positional), log_decay=g, strategy=strategy,
            output_final_state=final, layout=case.get("layout", "contiguous"),
        )  # fmt: skip
    loss = out[0].sum() + out[1].sum() if final else out.sum()
    with distseq.CommCounter() as bwd:
        loss.backward()
    return {"forward_sent": fwd.bytes_sent, "forward_received": fwd.bytes_received,
            "backward_sent": bwd.bytes_sent, "backward_received": bwd.bytes_received}  # fmt: skip


def conv_reference(x, weight, bias, cu, activation):
    """Dense float64 depthwise causal conv, zero history at every document start."""
    spans = [(0, x.shape[1])] if cu is None else list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    width = weight.shape[1] - 1
    outs = []
    for start, end in spans:
        if start == end:
            continue
        piece = F.pad(x[:, start:end].transpose(1, 2), (width, 0))
        outs.append(F.conv1d(piece, weight.unsqueeze(1), bias, groups=x.shape[2]))
    y = torch.cat(outs, dim=2).transpose(1, 2)
    return F.silu(y) if activation else y


def conv_vs_reference(rank, world, case_list: list[dict]) -> list[dict[str, float]]:
    """Relative errors of y, dx (local), dweight and dbias (summed over ranks) vs float64."""
    return [_one_conv_case(world, case) for case in case_list]


def _one_conv_case(world, case):
    docs = case.get("docs")
    cu = distseq.cu_seqlens(docs) if docs else None
    batch = 1 if docs else 2
    total = sum(docs) if docs else case["seq"]
    gen = torch.Generator().manual_seed(case.get("seed", 0))
    channels, width = 3, case["kernel"]
    x = torch.randn(batch, total, channels, generator=gen, dtype=torch.float64)
    weight = torch.randn(channels, width, generator=gen, dtype=torch.float64)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    dy = torch.randn(batch, total, channels, generator=gen, dtype=torch.float64)
    act = case.get("activation")
    ref = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y_ref = conv_reference(*ref, cu, act)
    y_ref.backward(dy)
    layout = case.get("layout", "contiguous")

    def shard(t):
        return distseq.shard_sequence(t, layout=layout, cu_seqlens=cu)

    mine = [shard(x).float().requires_grad_(), weight.float().requires_grad_(),
            bias.float().requires_grad_()]  # fmt: skip
    y = distseq.causal_conv1d(*mine, layout=layout, cu_seqlens=cu, activation=act)
    y.backward(shard(dy).float())
    dweight, dbias = mine[1].grad.clone(), mine[2].grad.clone()
    if world > 1:
        dist.all_reduce(dweight)
        dist.all_reduce(dbias)
    return {
        "y": relative_error(y, shard(y_ref)),
        "dx": relative_error(mine[0].grad, shard(ref[0].grad)),
        "dweight": relative_error(dweight, ref[1].grad),
        "dbias": relative_error(dbias, ref[2].grad),
    }


def count_conv_bytes(rank, world, case: dict) -> dict[str, int]:
    x = torch.randn(case["batch"], case["seq_local"], case["channels"]).requires_grad_()
    weight = torch.randn(case["channels"], case["kernel"])
    with distseq.CommCounter() as fwd:
        y = distseq.causal_conv1d(x, weight, layout=case["layout"])
    with distseq.CommCounter() as bwd:
        y.sum().backward()
    return {"forward_sent": fwd.bytes_sent, "backward_sent": bwd.bytes_sent}


def _linear_shards(seq_local=8, batch=1, heads=2, dk=4, dv=4, dtype=torch.float32):
    q, k = (torch.randn(batch, seq_local, heads, dk, dtype=dtype) for _ in range(2))
    return q, k, torch.randn(batch, seq_local, heads, dv, dtype=dtype)


def bad_linear_call(rank, world, kind: str):
    """Call ``linear_attention`` / ``causal_conv1d`` with the defect named by ``kind``."""
    q, k, v = _linear_shards()
    kwargs: dict = {}
    if kind == "unknown_strategy":
        kwargs = {"strategy": "lasp3"}
    elif kind == "allscan_zigzag":
        kwargs = {"strategy": "allscan", "layout": "zigzag"}
    elif kind == "unknown_backend":
        kwargs = {"backend": "cuda_magic"}
    elif kind == "qk_shape":
        k = k[..., :3]
    elif kind == "v_heads":
        v = torch.randn(1, 8, 3, 4)
    elif kind == "dtype_mismatch":
        v = v.double()
    elif kind == "not_divisible":
        q, k, v = _linear_shards(seq_local=7)
        kwargs = {"layout": "zigzag"}
    elif kind == "log_decay_shape":
        kwargs = {"log_decay": torch.zeros(1, 8, 3)}
    elif kind == "log_decay_positive":
        kwargs = {"log_decay": torch.full((1, 8, 2), 0.5)}
    elif kind == "initial_state_shape":
        kwargs = {"initial_state": torch.zeros(2, 2, 4, 4)}
    elif kind == "one_rank_log_decay":
        kwargs = {"log_decay": torch.full((1, 8, 2), 0.5 if rank == world - 1 else -0.5)}
    elif kind == "conv_weight_shape":
        return distseq.causal_conv1d(torch.randn(1, 8, 3), torch.randn(4, 3))
    elif kind == "conv_short_piece":
        return distseq.causal_conv1d(torch.randn(1, 2, 3), torch.randn(3, 4))
    elif kind == "conv_activation":
        return distseq.causal_conv1d(torch.randn(1, 8, 3), torch.randn(3, 4), activation="relu")
    else:
        raise AssertionError(f"unknown case {kind}")
    distseq.linear_attention(q, k, v, **kwargs)
    return "no error"


def bad_delta_call(rank, world, kind: str):
    """Call ``delta_rule`` with the defect named by ``kind``."""
    q, k, v = _linear_shards()
    beta = torch.rand(1, 8, 2)
    kwargs: dict = {}
    if kind == "beta_range":
        beta = beta + 1.0
    elif kind == "beta_shape":
        beta = torch.rand(1, 8, 3)
    elif kind == "one_rank_beta":
        beta = beta - 1.0 if rank == world - 1 else beta
    elif kind == "allscan_zigzag":
        kwargs = {"strategy": "allscan", "layout": "zigzag"}
    elif kind == "qk_shape":
        k = k[..., :3]
    elif kind == "unknown_strategy":
        kwargs = {"strategy": "lasp3"}
    else:
        raise AssertionError(f"unknown case {kind}")
    distseq.delta_rule(q, k, v, beta, **kwargs)
    return "no error"


def linear_comm_compute_order(rank, world, strategy: str) -> list[str]:
    """'post' (a collective or P2P message issued), 'forward'/'backward' (the local kernel)
    events of one forward, '|', and one backward."""
    import os

    from distseq.kernels import linear_torch

    events: list[str] = []
    originals = {"batch_isend_irecv": dist.batch_isend_irecv,
                 "all_gather_single": dist.all_gather_single}  # fmt: skip
    kernels = {"forward": linear_torch.forward, "backward": linear_torch.backward}

    def posting(name):
        def wrapper(*args, **kwargs):
            events.append("post")
            return originals[name](*args, **kwargs)

        return wrapper

    def computing(name):
        def wrapper(*args, **kwargs):
            events.append(name)
            return kernels[name](*args, **kwargs)

        return wrapper

    try:
        for name in originals:
            setattr(dist, name, posting(name))
        for name in kernels:
            setattr(linear_torch, name, computing(name))
        os.environ["DISTSEQ_CHECK_RANKS"] = "0"  # keep the agreement's all-gather out of the log
        q, k, v = (t.requires_grad_() for t in _linear_shards())
        out = distseq.linear_attention(q, k, v, strategy=strategy, backend="torch")
        events.append("|")
        out.sum().backward()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        for name, fn in kernels.items():
            setattr(linear_torch, name, fn)
        os.environ.pop("DISTSEQ_CHECK_RANKS", None)
    return events


def delta_comm_compute_order(rank, world, strategy: str) -> list[str]:
    """Like :func:`linear_comm_compute_order` for ``delta_rule``: 'outputs' marks the forward's
    query-side matmuls (``Prepared.outputs``), 'backward' the local backward."""
    import os

    from distseq.kernels import delta_torch

    events: list[str] = []
    originals = {"batch_isend_irecv": dist.batch_isend_irecv,
                 "all_gather_single": dist.all_gather_single}  # fmt: skip
    outputs, backward = delta_torch.Prepared.outputs, delta_torch.backward

    def posting(name):
        def wrapper(*args, **kwargs):
            events.append("post")
            return originals[name](*args, **kwargs)

        return wrapper

    def logged(name, fn):
        def wrapper(*args, **kwargs):
            events.append(name)
            return fn(*args, **kwargs)

        return wrapper

    try:
        for name in originals:
            setattr(dist, name, posting(name))
        delta_torch.Prepared.outputs = logged("outputs", outputs)
        delta_torch.backward = logged("backward", backward)
        os.environ["DISTSEQ_CHECK_RANKS"] = "0"  # keep the agreement's all-gather out of the log
        q, k, v = (t.requires_grad_() for t in _linear_shards())
        beta = torch.rand(1, 8, 2).requires_grad_()
        out = distseq.delta_rule(q, F.normalize(k, dim=-1), v, beta, strategy=strategy,
                                 backend="torch")  # fmt: skip
        events.append("|")
        out.sum().backward()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        delta_torch.Prepared.outputs, delta_torch.backward = outputs, backward
        os.environ.pop("DISTSEQ_CHECK_RANKS", None)
    return events


def _chained(monkey: bool):
    """Force the scan's NCCL post order (``receives_ahead`` False) on gloo, or the default."""
    from distseq.strategies import state_chain

    original = state_chain.receives_ahead
    if monkey:
        state_chain.receives_ahead = lambda info: False
    return lambda: setattr(state_chain, "receives_ahead", original)


def scan_post_batches(rank, world, strategy: str, layout: str, chained: bool) -> dict:
    """Each ``batch_isend_irecv`` of one forward and one backward: ``(op, peer, tag)`` lists."""
    import os

    batches: dict[str, list] = {"forward": [], "backward": []}
    phase = ["forward"]
    original = dist.batch_isend_irecv

    def recording(ops):
        kinds = [("send" if op.op is dist.isend else "recv", op.peer, op.tag) for op in ops]
        batches[phase[0]].append(kinds)
        return original(ops)

    restore = _chained(chained)
    try:
        dist.batch_isend_irecv = recording
        os.environ["DISTSEQ_CHECK_RANKS"] = "0"
        q, k, v = (t.requires_grad_() for t in _linear_shards())
        out = distseq.linear_attention(q, k, v, strategy=strategy, layout=layout, backend="torch")
        phase[0] = "backward"
        out.sum().backward()
    finally:
        dist.batch_isend_irecv = original
        restore()
        os.environ.pop("DISTSEQ_CHECK_RANKS", None)
    return batches


def scan_orders_agree(rank, world, strategy: str, layout: str) -> bool:
    """The NCCL post order computes the same outputs and gradients, bit for bit."""
    results = []
    for chained in (False, True):
        restore = _chained(chained)
        try:
            torch.manual_seed(rank)
            q, k, v = (t.requires_grad_() for t in _linear_shards(seq_local=12))
            g = (-torch.rand(1, 12, 2)).requires_grad_()
            out = distseq.linear_attention(q, k, v, strategy=strategy, layout=layout,
                                           log_decay=g, backend="torch")  # fmt: skip
            out.square().sum().backward()
            results.append([out, q.grad, k.grad, v.grad, g.grad])
        finally:
            restore()
    return all(torch.equal(a, b) for a, b in zip(*results))
