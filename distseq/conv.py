"""``distseq.causal_conv1d``: short depthwise causal convolution over a sharded sequence.

Mamba-2 / gated-delta-net blocks run a width-``K`` causal convolution before their recurrence;
under sequence parallelism every piece needs the last ``K - 1`` tokens of the piece before it
in its document (zeros at a document start). One point-to-point halo exchange brings them
(for zigzag the second chunk's predecessor lives on rank ``r + 1``, or locally on rank
``P - 1``), and the backward sends the halo's gradient back to its owner. Bytes per rank:
``docs·(K-1)·C·elem`` per remote piece boundary each way (contiguous: at most one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distseq.agreed import AgreedBatch
from distseq.comm import ProcessGroup, post_p2p, resolve_group
from distseq.layout import LAYOUTS, shard_layout
from distseq.pieces import Pieces
from distseq.strategies.linear_local import Segments
from distseq.validation import (
    check_cu_seqlens,
    check_tensors,
    signature_code,
    validate_on_all_ranks,
)

ACTIVATIONS = (None, "silu", "swish")
_TAG_BASE = 2000
_SIGNATURE = [
    "batch", "local sequence length", "channels", "kernel size", "dtype", "layout",
    "cu_seqlens", "bias given", "activation",
]  # fmt: skip


# (rank, slot, boundary): a neighbouring piece, and the sequence index of the later piece of
# the pair, which tags the messages across that boundary in both directions.
_Neighbour = tuple[int, int, int]


def _neighbours(pieces: Pieces) -> tuple[dict[int, _Neighbour], dict[int, _Neighbour]]:
    """Per local slot: its predecessor and its successor."""
    order, me = pieces.order(), pieces.info.rank
    before, after = {}, {}
    for i, (rank, slot) in enumerate(order):
        if rank != me:
            continue
        if i > 0:
            before[slot] = (*order[i - 1], i)
        if i + 1 < len(order):
            after[slot] = (*order[i + 1], i + 1)
    return before, after


def _shift(blocks: torch.Tensor, pieces: Pieces, forward: bool) -> torch.Tensor:
    """Move every piece's block of ``blocks`` ``[docs, slots, K-1, C]`` to the next piece of
    its document (``forward``: tails become halos) or to the previous one (halo gradients
    return to the tails they came from); a piece with no neighbour on that side gets zeros."""
    before, after = _neighbours(pieces)
    source, target = (before, after) if forward else (after, before)
    me = pieces.info.rank
    out = torch.zeros_like(blocks)
    recvs, sends = [], []
    for slot, (rank, other_slot, boundary) in source.items():
        if rank == me:
            out[:, slot] = blocks[:, other_slot]
        else:
            buf = blocks.new_empty(blocks[:, slot].shape)
            recvs.append((slot, buf, rank, _TAG_BASE + boundary))
    for slot, (rank, _, boundary) in target.items():
        if rank != me:
            sends.append((blocks[:, slot].contiguous(), rank, _TAG_BASE + boundary))
    for work in post_p2p(sends, [r[1:] for r in recvs], pieces.info):
        work.wait()
    for slot, buf, *_ in recvs:
        out[:, slot] = buf
    return out


class _HaloExchange(torch.autograd.Function):
    """``tails`` ``[docs, slots, K-1, C]`` (each local piece's last tokens) -> each piece's halo
    (the tails of the piece before it); the backward sends the halos' gradients back."""

    @staticmethod
    def forward(fctx, tails: torch.Tensor, pieces: Pieces) -> torch.Tensor:
        fctx.pieces = pieces
        return _shift(tails, pieces, forward=True)

    @staticmethod
    def backward(fctx, dhalos: torch.Tensor):
        return _shift(dhalos, fctx.pieces, forward=False), None


def _tails(x: torch.Tensor, segments: Segments, width: int) -> list[torch.Tensor]:
    """The last ``width`` tokens ``[n, width, C]`` of each segment (zeros for empty ones)."""
    tails = []
    for piece in segments.split(x):
        if piece.shape[1] == 0:
            tails.append(piece.new_zeros(piece.shape[0], width, piece.shape[2]))
        else:
            tails.append(piece[:, piece.shape[1] - width :])
    return tails


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Valid depthwise convolution of ``x`` ``[n, K-1+L, C]`` -> ``[n, L, C]``."""
    width = weight.shape[1] - 1
    if x.shape[1] == width:  # an empty piece (conv1d rejects inputs shorter than the kernel)
        return x[:, :0]
    y = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, groups=x.shape[2])
    return y.transpose(1, 2)


def _check(x, weight, bias, activation, pieces: Pieces) -> None:
    """Shapes, dtypes and options, and pieces long enough to hold a halo (no communication)."""
    named = {"weight": weight} | ({} if bias is None else {"bias": bias})
    channels = x.shape[2]
    if weight.shape[0] != channels or weight.shape[1] < 1:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}; expected [channels={channels}, "
            "kernel_size >= 1] (depthwise)"
        )
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (channels,)):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias has shape {shape}; expected [channels={channels}] or None")
    for name, t in named.items():
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(
                f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; "
                "cast/move them to one dtype and device"
            )
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {list(ACTIVATIONS)}")
    width = weight.shape[1] - 1
    if pieces.info.world_size * pieces.slots > 1:
        for index, chunk in enumerate(pieces.shard.chunk_lengths):
            if 0 < chunk < width:
                raise ValueError(
                    f"causal_conv1d: document {index} is sharded into pieces of {chunk} tokens, "
                    f"fewer than kernel_size - 1 = {width}; use longer documents or fewer ranks"
                )


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    group: ProcessGroup | None = None,
    layout: str = "contiguous",
    cu_seqlens: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution of the local shard ``x`` ``[B, S_local, C]``.

    ``y_t = act(bias + Σ_i weight[:, i] · x_{t-K+1+i})`` with ``weight`` ``[C, K]`` and tokens
    before a document start taken as zero; ``layout`` and the *global* ``cu_seqlens`` as in
    :func:`distseq.attention`. Returns ``y`` ``[B, S_local, C]``, differentiable. The gradients
    of ``weight``/``bias`` are this rank's partial sums (a replicated parameter's gradient is
    summed over the ranks, as data parallelism does). ``activation``: ``None`` or ``"silu"``.
    """
    info = resolve_group(group)
    built: dict[str, Pieces] = {}

    def check() -> list[int]:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}")
        check_tensors({"x": x}, 3, "[batch, seq, channels]")
        check_tensors({"weight": weight}, 2, "[channels, kernel_size]")
        lengths = check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1], info.world_size, layout)
        pieces = Pieces(
            info, shard_layout(lengths, info.world_size, info.rank, layout),
            cu_seqlens is not None, x.shape[0],
        )  # fmt: skip
        _check(x, weight, bias, activation, pieces)
        built["pieces"] = pieces
        return [
            *x.shape, weight.shape[1], signature_code(str(x.dtype)), signature_code(layout),
            signature_code(str(lengths)), int(bias is not None), signature_code(str(activation)),
        ]  # fmt: skip

    validate_on_all_ranks("distseq.causal_conv1d", info, check, _SIGNATURE)
    return _run(x, weight, bias, activation, built["pieces"])


