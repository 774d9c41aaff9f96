"""Weak and strong scaling of one training step, per strategy, over 1..8 processes (real runs).

    python benchmarks/scaling.py [--quick] [--out benchmarks/results/scaling]     # driver
    torchrun --nproc-per-node P benchmarks/scaling.py [--out DIR]                 # one world

The driver launches one ``torchrun`` per world size (``--standalone``), plus, for each of
``--two-node-worlds``, two ``torchrun`` agents on 127.0.0.1 that meet through the c10d
rendezvous (``--nnodes 2``) like two machines would, then merges their results into
``scaling.json``, ``scaling.csv`` and PNG plots in ``--out``.

One step of the ``--config`` model (``configs/bench_small.yaml``) on one packed sequence of
``seq_len`` random tokens (one document, batch 1, float32, gloo, one thread per rank), for
each mixer and strategy of :data:`SUITE`: forward + backward (the sequence-parallel
communication), then one flat all-reduce (sum) of the gradients, then AdamW. The gradient
all-reduce is data-parallel traffic that any strategy pays alike: it is timed as part of the
step but kept out of ``bytes_*`` (``grad_allreduce_bytes_per_rank`` has it) and out of the
hidden fraction. Weak scaling fixes the tokens per rank, strong scaling the total.

Per row: ``step_time_s`` (median over repeats of the slowest rank; ranks start each step
together after a barrier), ``tokens_per_s``, ``efficiency`` (weak: ``t(1) / t(P)``; strong:
``t(1) / (P t(P))``, both against the same mixer and strategy at P = 1), bytes sent and
received per rank in forward + backward (``CommCounter``, max over ranks) next to
the strategies' ``traffic()``, the hidden-communication fraction
(:func:`distseq.comm.hidden_comm_fraction` of the forward + backward time with real
communication, with communication replayed from a recording, and of the same ops alone),
``peak_mem_bytes``: the peak bytes of live tensors per rank during one step (torch's
``MemTracker``, on CPU: parameters, gradients, AdamW state, activations, temporaries,
communication buffers; max over ranks) and ``peak_rss_bytes``, the peak resident set size
during the timed steps (``VmHWM`` after resetting it; includes the ~0.4 GB torch runtime).

Longest sequence under a per-rank memory budget (``max_seq``): extrapolated, not bisected.
Per world and strategy, the peak tensor bytes of forward + backward (the part that grows with
the sequence; the update's peak is fixed) are measured at two sequence lengths (the weak
length and a quarter of it), a line is fitted through the two points and solved for
``--budget``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import environment, peak_rss_since_reset, reset_peak_rss
from torch.distributed._tools.mem_tracker import MemTracker

from distseq.comm import CommCounter, CommRecorder, hidden_comm_fraction
from distseq.comm.launch import exit_process
from distseq.models import Decoder, SequenceContext, layer_mixers
from distseq.planner.units import parse_bytes
from distseq.strategies import ATTENTION_STRATEGIES, LINEAR_STRATEGIES
from distseq.train import load_config, validate_config
from distseq.train.config import Config
from distseq.train.engine import build_optimizer

# (label, mixer schedule, layout, softmax strategy, linear strategy)
SUITE = [
    ("ring", "softmax", "zigzag", "ring", "lasp2"),
    ("ulysses", "softmax", "zigzag", "ulysses", "lasp2"),
    ("allgather", "softmax", "zigzag", "allgather", "lasp2"),
    ("lasp2", "linear", "contiguous", "ring", "lasp2"),
    ("allscan", "linear", "contiguous", "ring", "allscan"),
    ("ring+lasp2", "hybrid", "zigzag", "ring", "lasp2"),
]
STRATEGY_LABELS = [entry[0] for entry in SUITE]
ELEM_BYTES = 4  # float32


# ------------------------------------------------------------------------------ worker side
def _config(args, entry, world: int, seq_len: int) -> Config:
    _, mixers, layout, softmax, linear = entry
    overrides = [
        f"model.mixers={mixers}", f"parallel.layout={layout}",
        f"parallel.attention_strategy={softmax}", f"parallel.linear_strategy={linear}",
        f"data.seq_len={seq_len}", "train.device=cpu",
    ]  # fmt: skip
    return validate_config(load_config(args.config, overrides), world)


def theory_bytes(cfg: Config, world: int, seq_len: int) -> int:
    """Bytes one rank sends in forward + backward of the model: the strategies' ``traffic()``."""
    m, par = cfg.model, cfg.parallel
    s_local, hd = seq_len // world, m.resolved_head_dim
    total = 0
    for mixer in layer_mixers(m):
        if mixer == "softmax":
            usp = [par.ulysses_degree] if par.attention_strategy == "usp" else []
            t = ATTENTION_STRATEGIES.get(par.attention_strategy).traffic(
                world, s_local, m.n_heads, m.n_kv_heads, hd, ELEM_BYTES, *usp
            )
        else:
            t = LINEAR_STRATEGIES.get(par.linear_strategy).traffic(
                world, 1, m.n_heads, hd, hd, par.layout
            )
        total += t.total
    return total


