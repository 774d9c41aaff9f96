"""Communication: what the strategies send, how many bytes that is, and how long it takes.

- :mod:`~distseq.comm.transport`: process groups, ring / point-to-point exchange, collectives,
  input agreement; every ``torch.distributed`` call a strategy makes goes through it.
- :mod:`~distseq.comm.counting`: :class:`CommCounter`, the bytes each rank sends and receives.
- :mod:`~distseq.comm.replay`: :class:`CommRecorder` / :class:`CommReplay`, a step re-run with
  its communication answered from a recording (the hidden-communication measurement).
- :mod:`~distseq.comm.hooks`: the data ops the last two wrap, and the control-plane flag.
- :mod:`~distseq.comm.launch`: :func:`run_ranks`, ``world`` local processes in one group.
"""

from distseq.comm.counting import CommCounter
from distseq.comm.hooks import DATA_OPS
from distseq.comm.launch import run_ranks
from distseq.comm.replay import CommRecorder, CommRecording, CommReplay, hidden_comm_fraction
from distseq.comm.transport import (
    GroupInfo,
    ProcessGroup,
    RingExchange,
    agree,
    all_gather_async,
    all_reduce_sum,
    all_to_all,
    broadcast,
    post_p2p,
    reduce_scatter,
    resolve_group,
)

__all__ = [
    "DATA_OPS",
    "CommCounter",
    "CommRecorder",
    "CommRecording",
    "CommReplay",
    "GroupInfo",
    "ProcessGroup",
    "RingExchange",
    "agree",
    "all_gather_async",
    "all_reduce_sum",
    "all_to_all",
    "broadcast",
    "hidden_comm_fraction",
    "post_p2p",
    "reduce_scatter",
    "resolve_group",
    "run_ranks",
]
