"""Every rank runs the same plan: one rank solves, the others receive its JSON."""

from __future__ import annotations

import json
from collections.abc import Callable

from distseq.planner.plan import Plan


def broadcast_plan(solve: Callable[[], Plan], *, src: int = 0, group=None) -> Plan:
    """Call ``solve()`` on global rank ``src`` only and return its plan on every rank of
    ``group`` (``None``: WORLD). The MILP's time limit can make two solves of one batch differ,
    so ranks must not each solve for themselves. An exception raised by ``solve`` is sent to
    every rank instead of leaving them waiting: a ``ValueError`` (e.g. a sequence that fits
    nowhere) is re-raised as such, anything else as ``RuntimeError``; ``src`` re-raises the
    original."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return solve()
    payload: list[str | None] = [None]
    failure: Exception | None = None
    if dist.get_rank() == src:
        try:
            payload[0] = json.dumps({"plan": solve().to_dict()})
        except Exception as exc:  # noqa: BLE001 - every rank must hear of any failure
            failure = exc
            payload[0] = json.dumps({"error": str(exc), "type": type(exc).__name__})
    dist.broadcast_object_list(payload, src=src, group=group)
    if failure is not None:
        raise failure
    message = json.loads(payload[0])
    if message.get("type") == "ValueError":
        raise ValueError(message["error"])
    if "error" in message:
        raise RuntimeError(f"planning failed on rank {src}: {message['type']}: {message['error']}")
    return Plan.from_dict(message["plan"])
