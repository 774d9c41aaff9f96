"""``planner: adaptive``: plan every step's batch over all ranks and run this rank's share.

Each step, :func:`distseq.planner.plan_batch` splits the ranks into SP groups of different
sizes, gives every document of the batch to one group and picks each group's strategies.
Only global rank 0 solves (a MILP stopped by its time limit is timing-dependent) and
broadcasts the plan; it solves step ``k + 1`` in a background thread while step ``k``
trains. Every group the plans use is created once, by all ranks together, and cached.
A group runs its documents packed into one varlen sequence, each padded to what its layout
needs, as the planner's cost model assumes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta

import torch
import torch.distributed as dist

from distseq.layout import LAYOUTS, chunks_per_rank
from distseq.models import SequenceContext
from distseq.models.config import GDN_CONV_SIZE
from distseq.planner import Cluster, CostModel, Plan, load_profile, plan_batch
from distseq.planner.plan import GroupPlan
from distseq.planner.spec import ModelSpec
from distseq.planner.sync import broadcast_plan
from distseq.planner.units import parse_bytes
from distseq.strategies import REGISTRY_BY_MIXER
from distseq.strategies.usp import split_planned
from distseq.train.config import Config
from distseq.train.data import PackedSequence, pack_group
from distseq.train.data.sources import Document


def group_layout(group: GroupPlan) -> str:
    """``zigzag`` (balanced causal work) unless a strategy of the group handles only
    ``contiguous`` (e.g. ``allscan``); a one-rank group needs no balancing or padding."""
    if group.degree == 1:
        return "contiguous"
    handled = set(LAYOUTS)
    for layer_type, name in group.strategies.items():
        handled &= set(REGISTRY_BY_MIXER[layer_type].get(split_planned(name)[0]).layouts)
    return "zigzag" if "zigzag" in handled else "contiguous"


def _usable_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // local


def planner_cost(cfg: Config, world_size: int, device: torch.device) -> CostModel:
    """The cost model of this run: the config's model on ``world_size`` ranks of ``device``,
    with the ``adaptive.*`` profile, memory and node size (see :class:`AdaptiveConfig`)."""
    opts = cfg.adaptive
    profile = opts.profile
    if profile == "auto":
        profile = "h100_nvlink_ib400" if device.type == "cuda" else "cpu_gloo"
    memory = parse_bytes(opts.memory) if opts.memory is not None else _usable_memory(device)
    per_node = opts.gpus_per_node
    if per_node is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        per_node = 1 << (local - 1).bit_length()
    cluster = Cluster(world_size, per_node, memory)
    # fp32 weights, gradients and Adam moments: replicated, or sharded by a ZeRO stage.
    return CostModel(
        ModelSpec.from_config(cfg.model),
        load_profile(profile),
        cluster,
        bytes_per_param=16.0,
        shard_states=False,
        activation_checkpointing=cfg.train.activation_checkpointing,
        zero_stage=cfg.adaptive.zero_stage,
        memory=cfg.memory,
        zero_bucket_bytes=cfg.adaptive.zero_bucket_mb * 2**20,
    )


IDLE_TOKENS = 8  # a stage-3 idle rank's dummy micro-batch


class GroupCache:
    """Process groups by their ranks. :meth:`ensure` must be called by every rank with the
    same plan: ``new_group`` is collective over the whole world, in one order everywhere.
    The groups time out after ``timeout_s`` seconds (``parallel.timeout_s``), as the mesh's."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout = timedelta(seconds=timeout_s)
        self._groups: dict[tuple[int, ...], dist.ProcessGroup] = {}

    def ensure(self, plan: Plan) -> None:
        wanted = {g.ranks for step in plan.micro_steps for g in step.groups}
        for ranks in sorted(wanted - self._groups.keys()):
            self._groups[ranks] = dist.new_group(list(ranks), timeout=self.timeout)

    def __getitem__(self, ranks: tuple[int, ...]) -> dist.ProcessGroup:
        return self._groups[ranks]

    def __len__(self) -> int:
        return len(self._groups)


def check_plan(plan: Plan, lengths: Sequence[int], world_size: int) -> None:
    """Refuse a plan that would drop or repeat a document or use ranks twice (a planner bug
    would otherwise train on a wrong batch silently)."""
    seen = sorted(s for step in plan.micro_steps for g in step.groups for s in g.sequences)
    if seen != list(range(len(lengths))) or list(plan.lengths) != list(lengths):
        raise RuntimeError(f"planner bug: plan covers documents {seen} of {len(lengths)}")
    for step in plan.micro_steps:
        ranks = [r for g in step.groups for r in g.ranks]
        if len(set(ranks)) != len(ranks) or not all(0 <= r < world_size for r in ranks):
            raise RuntimeError(f"planner bug: micro-step ranks {ranks} on {world_size} ranks")


