"""Gradient buckets of the sharded engine (:mod:`distseq.train.zero`): which parameters are
reduce-scattered together, and the reducer that posts the buckets in one fixed order.

A bucket is a run of parameters flattened into one fp32 vector of ``numel`` elements, padded
to ``world · shard``; rank ``r`` owns its elements ``[r·shard, (r+1)·shard)``, so each bucket
is one ``reduce_scatter_tensor`` (and one ``all_gather_into_tensor``) of equal pieces. A
rank's shard vector is its pieces of every bucket, in bucket order.

Ordering rule (what keeps the collectives matched): every rank posts buckets ``0, 1, ...``
in that order and at most once per micro-step. Bucket ``b`` is posted during the backward
only once it *and every earlier bucket* hold all their gradients; whatever is left (buckets
with a parameter the backward did not reach, or all of them on a rank idle in the micro-step)
is posted by :meth:`BucketReducer.flush` after the backward. Hook firing order therefore
decides only *when* a rank posts, never *which* collective comes next, so ranks whose
backward reaches parameters in another order, or not at all, stay matched. Posts are
asynchronous and the backward never waits for one: a helper thread waits for each in turn,
adds the rank's piece to its accumulated gradient shard and drops the bucket's buffer, so a
collective that other ranks join late holds memory but never blocks this rank's backward
(whose own group communication other ranks may be waiting for).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Bucket:
    """``params``: indices into the engine's parameter list, in flattening order; ``numel``:
    their elements; ``shard``: elements each rank owns (``ceil(numel / world)``); ``offset``:
    where this bucket's piece starts in a rank's shard vector."""

    params: tuple[int, ...]
    numel: int
    shard: int
    offset: int


def plan_buckets(sizes: Sequence[int], world: int, target: float) -> list[Bucket]:
    """Buckets of the parameters with ``sizes`` elements (registration order), taken in
    reverse order (the backward reaches the last-registered layers first) and grouped while a
    bucket stays within ``target`` elements; a parameter larger than ``target`` is a bucket
    of its own."""
    if target <= 0:
        raise ValueError(f"bucket target of {target} elements; use a positive size")
    groups: list[list[int]] = []
    filled = math.inf
    for index in reversed(range(len(sizes))):
        if filled + sizes[index] > target:
            groups.append([])
            filled = 0
        groups[-1].append(index)
        filled += sizes[index]
    buckets, offset = [], 0
    for group in groups:
        numel = sum(sizes[i] for i in group)
        shard = -(-numel // world)
        buckets.append(Bucket(tuple(group), numel, shard, offset))
        offset += shard
    return buckets


def flatten(bucket: Bucket, tensors: Sequence[torch.Tensor], world: int) -> torch.Tensor:
    """``tensors`` (one per parameter of the bucket, in ``bucket.params`` order) as one vector
    ``[world · shard]``, zero-padded, in their dtype."""
    parts = [tensor.flatten() for tensor in tensors]
    pad = bucket.shard * world - bucket.numel
    return torch.cat([*parts, parts[0].new_zeros(pad)])


class BucketReducer:
    """Reduce-scatters the gradients of ``params`` bucket by bucket into ``out`` (this rank's
    accumulated fp32 gradient shard, ``[sum of bucket shards]``), freeing each parameter's
    ``.grad`` once its bucket is posted. :meth:`watch` posts buckets during the backward (ZeRO
    stage 2); :meth:`flush` posts the rest and waits for all of them: every rank must call it
    once per reduction (every micro-step in stage 2, idle or not)."""

    def __init__(self, params: Sequence[nn.Parameter], buckets: Sequence[Bucket],
                 out: torch.Tensor, world: int) -> None:  # fmt: skip
        self.params, self.buckets, self.out, self.world = list(params), list(buckets), out, world
        self._bucket_of = {i: b for b, bucket in enumerate(buckets) for i in bucket.params}
        self._executor = ThreadPoolExecutor(1, "distseq-zero")  # waits off the backward
        self._reset()

    def _reset(self) -> None:
        self._next = 0  # the next bucket to post
        self._missing = [len(bucket.params) for bucket in self.buckets]
        self._seen = [False] * len(self.params)
        self._pending: list[Future[None]] = []

    def watch(self) -> None:
        """Post each bucket during the backward, as soon as it and every earlier bucket hold
        their gradients."""
        for index, param in enumerate(self.params):
            param.register_post_accumulate_grad_hook(functools.partial(self._ready, index))

    def _ready(self, index: int, param: nn.Parameter) -> None:
        bucket = self._bucket_of[index]
        if bucket < self._next:
            raise RuntimeError(
                f"parameter {index} ({tuple(param.shape)}) got a gradient after its bucket was "
                "reduce-scattered in this micro-step: a second backward per micro-step (or "
                "reentrant activation checkpointing) is not supported by adaptive.zero_stage=2; "
                "use one backward per micro-step, use_reentrant=False, or zero_stage=1"
            )
        if self._seen[index]:  # accumulated again before its bucket left: still one gradient
            return
        self._seen[index] = True
        self._missing[bucket] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._post()

    def _post(self) -> None:
        bucket = self.buckets[self._next]
        self._next += 1
        params = [self.params[i] for i in bucket.params]
        # zeros for a parameter this rank's backward did not reach (all of them when idle)
        grads = [
            torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.float()
            for p in params
        ]
        flat = flatten(bucket, grads, self.world)
        del grads
        for param in params:
            param.grad = None
        piece = flat.new_empty(bucket.shard)
        work = dist.reduce_scatter_tensor(piece, flat, async_op=True)
        self._pending.append(self._executor.submit(self._finish, work, piece, flat, bucket))

    def _finish(self, work: dist.Work, piece: torch.Tensor, flat: torch.Tensor,
                bucket: Bucket) -> None:  # fmt: skip
        work.wait()
        self.out[bucket.offset : bucket.offset + bucket.shard] += piece
        # ``flat`` (the bucket's whole gradient) is released when this returns

    def _wait(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._pending.pop(0).result()

    def flush(self) -> None:
        """Post every bucket not posted yet (zeros for gradients this rank does not have),
        keeping one in flight, then wait for all: after it ``out`` holds this reduction."""
        while self._next < len(self.buckets):
            self._post()
            self._wait(keep=1)
        self._wait(keep=0)
        self._reset()
