"""A Hugging Face Llama under sequence parallelism vs the unpatched model on one process.

    python benchmarks/hf_sp.py [--seq 4096 --sps 1 2 4 --strategies ring ulysses allgather]

Model: ``LlamaForCausalLM`` with random weights from a config (default hidden 256, 4 layers,
8 query / 4 key-value heads, vocab 8192), float32, one sequence of ``--seq`` random tokens,
forward + backward. Baseline: the unpatched model (transformers' ``sdpa`` attention and its
own loss, ``labels=input_ids``) in one process with ``min(sp × threads-per-rank, CPUs)``
threads, one baseline per thread count, in the same invocation. Then, for each ``sp``, ``sp``
processes (gloo) with ``--threads-per-rank`` threads each run the same model after
:func:`distseq.hf.apply`, fed by :func:`distseq.hf.shard_batch`, with
:func:`distseq.hf.causal_lm_loss`. Printed per (sp, strategy): the best of ``--repeats``
step times of the slowest rank (best-of: it is meant to run on shared machines), tokens/s of
the whole sequence and its ratio to the baseline's, bytes sent per rank (``CommCounter``)
next to the strategy's ``traffic()`` times the number of layers (plus the loss's one
all-reduce of its token count), the peak tensor bytes per rank (``MemTracker``) and its ratio
to the baseline's, the peak resident set size per rank (torch and transformers included), and
the relative difference of the ranks' summed loss from the baseline's loss (same weights,
same tokens). At ``sp = 1`` only the first strategy runs. With more ranks than cores the
ranks share cores.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from _common import peak_rss_since_reset, reset_peak_rss, timed
from torch.distributed._tools.mem_tracker import MemTracker

import distseq
import distseq.hf
from distseq.comm import run_ranks
from distseq.layout import chunks_per_rank
from distseq.strategies import ATTENTION_STRATEGIES


def _model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=args.seq, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)  # the same weights in every process
    return LlamaForCausalLM(config)


def _tokens(args) -> torch.Tensor:
    """``[1, seq]``, identical in every process."""
    return torch.randint(args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(1))


def _measure(model: torch.nn.Module, step, repeats: int) -> dict:
    """Step times and the peak RSS while stepping; then one more step's loss, bytes sent
    (``CommCounter``) and peak tensor bytes (``MemTracker``: parameters, gradients,
    activations, temporaries, communication buffers)."""
    reset_peak_rss()
    times = timed(step, repeats)
    peak_rss = peak_rss_since_reset()
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker, distseq.CommCounter() as counter:
        loss = step()
    peak = int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
    return {"times": times, "peak_rss_bytes": peak_rss, "peak_tensor_bytes": peak,
            "bytes_sent": counter.bytes_sent, "loss": float(loss)}  # fmt: skip


def _baseline(rank: int, world: int, args) -> dict:
    model = _model(args)
    ids = _tokens(args)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach()

    return _measure(model, step, args.repeats)


def _worker(rank: int, world: int, args) -> dict:
    model = _model(args)
    local = distseq.hf.shard_batch(_tokens(args), layout=args.layout)
    labels = local.pop("labels")
    rows = {}
    for strategy in _strategies(args, world):
        distseq.hf.apply(model, strategy=strategy, layout=args.layout)

        def step():
            model.zero_grad(set_to_none=True)
            loss = distseq.hf.causal_lm_loss(model(**local).logits, labels)
            loss.backward()
            return loss.detach()

        dist.barrier()
        rows[strategy] = _measure(model, step, args.repeats)
    return rows


def _strategies(args, sp: int) -> list[str]:
    """The requested strategies that can run the model's heads over ``sp`` ranks; at
    ``sp = 1`` only the first (none sends anything; they all do the same local work)."""
    usable = []
    for strategy in args.strategies:
        try:
            ATTENTION_STRATEGIES.check(strategy, sp, args.heads, args.kv_heads, args.layout)
        except ValueError:
            continue
        usable.append(strategy)
    return usable[:1] if sp == 1 else usable


def _formula_bytes(args, strategy: str, sp: int) -> float:
    """The strategy's ``traffic()`` per attention layer times the layers, plus the loss's one
    all-reduce of a float64 token count (``2(P-1)/P · 8`` bytes, as ``CommCounter`` counts)."""
    per_layer = ATTENTION_STRATEGIES.get(strategy).traffic(
        sp, args.seq // sp, args.heads, args.kv_heads, args.hidden // args.heads, 4
    )
    return per_layer.total * args.layers + 2 * 8 * (sp - 1) // sp


def _baseline_threads(args, sp: int) -> int:
    return min(sp * args.threads_per_rank, os.cpu_count() or 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--sps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    parser.add_argument("--strategies", nargs="+", default=["ring", "ulysses", "allgather"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    for name in args.strategies:
        ATTENTION_STRATEGIES.get(name)  # an unknown name fails here, before any process starts
    for sp in args.sps:  # the formula assumes no padding
        multiple = sp * chunks_per_rank(args.layout)
        if args.seq % multiple:
            parser.error(f"--seq {args.seq} is not a multiple of {multiple} (sp={sp}, "
                         f"layout={args.layout}); pick a multiple of it")  # fmt: skip

    import transformers

    baselines = {}
    for threads in sorted({_baseline_threads(args, sp) for sp in args.sps}):
        (baselines[threads],) = run_ranks(1, _baseline, args, threads=threads)
    per_sp = {sp: run_ranks(sp, _worker, args, threads=args.threads_per_rank)
              for sp in args.sps}  # fmt: skip

    head_dim = args.hidden // args.heads
    print(f"HF LlamaForCausalLM fwd+bwd, hidden {args.hidden}, {args.layers} layers, "
          f"heads {args.heads}/{args.kv_heads} (D={head_dim}), vocab {args.vocab}, "
          f"N={args.seq}, fp32, layout={args.layout}; best of {args.repeats}; torch "
          f"{torch.__version__}, transformers {transformers.__version__}, "
          f"{os.cpu_count()} CPUs, gloo, {args.threads_per_rank} thread(s) per rank")  # fmt: skip
    for threads, single in baselines.items():
        t = min(single["times"])
        print(f"unpatched (sdpa, HF loss), 1 process, {threads} thread(s): {t:.3f} s, "
              f"{args.seq / t:.0f} tokens/s, peak tensors "
              f"{single['peak_tensor_bytes'] / 2**20:.0f} MiB, peak RSS "
              f"{single['peak_rss_bytes'] / 2**20:.0f} MiB")  # fmt: skip
    print()
    print("| sp | strategy | t_step (s) | tokens/s | vs unpatched | MiB sent/rank | "
          "formula | peak tensors/rank (MiB) | vs unpatched | peak RSS/rank (MiB) | "
          "loss rel diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    report = {"args": vars(args), "baselines": baselines, "rows": []}
    for sp, per_rank in per_sp.items():
        single = baselines[_baseline_threads(args, sp)]
        t_single = min(single["times"])
        for strategy in per_rank[0]:
            rows = [ranks[strategy] for ranks in per_rank]
            # A step ends when its slowest rank ends.
            t_sp = min(max(r["times"][i] for r in rows) for i in range(args.repeats))
            sent = max(r["bytes_sent"] for r in rows)
            formula = _formula_bytes(args, strategy, sp)
            tensors = max(r["peak_tensor_bytes"] for r in rows)
            rss = max(r["peak_rss_bytes"] for r in rows)
            loss = sum(r["loss"] for r in rows)
            diff = abs(loss - single["loss"]) / abs(single["loss"])
            print(f"| {sp} | {strategy} | {t_sp:.3f} | {args.seq / t_sp:.0f} | "
                  f"{t_single / t_sp:.2f} | {sent / 2**20:.3f} | {formula / 2**20:.3f} | "
                  f"{tensors / 2**20:.0f} | {tensors / single['peak_tensor_bytes']:.2f} | "
                  f"{rss / 2**20:.0f} | {diff:.1e} |")  # fmt: skip
            report["rows"].append({"sp": sp, "strategy": strategy, "t_sp": t_sp,
                                   "ratio": t_single / t_sp, "bytes_sent": sent,
                                   "formula_bytes": formula, "peak_tensor_bytes": tensors,
                                   "peak_rss_bytes": rss, "loss_rel_diff": diff})  # fmt: skip
    print("\nformula = traffic() × layers + the loss's all-reduce of a float64 token count.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