def causal_conv1d_agreed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    batch: AgreedBatch,
    *,
    activation: str | None = None,
) -> torch.Tensor:
    """:func:`causal_conv1d` on a batch agreed by :func:`distseq.agreed.agree_batch` (its
    group, layout and documents): no agreement collective, no host sync; shapes are checked
    locally once per distinct shape. ``x`` ``[1, S_local, C]`` -> ``[1, S_local, C]``."""

    def plan() -> Pieces:
        check_tensors({"x": x}, 3, "[batch, seq, channels]")
        check_tensors({"weight": weight}, 2, "[channels, kernel_size]")
        batch.check_local_shape("distseq.causal_conv1d", x.shape[0], x.shape[1])
        pieces = Pieces(batch.info, batch.shard, True, 1)
        _check(x, weight, bias, activation, pieces)
        return pieces

    shapes = (x.shape, weight.shape, None if bias is None else bias.shape)
    key = ("causal_conv1d", shapes, x.dtype, x.device, activation)
    return _run(x, weight, bias, activation, batch.plan(key, plan))


def _run(x, weight, bias, activation, pieces: Pieces) -> torch.Tensor:
    width = weight.shape[1] - 1
    xk = pieces.to_kernel(x)
    segments = Segments(pieces.kernel_bounds())
    if width > 0:
        tails = torch.cat(_tails(xk, segments, width))
        tails = tails.view(pieces.docs, pieces.slots, width, x.shape[2])
        halos = _HaloExchange.apply(tails, pieces).flatten(0, 1)
        inputs = [
            torch.cat([halo, piece], dim=1)
            for halo, piece in zip(segments.split_states(halos), segments.split(xk))
        ]
    else:
        inputs = segments.split(xk)
    y = segments.join_tokens([_conv(t, weight, bias) for t in inputs])
    if activation is not None:
        y = F.silu(y)
    return pieces.from_kernel(y)
