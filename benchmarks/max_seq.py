"""Longest sequence one rank can train under a fixed memory budget, memory savers off / on.

    python benchmarks/max_seq.py [--budget 248MiB] [--vocab 32768] [--quick] [--out DIR]

A large-vocabulary model (``d_model`` 256, vocabulary 32K, 4 layers, tied embeddings,
float32, AdamW; ``--vocab 131072 --budget 832MiB`` is issue 14's 128K model, about 4x the
compute per probed token, too slow for a loaded 2-core box) trains one step on one packed
sequence of random tokens (forward, backward, gradient all-reduce, AdamW update). Its peak
per rank is *measured*: the peak bytes of live CPU tensors
(:class:`distseq.memory.tracker.TensorPeak`: parameters, gradients, AdamW state,
activations, temporaries, communication buffers; the host copies of offloaded checkpoints
are host memory and not counted, as on a GPU), max over ranks. The longest length that fits
``--budget`` is searched on measured peaks only: lengths double until one does not fit, then
the bracket ``[fits, does not fit]`` narrows (each probe placed by interpolating the two
bracketing measurements, i.e. regula falsi, then halving) until it is within
``max(16, longest / 16)`` tokens. Nothing is extrapolated: the answer is a measured length
that fits next to a measured one that does not.

Next to each measured peak, the planner's memory model (:func:`predicted_peak`) for the same
length and settings: ``planner error`` is ``predicted / measured - 1`` at the longest length.

Savers are added one at a time (``LADDER``: activation checkpointing, the fused chunked loss,
the tiled MLP, offloaded checkpoints) at sp = 1 (softmax), and all off / all on at sp = 2 for
ring (softmax) and lasp2 (linear attention). Printed side by side as ratios to all-off; saved
as ``max_seq.json`` / ``max_seq.md`` and ``max_seq.png`` (matplotlib) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from _common import environment

from distseq.comm import run_ranks
from distseq.memory import MemoryConfig
from distseq.memory.tracker import TensorPeak
from distseq.models import Decoder, ModelConfig, SequenceContext
from distseq.planner import Cluster, CostModel, load_profile
from distseq.planner.spec import ModelSpec
from distseq.planner.units import format_bytes, parse_bytes

MODEL = dict(vocab_size=32768, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
             ffn_hidden=688, tie_embeddings=True)  # fmt: skip
# --quick: the same shape of model, small enough for a smoke run (and the planner test).
QUICK_MODEL = {**MODEL, "vocab_size": 8192, "d_model": 64, "n_layers": 2, "ffn_hidden": 176}
UNIT = 16  # lengths are multiples of it (zigzag at sp = 2 needs 4)
CHUNK = 64  # memory.loss_chunk_tokens: chunk logits of 64 x 32K x 4 B = 8 MiB


@dataclass(frozen=True)
class Setting:
    name: str
    checkpointing: bool
    memory: MemoryConfig


OFF = MemoryConfig(loss_chunk_tokens=0, mlp_tiles=1, offload_checkpoints=False)
LADDER = (
    Setting("all off", False, OFF),
    Setting("+ checkpointing", True, OFF),
    Setting("+ chunked loss", True, MemoryConfig(CHUNK, 1, False)),
    Setting("+ tiled MLP", True, MemoryConfig(CHUNK, "auto", False)),
    Setting("+ offload (all on)", True, MemoryConfig(CHUNK, "auto", True)),
)
# (sp, mixer, strategy, settings)
CASES = (
    (1, "softmax", "ring", LADDER),
    (2, "softmax", "ring", (LADDER[0], LADDER[-1])),
    (2, "linear", "lasp2", (LADDER[0], LADDER[-1])),
)


class Trainee:
    """This rank's model and optimizer; :meth:`peak` measures one training step."""

    def __init__(self, mixer: str, strategy: str, model: dict) -> None:
        torch.manual_seed(0)
        self.model = Decoder(ModelConfig(**model, mixers=mixer))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), foreach=False)
        self.mixer, self.strategy = mixer, strategy
        self.vocab = model["vocab_size"]
        self.step(UNIT * dist.get_world_size(), LADDER[0])  # creates the AdamW state

    def step(self, length: int, setting: Setting) -> None:
        self.model.checkpoint_blocks = setting.checkpointing
        self.model.memory = setting.memory
        ctx = SequenceContext.build([length], group=None, attention_strategy=self.strategy,
                                    linear_strategy=self.strategy)  # fmt: skip
        gen = torch.Generator().manual_seed(length)
        tokens = ctx.shard_tokens(torch.randint(self.vocab, (1, length), generator=gen))
        labels = tokens.roll(-1, 1)
        self.model(tokens, ctx, labels).backward()
        for param in self.model.parameters():  # data-parallel gradient sum, in place
            dist.all_reduce(param.grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def peak(self, length: int, setting: Setting) -> int:
        """Peak live tensor bytes of one step, max over ranks."""
        tracker = TensorPeak()
        states = [t for s in self.optimizer.state.values() for t in s.values()]
        tracker.track([*self.model.parameters(), *self.model.buffers(), *states])
        with tracker:
            self.step(length, setting)
        peak = torch.tensor([tracker.peak], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return int(peak)


def predicted_peak(model: dict, sp: int, mixer: str, strategy: str, setting: Setting,
                   length: int) -> float:  # fmt: skip
    """The planner's memory model (:class:`distseq.planner.CostModel`, float32 CPU profile,
    AdamW replicas: 16 bytes per parameter) for one ``length`` sequence at ``sp`` ranks."""
    spec = ModelSpec.from_config(ModelConfig(**model, mixers=mixer))
    cost = CostModel(spec, load_profile("cpu_gloo"), Cluster(sp, sp, 2**50), bytes_per_param=16.0,
                     shard_states=False, activation_checkpointing=setting.checkpointing,
                     linear_layout="zigzag" if sp > 1 else "contiguous",
                     memory=setting.memory)  # fmt: skip
    combo = next(c for c in cost.combos(sp) if sp == 1 or dict(c)[mixer] == strategy)
    return float(cost.group_cost(sp, combo).memory(length))


def _round(length: float) -> int:
    return max(UNIT, int(length) // UNIT * UNIT)


def longest(measure, budget: int, start: int) -> dict:
    """Longest measured length whose peak fits ``budget``; every probe is recorded."""
    probes: dict[int, int] = {}

    def fits(length: int) -> bool:
        probes[length] = measure(length)
        return probes[length] <= budget

    lo, hi = 0, start
    if fits(start):  # double until one does not fit
        while fits(hi * 2):
            hi *= 2
        lo, hi = hi, hi * 2
    else:  # halve until one fits (or none does)
        while hi > UNIT and not fits(_round(hi / 2)):
            hi = _round(hi / 2)
        lo = _round(hi / 2) if hi > UNIT else 0
    while lo and hi - lo > max(UNIT, lo // 16):
        m_lo, m_hi = probes[lo], probes[hi]
        guess = lo + (budget - m_lo) * (hi - lo) / max(m_hi - m_lo, 1)
        mid = min(max(_round(guess), lo + UNIT), hi - UNIT)
        if mid in probes:
            mid = _round((lo + hi) / 2)
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return {"max_seq_len": lo, "first_too_long": hi,
            "probes": {str(n): m for n, m in sorted(probes.items())}}  # fmt: skip


def search_case(rank: int, world: int, mixer: str, strategy: str, settings, budget: int,
                model: dict, start: int) -> list[dict]:  # fmt: skip
    """Every setting's longest length on this world (run on each rank; rank 0's answer)."""
    trainee = Trainee(mixer, strategy, model)
    rows = []
    for setting in settings:
        began = time.perf_counter()

        def measure(length: int, setting=setting, began=began) -> int:
            peak = trainee.peak(length, setting)
            if rank == 0:
                print(
                    f"  sp={world} {strategy} {setting.name}: {length} tokens -> "
                    f"{format_bytes(peak)} ({time.perf_counter() - began:.0f} s)",
                    flush=True,
                )
            return peak

        # Each setting adds a saver to the previous one: start where that one stopped.
        start = max(start, _round(rows[-1]["max_seq_len"]) if rows else 0)
        found = longest(measure, budget, start)
        rows.append({"sp": world, "mixer": mixer, "strategy": strategy,
                     "setting": setting.name, "checkpointing": setting.checkpointing,
                     "memory": asdict(setting.memory), **found,
                     "search_s": time.perf_counter() - began})  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| sp | mixer (strategy) | setting | longest sequence | x all off | planner error |",
             "|---:|---|---|---:|---:|---:|"]  # fmt: skip
    base = {}
    for r in rows:
        key = (r["sp"], r["mixer"])
        base.setdefault(key, r["max_seq_len"])
        ratio = r["max_seq_len"] / base[key] if base[key] else float("inf")
        error = r.get("planner_error", {}).get(str(r["max_seq_len"]), float("nan"))
        lines.append(f"| {r['sp']} | {r['mixer']} ({r['strategy']}) | {r['setting']} | "
                     f"{r['max_seq_len']} | {ratio:.1f}x | {error:+.1%} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: str, budget: int, model: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"sp={r['sp']} {r['strategy']}\n{r['setting']}" for r in rows]
    colors = {(1, "softmax"): "C0", (2, "softmax"): "C1", (2, "linear"): "C2"}
    ax.barh(range(len(rows)), [r["max_seq_len"] for r in rows],
            color=[colors.get((r["sp"], r["mixer"]), "C3") for r in rows])  # fmt: skip
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(
        f"longest sequence (tokens, sp=2: over both ranks) under {format_bytes(budget)}"
        " per rank, measured"
    )
    ax.set_title(
        f"d_model {model['d_model']}, vocab {model['vocab_size']}, {model['n_layers']} "
        "layers, fp32 + AdamW, CPU tensor peak",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="248MiB", help="per-rank tensor memory budget")
    parser.add_argument("--vocab", type=int, default=MODEL["vocab_size"])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2 layers, d_model 64, vocabulary 8K, 40MiB")  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results/max_seq")
    parser.add_argument("--render", action="store_true",
                        help="only redo --out's table, planner errors and plot")  # fmt: skip
    args = parser.parse_args()
    if args.render:
        render(args.out)
        return
    model, budget, start = {**MODEL, "vocab_size": args.vocab}, parse_bytes(args.budget), 256
    if args.quick:
        model = dict(QUICK_MODEL)
        budget, start = parse_bytes("40MiB"), 64
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for sp, mixer, strategy, settings in CASES:
        rows += run_ranks(sp, search_case, mixer, strategy, settings, budget, model, start)[0]
        print(table(rows), flush=True)
    result = {"budget_bytes": budget, "model": model, "loss_chunk_tokens": CHUNK,
              "rows": rows, "environment": environment("gloo", 1)}  # fmt: skip
    with open(os.path.join(args.out, "max_seq.json"), "w") as f:
        json.dump(result, f, indent=1)
    render(args.out)


def render(out: str) -> None:
    """``max_seq.md`` and ``max_seq.png`` from ``max_seq.json`` (planner errors recomputed
    from its measured probes with the current memory model)."""
    with open(os.path.join(out, "max_seq.json")) as f:
        result = json.load(f)
    budget, model, rows = result["budget_bytes"], result["model"], result["rows"]
    for r in rows:
        setting = Setting(r["setting"], r["checkpointing"], MemoryConfig(**r["memory"]))
        r["planner_error"] = {
            n: predicted_peak(model, r["sp"], r["mixer"], r["strategy"], setting, int(n)) / peak - 1
            for n, peak in r["probes"].items()
        }
    with open(os.path.join(out, "max_seq.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "max_seq.md"), "w") as f:
        chunk = result["loss_chunk_tokens"]
        f.write(f"Budget {format_bytes(budget)} per rank, model {model}, "
                f"memory.loss_chunk_tokens={chunk}.\n\n{table(rows)}\n")  # fmt: skip
    plot(rows, os.path.join(out, "max_seq.png"), budget, model)
    print(table(rows))
    print(f"wrote {out}/max_seq.json, max_seq.md, max_seq.png")


if __name__ == "__main__":
    main()
