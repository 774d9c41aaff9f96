"""The point-to-point state scan shared by ``ring`` (LASP-1) and ``allscan`` (ZeCO All-Scan).

The piece order of a document is a chain of ranks (``0 → 1 → … → P-1``; zigzag continues
``P-1 → … → 0``). Each rank waits for the state entering its piece from the previous rank,
combines ``X_out = T X_in + Y`` and sends ``X_out`` on. The state is cut into ``blocks``
column slices along ``Dv``; since the transition ``T`` (a per-head factor, or the delta rule's
``Dk × Dk`` matrix) acts on the left, each slice combines on its own, so with ``blocks > 1``
a rank forwards slice ``j`` while slice ``j + 1`` is still arriving (the All-Scan pipeline),
and with ``blocks == 1`` the chain is fully sequential (LASP-1).
When the scan is created (before the local kernel runs) the chain's head sends its state at
once, and the receives are posted in one of two orders (:func:`receives_ahead`):

- gloo (and any backend whose operations progress independently): every receive at once, so
  the slices land while the host runs the local kernel.
- NCCL: all point-to-point operations of a group run in posting order on one stream, so a
  middle rank that posted the receives of slices ``1..K-1`` before the send of slice ``0``
  would hold that send until the whole state had arrived (and, in zigzag, a receive of the
  return pass posted before the forward pass's send to the same peer would never complete).
  Each receive is posted in chain order instead: a piece's first slice when the scan reaches
  the piece, and slice ``j + 1``'s receive in one batch with slice ``j``'s send, so slice
  ``j`` leaves while slice ``j + 1`` arrives (one NCCL group runs its operations together).

Both orders post the same messages (same bytes, tags and peers).

Bytes per rank: each piece boundary between two ranks moves one state ``docs·H·Dk·Dv·4`` once,
whatever ``blocks`` is (:func:`chain_traffic`). The end state, when needed, is broadcast from
the rank holding the last piece.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from distseq.comm import GroupInfo, broadcast, post_p2p
from distseq.pieces import Pieces
from distseq.strategies.transition import combine
from distseq.traffic import Traffic

_TAG_BASE = 1000  # apart from RingExchange's tags


def chain_traffic(p: int, docs: int, heads: int, dk: int, dv: int, layout: str) -> Traffic:
    """Contiguous: each pass ``docs·H·Dk·Dv·4`` (one float32 state; a middle rank, from
    ``P = 3``, sends in both passes). Zigzag: ``min(2, P-1)`` states each pass (the chain runs
    ``0 → P-1 → 0``: a middle rank hands on two pieces, ranks ``0`` and ``P-1`` one)."""
    if p == 1:
        return Traffic(0, 0)
    state = docs * heads * dk * dv * 4
    busiest = min(2, p - 1) * state
    if layout == "zigzag":
        return Traffic(busiest, busiest)
    return Traffic(state, state, busiest)


def receives_ahead(info: GroupInfo) -> bool:
    """Whether the scan posts all its receives up front (see the module docstring): not on
    NCCL, whose point-to-point operations run in posting order on one stream."""
    return info.group is None or dist.get_backend(info.group) != "nccl"


class ChainScan:
    """The point-to-point scan of :meth:`LinearStrategy.scan`, in ``blocks`` column slices."""

    def __init__(self, states, transitions, start, ctx: Pieces, reverse, need_end, blocks):
        self.ctx, self.start, self.need_end = ctx, start, need_end
        self.order = ctx.order(reverse)
        self.states = states.view(ctx.docs, ctx.slots, *states.shape[1:])
        self.transitions = transitions.view(ctx.docs, ctx.slots, *transitions.shape[1:])
        dv = states.shape[3]
        # torch.tensor_split's column slices, on the host; fewer columns than blocks: some empty
        sizes = [dv // blocks + (i < dv % blocks) for i in range(blocks)]
        edges = list(itertools.accumulate(sizes, initial=0))
        self.blocks = [(a, b) for a, b in itertools.pairwise(edges) if b > a]
        me = ctx.info.rank
        self.mine = [i for i, (rank, _) in enumerate(self.order) if rank == me]
        self.received: dict[tuple[int, int], tuple[torch.Tensor, list]] = {}
        self._incoming = torch.empty_like(self.states)
        self._next, self._previous, self._end, self._sends = 0, None, None, []
        self.ahead = receives_ahead(ctx.info)
        for i in self.mine if self.ahead else []:
            if self._remote_predecessor(i):
                for j in range(len(self.blocks)):
                    self._post([], [self._receive(i, j)])
        # The chain's head (and pieces after it on the same rank) need nothing: send now.
        self._advance(block=False)

    def _tag(self, piece: int, block: int) -> int:
        return _TAG_BASE + piece * len(self.blocks) + block

    def _remote_predecessor(self, piece: int) -> bool:
        return piece > 0 and self.order[piece - 1][0] != self.ctx.info.rank

    def _receive(self, piece: int, block: int) -> tuple[tuple[int, int], torch.Tensor, int, int]:
        """Slice ``block`` of the state entering ``piece``: its key, buffer, sender and tag."""
        lo, hi = self.blocks[block]
        shape = (self.ctx.docs, *self.states.shape[2:4], hi - lo)
        buf = self.states.new_empty(shape)
        return (piece, block), buf, self.order[piece - 1][0], self._tag(piece, block)

    def _post(self, sends, receives) -> None:
        """Post ``sends`` and ``receives`` (from :meth:`_receive`) as one batch."""
        works = post_p2p(sends, [r[1:] for r in receives], self.ctx.info)
        # gloo returns a handle per message (and a receive's may be waited on only once);
        # NCCL one for the whole (coalesced) batch.
        per_message = len(works) == len(sends) + len(receives)
        self._sends += works[: len(sends)] if per_message else works
        for index, (key, buf, *_) in enumerate(receives):
            self.received[key] = (buf, [works[len(sends) + index]] if per_message else works)

    def _advance(self, block: bool) -> None:
        """Scan the local pieces in order; without ``block``, stop at the first that waits."""
        me = self.ctx.info.rank
        while self._next < len(self.mine):
            i = self.mine[self._next]
            chained = not self.ahead and self._remote_predecessor(i)
            if chained and (i, 0) not in self.received:  # posted when the scan reaches it
                self._post([], [self._receive(i, 0)])
            if not block and self._remote_predecessor(i):
                return
            slot = self.order[i][1]
            successor = self.order[i + 1][0] if i + 1 < len(self.order) else None
            outs = []
            for j, (lo, hi) in enumerate(self.blocks):
                if (i, j) in self.received:
                    x, works = self.received[i, j]
                    for work in works:
                        work.wait()
                elif self._previous is not None:
                    x = self._previous[j]
                elif self.start is not None:
                    x = self.start[..., lo:hi]
                else:
                    x = self.states.new_zeros(self.states[:, slot, ..., lo:hi].shape)
                self._incoming[:, slot, ..., lo:hi] = x
                out = combine(self.transitions[:, slot], x, self.states[:, slot, ..., lo:hi])
                outs.append(out)
                sends = []
                if successor is not None and successor != me:
                    sends = [(out, successor, self._tag(i + 1, j))]
                recvs = [self._receive(i, j + 1)] if chained and j + 1 < len(self.blocks) else []
                if sends or recvs:
                    self._post(sends, recvs)
            self._previous = outs
            if successor is None:
                self._end = torch.cat(outs, dim=-1)
            self._next += 1

    def wait(self):
        self._advance(block=True)
        for work in self._sends:
            work.wait()
        end = self._end
        if self.need_end:
            end = broadcast(
                end if end is not None else self.states.new_zeros(self.states[:, 0].shape),
                self.order[-1][0], self.ctx.info,
            )  # fmt: skip
        return self._incoming.flatten(0, 1), end
