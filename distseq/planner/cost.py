"""Analytic cost model: time and memory per rank of one SP group running a set of sequences.

A group of ``d`` ranks runs its sequences packed into one varlen batch (``cu_seqlens``), each
document padded to a multiple of ``2d`` (zigzag). With ``A = Σ padded s`` and ``Q = Σ padded s²``
its time is a sum of *phases*, each the max of linear *pieces* ``a·A + q·Q + c`` (one piece when
nothing overlaps; compute vs communication when the strategy overlaps them), and its memory per
rank is ``static + bytes_per_token · A``. Both are linear in ``(A, Q)`` inside a max, which the
MILP can express exactly.

Communication is α-β (``profile.intra`` inside a node, ``profile.inter`` when the group spans
nodes). The bytes are each strategy's own ``traffic()`` (per token of ``A``: ``s_local = 1/d``;
linear layers: one document's states); what the model adds is when they are on the critical path:

- ``ring`` (softmax): the forward's K/V overlap the blocks; the backward's K/V and dK/dV too.
- ``ulysses``: two all-to-alls per pass, not overlapped.
- ``allgather``: the gather hides behind the local block (1/d of the work); the backward's
  reduce-scatter of dK/dV is not overlapped.
- ``usp`` at Ulysses degree ``u`` (planned as ``usp:u`` for every ``1 < u < d`` dividing the
  heads and at most a node, so its all-to-alls use the intra-node link): ulysses' all-to-alls
  over ``u`` ranks, not overlapped, then a ring of ``d/u`` ranks (``inter`` once the group
  spans nodes) overlapped as ``ring``'s.
- ``lasp2`` (linear): one all-gather of states per direction, overlapped with the intra-chunk
  part; ``allscan``: each rank sends/receives one state, pipelined in ``scan_blocks`` pieces
  along the ``d`` ranks; ``ring``: the state hops sequentially rank to rank (LASP-1). Both
  chains forward a state only once the rank's local kernel is done (``strategies/state_chain.py``
  advances in ``wait()``; on a GPU the combine is stream-ordered after the kernel), so only the
  head's send overlaps the intra-chunk part and the remaining hops are serial. Their critical
  path is ``d-1`` (``+ scan_blocks-1``) hops, while the busiest rank *sends* what ``traffic()``
  says (:meth:`CostModel.bytes_sent`).

Which strategies a group may run comes from the registries (:data:`REGISTRY_BY_MIXER`): each
strategy's ``check_group`` decides (e.g. ulysses needs heads divisible by ``d``).

Compute: causal softmax attention ``2·s²·Hq·D`` FLOPs forward (2.5x that backward), chunked
linear attention ``H·(2·C·D + 4·D²)`` per token forward (3x fwd+bwd), projections and FFN
``6·params`` per token; everything divided by ``d`` (zigzag balances causal work).
Gated DeltaNet (``gdn``) layers cost as linear ones with the chunked delta rule's FLOPs,
``H·(10·C·D + 8·D² + 4·D³/C)`` per token forward (the ``K Kᵀ``/``Q Kᵀ`` scores, the UT
transform's triangular solves, ``W_k``/``W_v`` products, the chunk transitions and their
prefix products), and their ``lasp2`` gathers each piece's ``A`` with its state
(``traffic()``; twice the gathered buffer in memory).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from distseq.layout import check_layout, chunks_per_rank
from distseq.memory.config import PLAIN, MemoryConfig
from distseq.planner.dominance import undominated
from distseq.planner.profile import Link, Profile
from distseq.planner.spec import Cluster, ModelSpec
from distseq.strategies import REGISTRY_BY_MIXER
from distseq.strategies.ulysses import sent_kv_heads
from distseq.strategies.usp import planned_name, split_planned

# Strategies whose overlap structure :meth:`CostModel.layer_phases` writes down, in the order
# plans prefer on ties; a registered strategy missing here cannot be planned (a test checks
# that none is missing).
COSTED: dict[str, tuple[str, ...]] = {
    "softmax": ("ring", "ulysses", "allgather", "usp"),
    "linear": ("lasp2", "allscan", "ring"),
    "gdn": ("lasp2", "allscan", "ring"),
}
SOFTMAX_LAYOUT = "zigzag"  # groups balance causal attention work
BWD_OVER_FWD = 2.5  # flash-attention backward FLOPs relative to forward (recompute included)

Combo = tuple[tuple[str, str], ...]  # ((layer_type, strategy), ...) in LAYER_TYPES order


def padded(lengths: np.ndarray, degree: int) -> np.ndarray:
    """Lengths padded to a multiple of ``2·degree`` (zigzag needs two chunks per rank)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if degree == 1:
        return lengths
    unit = 2 * degree
    return -(-lengths // unit) * unit


def sums(lengths: np.ndarray, degree: int) -> tuple[float, float]:
    """``(A, Q)``: total padded tokens and total padded squared length."""
    p = padded(lengths, degree).astype(np.float64)
    return float(p.sum()), float((p * p).sum())


def combo_name(combo: Combo) -> str:
    return "+".join(strategy for _, strategy in combo)


@dataclass(frozen=True)
class GroupCost:
    """Cost of a group of ``degree`` ranks running strategy ``combo``.

    ``phases[p, k] = (a, q, c)``: time = Σ_p max_k (a·A + q·Q + c) for a non-empty group.
    """

    degree: int
    combo: Combo
    phases: np.ndarray
    static_bytes: float
    bytes_per_token: float

    @property
    def strategy(self) -> str:
        return combo_name(self.combo)

    @property
    def strategies(self) -> dict[str, str]:
        return dict(self.combo)

    def time(self, tokens, squares):
        """Predicted seconds for loads ``A`` (tokens) and ``Q`` (squares); 0 when empty."""
        a = np.asarray(tokens, dtype=np.float64)[..., None, None]
        q = np.asarray(squares, dtype=np.float64)[..., None, None]
        t = (self.phases[..., 0] * a + self.phases[..., 1] * q + self.phases[..., 2]).max(-1)
        return np.where(np.asarray(tokens) > 0, t.sum(-1), 0.0)

    @cached_property
    def scalar_time(self):
        """:meth:`time` for one plain-float ``(A, Q)``, ~20x faster than the numpy path:
        single-piece phases are summed into one linear term."""
        a0 = q0 = c0 = 0.0
        pairs = []
        for phase in self.phases.tolist():
            pieces = {tuple(p) for p in phase}
            if len(pieces) == 1:
                a, q, c = pieces.pop()
                a0, q0, c0 = a0 + a, q0 + q, c0 + c
            else:
                pairs.append(tuple(sorted(pieces)))

        def time(tokens: float, squares: float) -> float:
            if tokens <= 0:
                return 0.0
            t = a0 * tokens + q0 * squares + c0
            for pieces in pairs:
                t += max(a * tokens + q * squares + c for a, q, c in pieces)
            return t

        return time

    def memory(self, tokens) -> float:
        return self.static_bytes + self.bytes_per_token * np.asarray(tokens, dtype=np.float64)

    def capacity(self, memory_bytes: float) -> float:
        """Most padded tokens the group can hold per step under ``memory_bytes`` per rank."""
        return max(0.0, (memory_bytes - self.static_bytes) / self.bytes_per_token)


class _Phases:
    """Collects phases as lists of pieces ``(a, q, c)``; pads them into one array. ``sent``:
    bytes each rank sends, ``(per token of A, fixed)``, recorded by :meth:`message`."""

    def __init__(self) -> None:
        self.items: list[list[tuple[float, float, float]]] = []
        self.sent = [0.0, 0.0]

    def message(
        self,
        link: Link,
        hops: float,
        nbytes: float,
        *,
        per_token: bool = False,
        sent: float | None = None,
    ) -> tuple[float, float]:
        """``link.time(hops, nbytes)`` of a message on the critical path, recording ``sent``
        bytes per rank (default ``nbytes``; a chain's path is longer than what one rank sends)."""
        self.sent[0 if per_token else 1] += nbytes if sent is None else sent
        return link.time(hops, nbytes)

    def serial(self, a: float = 0.0, q: float = 0.0, c: float = 0.0) -> None:
        self.items.append([(a, q, c)])

    def overlap(self, *pieces: tuple[float, float, float]) -> None:
        self.items.append(list(pieces))

    def scaled(self, factor: float) -> list[list[tuple[float, float, float]]]:
        return [[(a * factor, q * factor, c * factor) for a, q, c in ph] for ph in self.items]


def _pack(phases: list[list[tuple[float, float, float]]]) -> np.ndarray:
    width = max(len(p) for p in phases)
    out = np.zeros((len(phases), width, 3))
    for i, pieces in enumerate(phases):
        for k in range(width):
            out[i, k] = pieces[min(k, len(pieces) - 1)]  # repeat a piece: max unchanged
    return out


class CostModel:
    """Time and memory of SP groups for one model on one cluster and profile.

    ``bytes_per_param``: weights + grads + optimizer state per parameter (16 for bf16 weights
    and grads with fp32 Adam master/m/v); ``shard_states``: ZeRO-3/FSDP over all ranks (plus
    two gathered layers of bf16 weights in flight) instead of a full replica per rank;
    ``activation_checkpointing``: keep only each layer's input and recompute the forward
    (mixer communication included) during backward. ``linear_layout``: the layout linear layers
    run under; ``zigzag`` gives each rank two pieces, so ``lasp2`` gathers two states per rank,
    the ``ring`` chain runs ``0 → d-1 → 0`` (``2(d-1)`` hops) and ``allscan`` is unavailable.
    ``zero_stage`` (the adaptive trainer's engines, fp32 weights; overrides ``shard_states``):
    0 replicates weights, gradients and Adam moments (16 B/param); 1 shards the moments over
    all ranks (8 B + 8 B/W); 2 also accumulates the gradient as a shard (8 B + 12 B/W: the
    full gradient still lives through each micro-step's backward, as long as the engine
    reduce-scatters after it rather than in buckets during it); 3 shards everything (as
    ``shard_states``). Stages 1–3 charge their collectives in :meth:`sync_time`.
    ``memory``: the memory savers in use (:class:`distseq.memory.MemoryConfig`; default all
    off): the fused loss replaces the per-token float32 logits by one chunk's, tiled MLPs
    their per-token intermediates by one tile's, offloaded checkpoints drop the kept layer
    inputs from device memory.
    all ranks (8 B + 8 B/W); 2 also the gradient, reduce-scattered during the backward in
    buckets of ``zero_bucket_bytes`` (4 B + 12 B/W, plus two buckets in flight: one filling,
    one being reduced; a bucket is at least the largest weight matrix); 3 shards everything
    (as ``shard_states``). Stages 1–3 charge their collectives in :meth:`sync_time`.
    """

    def __init__(
        self,
        model: ModelSpec,
        profile: Profile,
        cluster: Cluster,
        *,
        bytes_per_param: float = 16.0,
        shard_states: bool = True,
        activation_checkpointing: bool = False,
        chunk_size: int = 64,
        scan_blocks: int = 8,
        linear_layout: str = "contiguous",
        zero_stage: int | None = None,
        memory: MemoryConfig = PLAIN,
        zero_bucket_bytes: float = 25 * 2**20,
    ) -> None:
        check_layout(linear_layout)
        if zero_stage not in (None, 0, 1, 2, 3):
            raise ValueError(f"zero_stage={zero_stage!r}; use 0 (replicated), 1, 2 or 3")
        if zero_bucket_bytes <= 0:
            raise ValueError(f"zero_bucket_bytes={zero_bucket_bytes!r}; use a positive size")
        self.zero_stage = zero_stage
        self.zero_bucket_bytes = zero_bucket_bytes
        self.model, self.profile, self.cluster = model, profile, cluster
        self.memory = memory
        self.bytes_per_param = bytes_per_param
        self.shard_states = shard_states
        self.checkpointing = activation_checkpointing
        self.chunk_size = chunk_size
        self.scan_blocks = scan_blocks
        self.linear_layout = linear_layout
        self._cache: dict[tuple[int, Combo], GroupCost] = {}
        self.memo: dict = {}  # derived per-model data other modules cache (e.g. fast closures)

    # ----------------------------------------------------------------- strategies
    def _group_shape(self, layer_type: str, degree: int) -> tuple:
        """The arguments of the strategies' ``check_group`` for a ``degree`` group."""
        m = self.model
        if layer_type == "softmax":
            return degree, m.n_heads, m.n_kv_heads, SOFTMAX_LAYOUT
        return degree, self.linear_layout

    def _usp_degrees(self, degree: int) -> list[int]:
        """usp's Ulysses degrees worth planning: ``1 < u < d`` (``u = 1`` is ring, ``u = d``
        ulysses) within a node, each passing usp's own check."""
        usp = REGISTRY_BY_MIXER["softmax"].get("usp")
        out = []
        for u in range(2, min(degree, self.cluster.gpus_per_node + 1)):
            try:
                usp.check_group(*self._group_shape("softmax", degree), u)
            except ValueError:
                continue
            out.append(u)
        return out

    def combos(self, degree: int) -> list[Combo]:
        """Feasible strategy choices (one per layer type) for a group of ``degree`` ranks."""
        per_type = []
        for layer_type in self.model.layer_types:
            registry = REGISTRY_BY_MIXER[layer_type]
            if degree == 1:
                names = [registry.default]  # no communication: every strategy is the local kernel
            else:
                able = registry.supporting(*self._group_shape(layer_type, degree))
                names = [n for n in COSTED[layer_type] if n in able and n != "usp"]
                if layer_type == "softmax":
                    names += [planned_name(u) for u in self._usp_degrees(degree)]
            per_type.append([(layer_type, n) for n in names])
        return list(itertools.product(*per_type))

    def group_cost(self, degree: int, combo: Combo) -> GroupCost:
        key = (degree, combo)
        if key not in self._cache:
            self._cache[key] = self._build(degree, combo)
        return self._cache[key]

    def kinds(self, degree: int) -> list[GroupCost]:
        """The kinds worth planning for a ``degree`` group: every feasible combo's, less those
        another kind provably dominates (:mod:`distseq.planner.dominance`)."""
        key = ("kinds", degree)
        if key not in self.memo:
            self.memo[key] = undominated([self.group_cost(degree, c) for c in self.combos(degree)])
        return list(self.memo[key])

    # ----------------------------------------------------------------- time
    def _link(self, degree: int):
        return self.profile.inter if self.cluster.spans_nodes(degree) else self.profile.intra

    def layer_phases(self, layer_type: str, strategy: str, degree: int) -> _Phases:
        """Phases of one layer's mixer (attention or linear attention), forward + backward;
        ``strategy`` as a plan names it (``usp:u`` for usp at Ulysses degree ``u``)."""
        if layer_type not in COSTED:
            raise ValueError(f"unknown layer type {layer_type!r}; use {list(COSTED)}")
        strategy, ulysses = split_planned(strategy)
        if strategy not in COSTED[layer_type]:
            raise ValueError(
                f"unknown {layer_type} strategy {strategy!r}; use {list(COSTED[layer_type])}"
            )
        shape = self._group_shape(layer_type, degree)
        if ulysses is not None:
            shape = (*shape, ulysses)
        impl = REGISTRY_BY_MIXER[layer_type].check(strategy, *shape)
        ph = _Phases()
        if layer_type == "softmax":
            self._softmax_phases(ph, impl, degree, ulysses)
        else:
            self._linear_phases(ph, impl, degree, delta=layer_type == "gdn")
        return ph

    def _softmax_phases(self, ph: _Phases, impl, d: int, ulysses: int | None) -> None:
        m, pr = self.model, self.profile
        q_fwd = 2.0 * m.n_heads * m.head_dim / (d * pr.attention_flops)
        q_bwd = BWD_OVER_FWD * q_fwd
        if self.checkpointing:
            q_bwd += q_fwd  # the recomputed forward's blocks
        if d == 1:
            ph.serial(q=q_fwd + q_bwd)
            return
        link = self._link(d)
        # Bytes per token of A: each rank holds A/d of the group's tokens.
        t = impl.traffic(d, 1.0 / d, m.n_heads, m.n_kv_heads, m.head_dim, pr.elem_bytes)
        fwd_passes = 2 if self.checkpointing else 1  # the recomputed forward resends
        if impl.name == "ring":
            self._ring_phases(ph, link, d, t, q_fwd, q_bwd)
        elif impl.name == "ulysses":
            c, a = self._all_to_all_message(ph, link, d, t)
            ph.serial(a=a, q=q_fwd + q_bwd, c=c)
        elif impl.name == "usp":
            a2a, ring = impl.level_traffic(
                d, 1.0 / d, m.n_heads, m.n_kv_heads, m.head_dim, pr.elem_bytes, ulysses
            )
            c, a = self._all_to_all_message(ph, self._link(ulysses), ulysses, a2a)
            ph.serial(a=a, c=c)
            self._ring_phases(ph, link, d // ulysses, ring, q_fwd, q_bwd)
        else:  # allgather: the backward gathers again, then reduce-scatters dK/dV
            gather = t.forward
            c_g, a_g = ph.message(
                link, d - 1, gather, per_token=True, sent=(1 + fwd_passes) * gather
            )
            c_rs, a_rs = ph.message(link, d - 1, t.backward - gather, per_token=True)
            ph.overlap((0, q_fwd / d, 0), (a_g, 0, c_g))
            ph.overlap(
                (0, q_bwd / d, 0),
                (a_g * (1 + self.checkpointing), 0, c_g * (1 + self.checkpointing)),
            )
            ph.serial(a=a_rs, q=(q_fwd + q_bwd) * (d - 1) / d, c=c_rs)

    def _ring_phases(self, ph: _Phases, link: Link, ranks: int, t, q_fwd: float, q_bwd: float):
        """A ring of ``ranks``: K/V (backward: and dK/dV) hops overlap the blocks."""
        fwd_passes = 2 if self.checkpointing else 1  # the recomputed forward resends
        c_f, a_f = ph.message(
            link, ranks - 1, t.forward, per_token=True, sent=fwd_passes * t.forward
        )
        c_b, a_b = ph.message(link, ranks - 1, t.backward, per_token=True)
        ph.overlap((0, q_fwd, 0), (a_f, 0, c_f))
        ph.overlap(
            (0, q_bwd, 0),
            (a_b + self.checkpointing * a_f, 0, c_b + self.checkpointing * c_f),
        )

    def _all_to_all_message(self, ph: _Phases, link: Link, ranks: int, t) -> tuple[float, float]:
        """Two all-to-alls over ``ranks`` per pass (recomputed forward included), not
        overlapped: their ``(c, a)`` time."""
        fwd_passes = 2 if self.checkpointing else 1
        nbytes = fwd_passes * t.forward + t.backward
        return ph.message(link, 2 * (ranks - 1) * (fwd_passes + 1), nbytes, per_token=True)

    def _linear_phases(self, ph: _Phases, impl, d: int, delta: bool = False) -> None:
        m, pr, chunk = self.model, self.profile, self.chunk_size
        h, dh = m.n_heads, m.head_dim
        rate = d * pr.linear_attention_flops
        intra_f = 2.0 * h * chunk * dh / rate  # per token: causal chunk-local scores and values
        inter_f = 4.0 * h * dh * dh / rate  # per token: q·S and the state update kᵀv
        if delta:  # the chunked delta rule (module docstring)
            intra_f = 10.0 * h * chunk * dh / rate
            inter_f = h * (8.0 * dh * dh + 4.0 * dh**3 / chunk) / rate
        pieces = chunks_per_rank(self.linear_layout)  # per rank and document
        state = h * dh * dh * 4.0  # one fp32 H·Dk·Dv message
        t = impl.traffic(d, 1, h, dh, dh, self.linear_layout)
        link = self._link(d)
        # Forward, (recomputed forward,) backward at twice the forward's FLOPs.
        for factor in (1.0, 1.0, 2.0) if self.checkpointing else (1.0, 2.0):
            backward = factor == 2.0
            intra, inter = factor * intra_f, factor * inter_f
            if d == 1:
                ph.serial(a=intra + inter)
                continue
            if impl.name == "lasp2":
                gathered = t.backward if backward else t.forward
                ph.overlap((intra, 0, 0), (0, 0, sum(ph.message(link, d - 1, gathered))))
            else:
                # A chain: the head's send (all its blocks) overlaps the local kernel; the
                # other ranks forward after theirs, one hop (block) after another.
                blocks = self.scan_blocks if impl.name == "allscan" else 1
                hops = pieces * (d - 1) - 1  # after the head's
                head = sum(link.time(blocks, state))
                # What the busiest rank sends in this pass (at d=2 contiguous it sends in one
                # pass only, which Traffic.total accounts for).
                sent = t.total - t.forward if backward else t.forward
                rest = sum(ph.message(link, hops, hops * state / blocks, sent=sent))
                ph.overlap((intra, 0, 0), (0, 0, head))
                ph.serial(c=rest)
            ph.serial(a=inter)

    def mixer_time(self, layer_type: str, strategy: str, degree: int, length: int) -> float:
        """Seconds of one layer's mixer, forward + backward, for one sequence (plus the
        per-layer overhead): what ``benchmarks/planner.py`` compares with measured runs."""
        tokens, squares = sums(np.array([length]), degree)
        phases = _pack(self.layer_phases(layer_type, strategy, degree).items)
        t = (phases[..., 0] * tokens + phases[..., 1] * squares + phases[..., 2]).max(-1).sum()
        return float(t) + self.profile.layer_overhead_s

    def _dense_flops_per_token(self) -> float:
        m = self.model
        passes = 4.0 if self.checkpointing else 3.0
        return passes * (2.0 * sum(m.block_params) + 2.0 * m.vocab_size * m.d_model)

    def _build(self, degree: int, combo: Combo) -> GroupCost:
        m, pr = self.model, self.profile
        phases: list[list[tuple[float, float, float]]] = []
        for layer_type, strategy in combo:
            phases += self.layer_phases(layer_type, strategy, degree).scaled(m.count(layer_type))
        dense = self._dense_flops_per_token() / (degree * pr.matmul_flops)
        phases.append([(dense, 0.0, m.n_layers * pr.layer_overhead_s)])
        static, per_token = self._memory(degree, combo)
        return GroupCost(degree, combo, _pack(phases), static, per_token)

    # ----------------------------------------------------------------- memory
    def _memory(self, degree: int, combo: Combo) -> tuple[float, float]:
        m, e, d = self.model, self.profile.elem_bytes, degree
        params = m.params
        if self.zero_stage is not None and self.zero_stage < 3:
            world = self.cluster.world_size
            whole, sharded = {0: (16.0, 0.0), 1: (8.0, 8.0), 2: (4.0, 12.0)}[self.zero_stage]
            static = params * (whole + sharded / world)
            if self.zero_stage == 2:
                static += 2 * self._bucket_bytes()
        elif self.shard_states or self.zero_stage == 3:
            static = params * self.bytes_per_param / self.cluster.world_size
            static += 2 * max(m.block_params) * e  # the gathered layers in flight
        else:
            static = params * self.bytes_per_param
        static += self.profile.reserved_bytes
        saved = e * (4 * m.d_model + (2 * m.n_heads + 2 * m.n_kv_heads) * m.head_dim)
        mlp_static, mlp_per_token = self._mlp_memory(degree)
        static += mlp_static
        saved += mlp_per_token
        kv = 2 * m.n_kv_heads * m.head_dim
        all_to_all_heads = 2 * m.n_heads + 2 * sent_kv_heads(m.n_kv_heads, d)  # ulysses: Q,O,K,V
        state = m.n_heads * m.head_dim**2 * 4.0
        per_token = 0.0
        full: list[float] = []
        # fp32 log-probabilities (kept for the backward), their gradient and the logits'
        transient = [3.0 * m.vocab_size * 4 / d]
        if self.memory.loss_chunk_tokens:  # fused loss: one chunk's logits and probabilities
            transient = [0.0]
            static += 2.0 * self.memory.loss_chunk_tokens * m.vocab_size * 4
        for layer_type, planned in combo:
            strategy, ulysses = split_planned(planned)
            if layer_type == "softmax":
                full.append((saved + 4 * m.n_heads) / d)
                if strategy == "usp":  # all-to-all buffers, then a ring of replicated K/V
                    sent = sent_kv_heads(m.n_kv_heads, ulysses)
                    heads = 2 * m.n_heads + 2 * sent
                    transient.append((2 * heads * e + 4 * sent * (e + 4)) * m.head_dim / d)
                    continue
                transient.append(
                    {
                        "ring": 2 * kv * (e + 4) / d,  # K/V and fp32 dK/dV in flight
                        "ulysses": 2 * all_to_all_heads * m.head_dim * e / d,
                        "allgather": kv * (e + 4),  # the whole gathered K/V and fp32 dK/dV
                    }[strategy]
                )
            else:
                kept = 4.0 * m.n_heads * m.head_dim if layer_type == "gdn" else 0.0  # fp32 q̃
                full.append((saved + kept + state / self.chunk_size) / d)
                gathered = state * (2 if layer_type == "gdn" else 1)  # gdn: A with each state
                static += gathered * d if strategy == "lasp2" else state * 2
        offload = self.checkpointing and self.memory.offload_checkpoints
        for (layer_type, _), layer in zip(combo, full):
            kept = e * m.d_model / d if self.checkpointing else layer
            kept = 0.0 if offload else kept  # the layer inputs wait in host memory
            per_token += m.count(layer_type) * kept
        if self.checkpointing:
            per_token += max(full)  # the layer being recomputed
        return static, per_token + max(transient)

    def _bucket_bytes(self) -> float:
        """fp32 bytes of a stage-1/2 gradient bucket: ``zero_bucket_bytes``, or the largest
        weight matrix, which is a bucket of its own; at most the whole gradient."""
        m = self.model
        largest = m.d_model * max(m.vocab_size, m.ffn_hidden, m.n_heads * m.head_dim)
        return min(max(self.zero_bucket_bytes, 4.0 * largest), 4.0 * m.params)

    def sync_time(self, micro_steps: int) -> float:
        """Seconds of the sharded states' collectives in a step of ``micro_steps``: stage 1
        reduce-scatters the fp32 gradients once, stage 2 after every micro-step (every rank
        joins, idle or not); both all-gather the updated weights. Stage 3 gathers the weights
        in every micro-step's forward and again in its backward, and reduce-scatters the
        gradients (FSDP prefetches and overlaps them with compute, which is not credited:
        pessimistic). Stages 1 and 2 run each collective as one ring per gradient bucket (a
        ring's latency per bucket); stage 2's reduce-scatters overlap the backward, which is
        not credited either. Flat rings over the whole world (the inter-node link once the
        world spans nodes). 0 without ``zero_stage``."""
        if not self.zero_stage:
            return 0.0
        w = self.cluster.world_size
        if w == 1:
            return 0.0
        shard = 4.0 * self.model.params / w  # fp32 bytes each rank sends per ring hop
        collectives = {1: 2, 2: micro_steps + 1, 3: 3 * micro_steps}[self.zero_stage]
        rings = 1
        if self.zero_stage < 3:
            rings = math.ceil(4.0 * self.model.params / self._bucket_bytes())
        return collectives * sum(self._link(w).time(rings * (w - 1), (w - 1) * shard))

    def _mlp_memory(self, degree: int) -> tuple[float, float]:
        """``(static, per token of A)`` bytes of one layer's saved MLP intermediates (gate,
        up, their product): per token, or with ``memory.mlp_tiles`` one tile's at a time
        (``auto``: tiles of ``d_model`` tokens, a fixed amount, twice for the recomputation's
        intermediates and their gradients)."""
        m, e, tiles = self.model, self.profile.elem_bytes, self.memory.mlp_tiles
        per_token = e * 3 * m.ffn_hidden
        if tiles == "auto":
            return 2 * per_token * m.d_model, 0.0
        return 0.0, per_token / tiles

    # ----------------------------------------------------------------- queries
    def bytes_sent(self, degree: int, combo: Combo, lengths) -> float:
        """Bytes each rank sends through the mixers of one forward + backward (every layer,
        recomputation included) of a ``degree`` group holding ``lengths``: what
        ``distseq.CommCounter`` counts (most loaded rank), not the critical path's bytes."""
        tokens, _ = sums(lengths, degree)
        total = 0.0
        for layer_type, strategy in combo:
            per_token, fixed = self.layer_phases(layer_type, strategy, degree).sent
            total += self.model.count(layer_type) * (per_token * tokens + fixed)
        return total

    def breakdown(self, degree: int, combo: Combo, lengths) -> dict[str, float]:
        """Seconds of a ``degree`` group's step on ``lengths``: ``total`` (as
        :meth:`GroupCost.time`), ``compute`` (the same model with free links), ``comm`` (with
        free compute and no overheads: the communication on the critical path) and
        ``exposed_comm = total - compute``, the communication that overlap does not hide."""
        tokens, squares = sums(lengths, degree)
        out = {
            key: float(model.group_cost(degree, combo).time(tokens, squares))
            for key, model in (
                ("total", self),
                ("compute", self._variant("compute")),
                ("comm", self._variant("comm")),
            )
        }
        out["exposed_comm"] = max(0.0, out["total"] - out["compute"])
        return out

    def _variant(self, keep: str) -> CostModel:
        """This model with only compute (free links) or only communication (free compute)."""
        key = ("breakdown", keep)
        if key not in self.memo:
            pr = self.profile
            if keep == "compute":
                free = Link(0.0, math.inf)
                profile = replace(pr, intra=free, inter=free)
            else:
                fast = dict.fromkeys(
                    ("matmul_flops", "attention_flops", "linear_attention_flops"), math.inf
                )
                profile = replace(pr, layer_overhead_s=0.0, **fast)
            self.memo[key] = CostModel(
                self.model,
                profile,
                self.cluster,
                bytes_per_param=self.bytes_per_param,
                shard_states=self.shard_states,
                activation_checkpointing=self.checkpointing,
                chunk_size=self.chunk_size,
                scan_blocks=self.scan_blocks,
                linear_layout=self.linear_layout,
                zero_stage=self.zero_stage,
                memory=self.memory,
                zero_bucket_bytes=self.zero_bucket_bytes,
            )
        return self.memo[key]

    def best(self, degree: int, lengths) -> tuple[GroupCost | None, float]:
        """Fastest memory-feasible strategy of a ``degree`` group holding ``lengths``."""
        tokens, squares = sums(lengths, degree)
        best, best_time = None, math.inf
        for kind in self.kinds(degree):
            if kind.static_bytes + kind.bytes_per_token * tokens > self.cluster.memory_bytes:
                continue
            t = kind.scalar_time(tokens, squares)
            if t < best_time:
                best, best_time = kind, t
        return best, best_time

    def min_memory(self, length: int) -> tuple[int, float]:
        """Smallest per-rank memory of one sequence over all degrees: ``(degree, bytes)``."""
        options = []
        for d in self.cluster.degrees():
            tokens = float(padded(np.array([length]), d)[0])
            options.append((min(float(k.memory(tokens)) for k in self.kinds(d)), d))
        need, degree = min(options)
        return degree, need


def work_floor(kind: GroupCost, tokens, squares):
    """Rank-seconds a group of ``kind`` needs at least for loads ``(A, Q)``: ``d·Σ_p min_k (a·A +
    q·Q)``. Additive over sequences (min is superadditive, constants dropped), so summing it
    over a batch gives a valid lower bound on any plan's total rank-time."""
    a = np.asarray(tokens, dtype=np.float64)[..., None, None]
    q = np.asarray(squares, dtype=np.float64)[..., None, None]
    per_piece = kind.phases[..., 0] * a + kind.phases[..., 1] * q
    return kind.degree * per_piece.min(-1).sum(-1)
