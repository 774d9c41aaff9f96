"""Heterogeneity-adaptive planner: per step, split the ranks into SP groups of different sizes,
assign each sequence to one group and pick each group's strategy, minimizing the step time.

    from distseq.planner import plan_batch, Cluster, load_model, load_profile
    plan = plan_batch(lengths, Cluster(64, 8, 80 * 2**30), load_model("configs/m.yaml"),
                      load_profile("h100_nvlink_ib400"))
"""

from distseq.planner.cost import CostModel, GroupCost
from distseq.planner.plan import GroupPlan, MicroStep, Plan, StaticSummary, write_plans
from distseq.planner.profile import Link, Profile, load_profile, shipped_profiles
from distseq.planner.solver import plan_batch
from distseq.planner.spec import Cluster, ModelSpec, load_model, model_from_dict
from distseq.planner.sync import broadcast_plan
from distseq.planner.units import parse_bytes, parse_count

__all__ = [
    "Cluster",
    "CostModel",
    "GroupCost",
    "GroupPlan",
    "Link",
    "MicroStep",
    "ModelSpec",
    "Plan",
    "Profile",
    "StaticSummary",
    "broadcast_plan",
    "load_model",
    "load_profile",
    "model_from_dict",
    "parse_bytes",
    "parse_count",
    "plan_batch",
    "shipped_profiles",
    "write_plans",
]