class _Step:
    """One training step of ``cfg``'s model on ``seq_len`` random tokens (one document)."""

    def __init__(self, cfg: Config, seq_len: int) -> None:
        self.world = dist.get_world_size()
        torch.manual_seed(cfg.train.seed)  # the same parameters on every rank
        self.model = Decoder(cfg.model)
        self.optimizer = build_optimizer(cfg, self.model)
        self.params = list(self.model.parameters())
        self.cfg = cfg
        self._allocate_optimizer_state()
        self.set_length(seq_len)

    def _allocate_optimizer_state(self) -> None:
        """One AdamW step at learning rate 0 on zero gradients (parameters unchanged), so
        every measured step, the first included, finds the same optimizer state resident."""
        for p in self.params:
            p.grad = torch.zeros_like(p)
        rates = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        self.optimizer.step()
        for group, lr in zip(self.optimizer.param_groups, rates):
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)

    def set_length(self, seq_len: int) -> None:
        par = self.cfg.parallel
        self.seq_len = seq_len
        self.ctx = SequenceContext.build(
            (seq_len,), layout=par.layout, attention_strategy=par.attention_strategy,
            linear_strategy=par.linear_strategy, attention_backend=par.attention_backend,
            linear_backend=par.linear_backend, ulysses_degree=par.ulysses_degree,
        )  # fmt: skip
        gen = torch.Generator().manual_seed(seq_len)
        full = torch.randint(self.cfg.model.vocab_size, (1, seq_len + 1), generator=gen)
        self.tokens = self.ctx.shard_tokens(full[:, :-1])
        self.targets = self.ctx.shard_tokens(full[:, 1:])

    def forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(self.tokens, self.ctx)
        loss = F.cross_entropy(logits.flatten(0, 1), self.targets.flatten(), reduction="sum")
        (loss / self.seq_len).backward()

    def update(self) -> None:
        """Sum the gradients over ranks (one flat bucket; each rank's loss is its share of
        the mean over all tokens), then AdamW."""
        if self.world > 1:
            grads = [p.grad for p in self.params]
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))
        self.optimizer.step()

    def timed_step(self) -> tuple[float, float]:
        """(forward + backward seconds, whole step seconds)."""
        dist.barrier()
        start = time.perf_counter()
        self.forward_backward()
        middle = time.perf_counter()
        self.update()
        return middle - start, time.perf_counter() - start


def _peak_tensor_bytes(step: _Step, phase) -> int:
    """Peak bytes of live CPU tensors while ``phase`` runs (parameters, gradients, AdamW
    state, activations, temporaries and communication buffers), by torch's ``MemTracker``."""
    tracker = MemTracker()
    tracker.track_external(step.model, step.optimizer)
    with tracker:
        phase()
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def step_memory(step: _Step) -> tuple[int, int]:
    """Peak tensor bytes of forward + backward (what grows with the sequence) and of the
    update (gradient all-reduce + AdamW, fixed), measured on one step."""
    dist.barrier()
    return (_peak_tensor_bytes(step, step.forward_backward),
            _peak_tensor_bytes(step, step.update))  # fmt: skip