class AdaptiveScheduler:
    """Plans steps (one ahead, on rank 0) and hands each rank its work.

    ``plan(docs, upcoming)`` returns the step's plan on every rank and starts solving
    ``upcoming`` (the next step's documents); ``work(plan, docs)`` is this rank's
    ``(packed sequence, context)`` per micro-step it takes part in.
    """

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.cost = planner_cost(cfg, self.world_size, device)
        self.time_limit = cfg.adaptive.time_limit
        self.parallel = cfg.parallel  # the kernel backends every group's layers use
        self.groups = GroupCache(cfg.parallel.timeout_s)
        # Stage 3 (FSDP) collectives live in forward/backward: an idle rank runs a dummy
        # micro-batch on a one-rank group of its own (created by all ranks, in order).
        self.idle_group = None
        if cfg.adaptive.zero_stage == 3:
            timeout = timedelta(seconds=cfg.parallel.timeout_s)
            for r in range(self.world_size):
                group = dist.new_group([r], timeout=timeout)
                self.idle_group = group if r == self.rank else self.idle_group
        self._executor = ThreadPoolExecutor(1, "distseq-planner") if self.rank == 0 else None
        self._pending: tuple[list[int], Future[Plan]] | None = None
        self.prefetched = 0  # plans (on rank 0) that were solved while the previous step ran

    def solve(self, lengths: list[int]) -> Plan:
        """The plan of one batch (tests substitute fixed plans here)."""
        return plan_batch(
            lengths, self.cost.cluster, self.cost.model, self.cost.profile, cost=self.cost,
            time_limit=self.time_limit,
        )  # fmt: skip

    def _solve_pending(self, lengths: list[int]) -> Plan:
        if self._pending is not None and self._pending[0] == lengths:
            self.prefetched += 1
            return self._pending[1].result()
        return self.solve(lengths)

    def plan(self, docs: list[Document], upcoming: list[Document] | None) -> Plan:
        lengths = [len(tokens) for tokens, _ in docs]
        plan = broadcast_plan(lambda: self._solve_pending(lengths))
        check_plan(plan, lengths, self.world_size)
        self.groups.ensure(plan)
        if self._executor is not None and upcoming is not None:
            nxt = [len(tokens) for tokens, _ in upcoming]
            self._pending = (nxt, self._executor.submit(self.solve, nxt))
        return plan

    def work(
        self, plan: Plan, docs: list[Document]
    ) -> list[tuple[PackedSequence, SequenceContext] | None]:
        """One entry per micro-step of the plan: ``None`` where this rank is idle (the engine
        may still have collectives to join there)."""
        out: list[tuple[PackedSequence, SequenceContext] | None] = []
        for step in plan.micro_steps:
            group = step.group_of(self.rank)
            if group is None:
                out.append(self._idle_work())
                continue
            layout = group_layout(group)
            multiple = group.degree * chunks_per_rank(layout)
            if group.degree > 1 and "gdn" in self.cost.model.layers:
                multiple *= GDN_CONV_SIZE - 1  # the convolution's halo needs 3-token pieces
            seq = pack_group([docs[i] for i in group.sequences], multiple)
            # A plan names usp with its degree ("usp:2").
            attention, ulysses = split_planned(group.strategies.get("softmax", "ring"))
            ctx = SequenceContext.build(
                seq.doc_lengths, group=self.groups[group.ranks], layout=layout,
                attention_strategy=attention, ulysses_degree=ulysses,
                # linear and gdn layers share parallel.linear_strategy's slot
                linear_strategy=group.strategies.get(
                    "linear", group.strategies.get("gdn", "lasp2")
                ),
                attention_backend=self.parallel.attention_backend,
                linear_backend=self.parallel.linear_backend,
            )  # fmt: skip
            out.append((seq, ctx))
        return out

    def _idle_work(self) -> tuple[PackedSequence, SequenceContext] | None:
        """``None``, or with stage 3 a dummy micro-batch: ``IDLE_TOKENS`` padding tokens, none
        in the loss, on this rank alone (its gradient is exactly zero)."""
        if self.idle_group is None:
            return None
        zeros = torch.zeros(IDLE_TOKENS, dtype=torch.int64)
        seq = PackedSequence(zeros, zeros, zeros.bool(), (IDLE_TOKENS,))
        ctx = SequenceContext.build(
            seq.doc_lengths, group=self.idle_group, layout="contiguous",
            attention_backend=self.parallel.attention_backend,
            linear_backend=self.parallel.linear_backend,
        )  # fmt: skip
        return seq, ctx

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


def plan_summary(plan: Plan) -> dict:
    """The metrics a step logs about its plan; ``plan_groups`` lists ``degree:strategy`` per
    group, micro-steps separated by ``|`` (e.g. ``2:ring+lasp2 1:ring+lasp2 | 4:ring+lasp2``);
    ``plan_gap_to_bound``: how far above optimal the plan can be; ``plan_gap_to_static``: the
    share of the best static plan's time it saves."""
    shapes = [
        " ".join(f"{g.degree}:{g.strategy}" for g in step.groups) for step in plan.micro_steps
    ]
    return {
        "plan_groups": " | ".join(shapes),
        "plan_method": plan.method,
        "plan_predicted_s": plan.predicted_step_time_s,
        "plan_static_best_s": plan.static_best.predicted_step_time_s,
        "plan_lower_bound_s": plan.lower_bound_s,
        "plan_gap_to_bound": plan.gap_to_lower_bound,
        "plan_gap_to_static": plan.gap_to_static,
        "plan_solve_s": plan.solve_time_s,
    }
