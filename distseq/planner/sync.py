"""Every rank runs the same plan: one rank solves, the others receive its JSON."""

from __future__ import annotations

import json
from collections.abc import Callable

from distseq.planner.plan import Plan


def broadcast_plan(solve: Callable[[], Plan], *, src: int = 0, group=None) -> Plan:
    """Call ``solve()`` on global rank ``src`` only and return its plan on every rank of
    ``group`` (``None``: WORLD). The MILP's time limit can make two solves of one batch differ,
    so ranks must not each solve for themselves. A ``ValueError`` raised by ``solve`` (e.g. a
    sequence that fits nowhere) is re-raised on every rank instead of leaving them waiting."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return solve()
    payload: list[str | None] = [None]
    if dist.get_rank() == src:
        try:
            payload[0] = json.dumps({"plan": solve().to_dict()})
        except ValueError as exc:
            payload[0] = json.dumps({"error": str(exc)})
    dist.broadcast_object_list(payload, src=src, group=group)
    message = json.loads(payload[0])
    if "error" in message:
        raise ValueError(message["error"])
    return Plan.from_dict(message["plan"])