def measure(args, entry, seq_len: int, memory_lengths: tuple[int, ...] = ()) -> dict:
    """This rank's measurements of one row (see the module docstring)."""
    world = dist.get_world_size()
    cfg = _config(args, entry, world, seq_len)
    step = _Step(cfg, seq_len)
    # The measured step doubles as the warm-up (allocator, AdamW state, first-touch pages).
    memory = {seq_len: step_memory(step)}
    with CommCounter() as counter, CommRecorder() as recorder:
        step.forward_backward()
    with CommCounter() as grad_counter:
        step.update()
    # Real, replayed and communication-only runs interleaved, so that each repeat's three
    # timings see the same machine load.
    reset_peak_rss()
    real, replay, alone = [], [], []
    for _ in range(args.repeats):
        real.append(step.timed_step())
        dist.barrier()
        with recorder.recording.replay():
            start = time.perf_counter()
            step.forward_backward()
            replay.append(time.perf_counter() - start)
        dist.barrier()
        alone.append(recorder.recording.run_alone())
    peak_rss = peak_rss_since_reset()
    result = {
        "fwd_bwd": [r[0] for r in real], "step": [r[1] for r in real],
        "replay": replay, "alone": alone, "peak_rss": peak_rss,
        "sent": counter.bytes_sent, "received": counter.bytes_received,
        "grad_sent": grad_counter.bytes_sent, "ops": len(recorder.recording.calls),
        "theory": theory_bytes(cfg, world, seq_len), "model": _model_dict(args, cfg),
    }  # fmt: skip
    del recorder
    for length in memory_lengths:
        if length not in memory:
            step.set_length(length)
            memory[length] = step_memory(step)
    result["memory"] = memory
    return result


def _model_dict(args, cfg: Config) -> dict:
    """The YAML's model section with the overrides this row used."""
    from omegaconf import OmegaConf

    section = OmegaConf.to_container(OmegaConf.load(args.config)).get("model", {})
    return {key: getattr(cfg.model, key) for key in section}


def _slowest(per_rank: list[dict], key: str) -> float:
    """Median over repeats of the slowest rank's time."""
    repeats = len(per_rank[0][key])
    return statistics.median(max(r[key][i] for r in per_rank) for i in range(repeats))


