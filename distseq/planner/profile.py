"""Hardware coefficients of the cost model, as a JSON file (from ``calibrate`` or shipped)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

PROFILE_DIR = os.path.join(os.path.dirname(__file__), "profiles")


@dataclass(frozen=True)
class Link:
    """α-β link: a message of ``n`` bytes costs ``alpha_s + n / bandwidth_Bps`` seconds."""

    alpha_s: float
    bandwidth_Bps: float

    def time(self, hops: float, nbytes: float) -> tuple[float, float]:
        """(constant, per-byte) parts of ``hops`` latencies plus ``nbytes`` sent by one rank."""
        return hops * self.alpha_s, nbytes / self.bandwidth_Bps


@dataclass(frozen=True)
class Profile:
    """Effective rates of one machine type.

    ``*_flops`` are achieved FLOP/s per rank: dense matmuls, causal softmax attention
    (forward+backward FLOPs counted as 3.5x the forward's ``2·s²·H·D``), chunked linear
    attention. ``intra``/``inter``: the link inside a node and between nodes (per rank, one
    direction). ``layer_overhead_s``: fixed cost per layer per group call (launches, Python).
    ``elem_bytes``: bytes per activation element (2 for bf16, 4 for fp32).
    ``source`` says whether the numbers were measured here or taken from published peaks.
    """

    name: str
    source: str
    matmul_flops: float
    attention_flops: float
    linear_attention_flops: float
    intra: Link
    inter: Link
    layer_overhead_s: float = 0.0
    elem_bytes: int = 2
    reserved_bytes: int = 0
    note: str = ""

    def __post_init__(self) -> None:
        for name in ("matmul_flops", "attention_flops", "linear_attention_flops"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"profile {self.name!r}: {name} = {getattr(self, name)!r} must be > 0"
                )
        for which in ("intra", "inter"):
            link = getattr(self, which)
            if not (link.bandwidth_Bps > 0 and link.alpha_s >= 0):
                raise ValueError(
                    f"profile {self.name!r}: {which} link {link} needs bandwidth > 0, alpha >= 0"
                )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"comment"})
        if unknown:
            raise ValueError(f"profile has unknown keys {unknown}; expected {sorted(known)}")
        data = {k: v for k, v in data.items() if k in known}
        try:
            data["intra"] = Link(**data["intra"])
            data["inter"] = Link(**data["inter"])
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"profile is malformed ({exc}); compare with {PROFILE_DIR}") from None

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


def shipped_profiles() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PROFILE_DIR) if f.endswith(".json"))


def load_profile(name_or_path: str) -> Profile:
    """A profile by file path, or by the name of a shipped one (``h100_nvlink_ib400``)."""
    path = name_or_path
    if not os.path.isfile(path):
        path = os.path.join(PROFILE_DIR, f"{name_or_path}.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"profile {name_or_path!r} is neither a file nor a shipped profile; use a path "
            f"written by `python -m distseq.planner calibrate` or one of {shipped_profiles()}"
        )
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"profile {path} is not valid JSON ({exc})") from None
    return Profile.from_dict(data)