def worker(args) -> None:
    """Every row on this torchrun's world; rank 0 writes them to ``--part`` for the driver,
    or, when launched by hand without ``--part``, the outputs of this world alone."""
    started = time.perf_counter()
    torch.set_num_threads(args.threads_per_rank)
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    nnodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    rows, memory = [], []
    for mode in args.modes:
        for entry in SUITE:
            label, mixer, _, softmax, linear = entry
            if label not in args.strategies:
                continue
            seq_len = args.tokens_per_rank * world if mode == "weak" else args.total_tokens
            multiple = 2 * world
            seq_len = -(-seq_len // multiple) * multiple
            quarter = -(-(seq_len // 4) // multiple) * multiple
            lengths = (seq_len, quarter) if mode == "weak" else (seq_len,)
            mine = measure(args, entry, seq_len, lengths)
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
            if rank:
                continue
            t_fb, t_replay = _slowest(everyone, "fwd_bwd"), _slowest(everyone, "replay")
            t_comm = _slowest(everyone, "alone")
            step_time = _slowest(everyone, "step")
            rows.append({
                "mode": mode, "world": world, "nnodes": nnodes, "config": args.config,
                "model": mine["model"], "mixer": mixer, "strategy": label,
                "strategies": {"softmax": softmax, "linear": linear}, "layout": entry[2],
                "seq_len": seq_len, "batch": 1, "step_time_s": step_time,
                "tokens_per_s": seq_len / step_time, "efficiency": None,
                "bytes_sent_per_rank": max(r["sent"] for r in everyone),
                "bytes_received_per_rank": max(r["received"] for r in everyone),
                "bytes_theory_per_rank": mine["theory"],
                "grad_allreduce_bytes_per_rank": max(r["grad_sent"] for r in everyone),
                "hidden_comm_fraction": (
                    hidden_comm_fraction(t_fb, t_replay, t_comm) if mine["ops"] else None
                ),
                "t_fwd_bwd_s": t_fb, "t_replay_s": t_replay, "t_comm_s": t_comm,
                "comm_ops": mine["ops"],
                "peak_mem_bytes": max(max(r["memory"][seq_len]) for r in everyone),
                "peak_rss_bytes": max(r["peak_rss"] for r in everyone),
            })  # fmt: skip
            if mode == "weak":
                memory.append({"world": world, "nnodes": nnodes, "strategy": label, "points": {
                    str(n): max(r["memory"][n][0] for r in everyone) for n in lengths
                }})  # fmt: skip
    if rank == 0 and args.part:
        Path(args.part).write_text(json.dumps({"rows": rows, "memory": memory}))
    elif rank == 0:  # torchrun's own flags are not visible here: rebuilt from its environment
        local = os.environ.get("LOCAL_WORLD_SIZE", str(world))
        command = shlex.join(
            ["torchrun", f"--nnodes={nnodes}", f"--nproc-per-node={local}", *sys.argv]
        )
        finish(args, rows, memory, command, [], [world], started)
    dist.barrier()  # no rank tears gloo down while another is still using it
    dist.destroy_process_group()
    exit_process(0)


# ------------------------------------------------------------------------------ driver side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_args(args, part: str) -> list[str]:
    return [
        __file__, "--worker", "--part", part, "--config", args.config,
        "--repeats", str(args.repeats), "--tokens-per-rank", str(args.tokens_per_rank),
        "--total-tokens", str(args.total_tokens), "--threads-per-rank",
        str(args.threads_per_rank), "--modes", *args.modes, "--strategies", *args.strategies,
    ]  # fmt: skip


def launches(args, tmp: str) -> list[tuple[list[list[str]], str]]:
    """The torchrun command lines (one per agent) of every launch, and its result file."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    out = []
    for world in args.worlds:
        part = os.path.join(tmp, f"world{world}.json")
        cmd = [*torchrun, "--standalone", f"--nproc-per-node={world}", *_worker_args(args, part)]
        out.append(([cmd], part))
    for world in args.two_node_worlds:
        part = os.path.join(tmp, f"world{world}_2nodes.json")
        endpoint = f"127.0.0.1:{_free_port()}"
        # c10d rendezvous assigns node ranks (torchrun ignores --node-rank with it).
        cmd = [*torchrun, "--nnodes=2", f"--nproc-per-node={world // 2}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint={endpoint}", f"--rdzv-id=scaling{world}",
               *_worker_args(args, part)]  # fmt: skip
        out.append(([cmd, cmd], part))
    return out


def _run(commands: list[list[str]], log_path: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log_path, "w") as log:
        procs = [subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT, env=env)
                 for c in commands]  # fmt: skip
        codes = [p.wait() for p in procs]
    if any(codes):
        tail = Path(log_path).read_text()[-4000:]
        raise RuntimeError(f"{shlex.join(commands[0])} exited with {codes}:\n{tail}")


def add_efficiency(rows: list[dict]) -> None:
    """Weak: ``t(1)/t(P)``; strong: ``t(1)/(P t(P))`` (same mode, mixer, strategy, nnodes 1)."""
    base = {(r["mode"], r["strategy"]): r for r in rows if r["world"] == 1}
    for r in rows:
        one = base.get((r["mode"], r["strategy"]))
        if one is None:
            continue
        ratio = one["step_time_s"] / r["step_time_s"]
        r["efficiency"] = ratio if r["mode"] == "weak" else ratio / r["world"]


def max_sequences(memory: list[dict], budget: int) -> list[dict]:
    """Solve the line through the two measured (seq_len, memory) points for ``budget``."""
    out = []
    for entry in memory:
        (n1, m1), (n2, m2) = sorted((int(n), m) for n, m in entry["points"].items())
        slope = (m2 - m1) / (n2 - n1)
        intercept = m1 - slope * n1
        multiple = 2 * entry["world"]
        longest = int((budget - intercept) / slope) // multiple * multiple if slope > 0 else 0
        out.append({
            "world": entry["world"], "nnodes": entry["nnodes"], "strategy": entry["strategy"],
            "budget_bytes": budget,
            "max_seq_len": max(0, longest), "bytes_per_token": slope,
            "fixed_bytes": intercept, "measured": {str(n1): m1, str(n2): m2},
        })  # fmt: skip
    return out


CSV_FIELDS = [
    "mode", "world", "nnodes", "mixer", "strategy", "layout", "seq_len", "batch",
    "step_time_s", "tokens_per_s", "efficiency", "bytes_sent_per_rank",
    "bytes_received_per_rank", "bytes_theory_per_rank", "grad_allreduce_bytes_per_rank",
    "hidden_comm_fraction", "t_fwd_bwd_s", "t_replay_s", "t_comm_s", "peak_mem_bytes",
]  # fmt: skip


def write_outputs(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(report, indent=1))
    with open(out / "scaling.csv", "w", newline="") as f:
        f.write(f"# command: {report['command']}\n# env: {json.dumps(report['env'])}\n")
        writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(report["rows"])
    from scaling_plots import plot_all

    plot_all(report, out)


def print_table(report: dict) -> None:
    print(f"{'mode':<6} {'P':>2} {'n':>1} {'strategy':<10} {'seq':>6} {'step s':>7} "
          f"{'tok/s':>7} {'eff':>5} {'KiB sent':>9} {'theory':>9} {'hidden':>6} "
          f"{'MiB peak':>8}")  # fmt: skip
    for r in report["rows"]:
        eff = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "-"
        hidden = r["hidden_comm_fraction"]
        hidden = "-" if hidden is None else f"{min(1.0, max(0.0, hidden)):.2f}"
        print(f"{r['mode']:<6} {r['world']:>2} {r['nnodes']:>1} {r['strategy']:<10} "
              f"{r['seq_len']:>6} {r['step_time_s']:>7.3f} {r['tokens_per_s']:>7.0f} {eff:>5} "
              f"{r['bytes_sent_per_rank'] / 1024:>9.1f} "
              f"{r['bytes_theory_per_rank'] / 1024:>9.1f} {hidden:>6} "
              f"{r['peak_mem_bytes'] / 2**20:>8.0f}")  # fmt: skip
    for m in report["max_seq"]:
        print(
            f"max_seq P={m['world']} nnodes={m['nnodes']} {m['strategy']:<10} "
            f"{m['max_seq_len']:>8} tokens under {m['budget_bytes'] / 2**20:.0f} MiB"
        )


def markdown(report: dict) -> str:
    """The README tables of a report: one row per (mode, P, nodes, strategy), then max_seq."""
    lines = [
        "| mode | P | nodes | strategy | seq | step (s) | tokens/s | eff | KiB sent/rank "
        "(formula) | hidden (raw) | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        eff = "-" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
        h = r["hidden_comm_fraction"]
        hidden = "-" if h is None else f"{min(1.0, max(0.0, h)):.2f} ({h:+.2f})"
        lines.append(
            f"| {r['mode']} | {r['world']} | {r['nnodes']} | {r['strategy']} | {r['seq_len']} "
            f"| {r['step_time_s']:.3f} | {r['tokens_per_s']:.0f} | {eff} "
            f"| {r['bytes_sent_per_rank'] / 1024:.1f} ({r['bytes_theory_per_rank'] / 1024:.1f}) "
            f"| {hidden} | {r['peak_mem_bytes'] / 2**20:.1f} |"
        )
    single = [m for m in report["max_seq"] if m["nnodes"] == 1]
    worlds = sorted({m["world"] for m in single})
    budget = single[0]["budget_bytes"] / 2**20 if single else 0
    lines += ["", f"| longest sequence under {budget:.0f} MiB/rank | "
              + " | ".join(f"P={w}" for w in worlds) + " |",
              "|---|" + "---|" * len(worlds)]  # fmt: skip
    for strategy in dict.fromkeys(m["strategy"] for m in single):
        cells = {m["world"]: m["max_seq_len"] for m in single if m["strategy"] == strategy}
        lines.append(f"| {strategy} | " + " | ".join(str(cells.get(w, "-")) for w in worlds) + " |")
    return "\n".join(lines)


def driver(args) -> None:
    started = time.perf_counter()
    rows, memory, commands = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for cmds, part in launches(args, tmp):
            commands += [shlex.join(c) for c in cmds]
            print(f"[scaling] {shlex.join(cmds[0])}" + (" (x2 agents)" if len(cmds) > 1 else ""),
                  flush=True)  # fmt: skip
            _run(cmds, part + ".log")
            data = json.loads(Path(part).read_text())
            rows += data["rows"]
            memory += data["memory"]
    command = shlex.join(["python", *sys.argv])
    finish(args, rows, memory, command, commands, [*args.worlds, *args.two_node_worlds], started)


def finish(args, rows, memory, command: str, commands, worlds, started: float) -> None:
    """Efficiency and max_seq, then the JSON / CSV / plots and the table on stdout."""
    add_efficiency(rows)
    env = environment("gloo", args.threads_per_rank)
    env.update({
        "oversubscribed_worlds": sorted(
            {w for w in worlds if w * args.threads_per_rank > env["cpu_count"]}
        ),
        "peak_mem_kind": "peak bytes of live CPU tensors of the rank during one step "
                         "(torch.distributed._tools.mem_tracker.MemTracker: parameters, "
                         "gradients, AdamW state, activations, temporaries, communication "
                         "buffers); peak_rss_bytes: peak resident set size (VmHWM) during the "
                         "timed steps, torch runtime included",
        "sp_bytes": "forward+backward sequence-parallel traffic, max over ranks; the gradient "
                    "all-reduce is in grad_allreduce_bytes_per_rank",
        "max_seq_method": "extrapolated: line through the step's peak tensor memory "
                          "(MemTracker) at the weak length and a quarter of it, per world "
                          "and strategy, solved for the budget",
        "torchrun_commands": commands,
    })  # fmt: skip
    report = {
        "command": command,
        "env": env,
        "rows": rows,
        "max_seq": max_sequences(memory, parse_bytes(args.budget)),
    }
    env["wall_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    write_outputs(report, out)
    print_table(report)
    print(f"[scaling] wrote {out}/scaling.json, scaling.csv, *.png in {env['wall_s']:.0f} s")


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bench_small.yaml")
    parser.add_argument("--out", default="benchmarks/results/scaling")
    parser.add_argument("--worlds", type=int, nargs="+",
                        help="single-node world sizes (default 1 2 4 8; --quick: 1 2)")  # fmt: skip
    parser.add_argument("--two-node-worlds", type=int, nargs="*", default=[4],
                        help="worlds also run as two torchrun agents on 127.0.0.1")  # fmt: skip
    parser.add_argument("--modes", nargs="+", default=["weak", "strong"],
                        choices=["weak", "strong"])  # fmt: skip
    parser.add_argument("--strategies", nargs="+", default=STRATEGY_LABELS,
                        choices=STRATEGY_LABELS)  # fmt: skip
    parser.add_argument("--tokens-per-rank", type=int, default=512, help="weak scaling")
    parser.add_argument("--total-tokens", type=int, default=2048, help="strong scaling")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--budget", default="256MiB", help="per-rank memory for max_seq")
    parser.add_argument("--quick", action="store_true",
                        help="P <= 2, tiny shapes, 1 repeat, no two-node run")  # fmt: skip
    parser.add_argument("--markdown", metavar="JSON",
                        help="print the README tables of a scaling.json and exit")  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.two_node_worlds, args.repeats = [], 1
        args.tokens_per_rank, args.total_tokens = 128, 256
    if args.worlds is None:
        args.worlds = [1, 2] if args.quick else [1, 2, 4, 8]
    for w in args.two_node_worlds:
        if w % 2:
            raise SystemExit(f"--two-node-worlds {w}: needs an even world (two agents)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
    elif args.worker or "TORCHELASTIC_RUN_ID" in os.environ:  # launched by torchrun
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
