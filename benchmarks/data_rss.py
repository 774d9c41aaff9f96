"""Peak RSS per training rank vs corpus size: pre-tokenized shards are memory-mapped, so a
rank's memory must not grow with the corpus (``data.source: text`` holds it all, for contrast).

    python benchmarks/data_rss.py [--sizes-mb 10 50 --world 2 --steps 4 --baseline-text]

For each size: generate a random-word ``.txt`` corpus in a temp dir, ``prepare`` it into
shards (byte tokenizer), train ``configs/tiny.yaml`` for ``--steps`` steps on ``--world``
gloo ranks (sp = world), and report each rank's peak RSS (``ru_maxrss``; torch and the model
dominate it) plus the time to restore the loader at the corpus' last document (no replay).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import peak_rss_bytes  # noqa: E402
from distseq.train import Trainer, load_config, validate_config  # noqa: E402
from distseq.train.data import StepLoader, prepare  # noqa: E402

WORDS = [
    "".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=1 + i % 9))
    for i in range(5000)
]


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> None:
    """Blank-line separated documents of 50..5000 random words until ``megabytes``."""
    rng = random.Random(seed)
    target, written = megabytes * 1_000_000, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            text = " ".join(rng.choices(WORDS, k=rng.randint(50, 5000))) + "\n\n"
            out.write(text)
            written += len(text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cfg = validate_config(load_config(str(ROOT / "configs" / "tiny.yaml"), overrides), world)
    Trainer(cfg).fit()
    dist.destroy_process_group()
    Path(out, f"rss_{rank}").write_text(str(peak_rss_bytes()))


def train_peak_rss(world: int, overrides: list[str], workdir: Path) -> list[int]:
    """Peak RSS (bytes) of each of ``world`` training ranks."""
    workdir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank, args=(world, _free_port(), overrides, str(workdir)), nprocs=world)
    return [int((workdir / f"rss_{rank}").read_text()) for rank in range(world)]


def restore_seconds(overrides: list[str], documents: int) -> float:
    """Wall time of ``load_state_dict`` to the last document plus the next step."""
    cfg = validate_config(load_config(str(ROOT / "configs" / "tiny.yaml"), overrides), 1)
    loader = StepLoader(cfg, 0, 1)
    start = time.perf_counter()
    loader.load_state_dict({"document": documents - 1, "offset": 0})
    loader.next_step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    baseline = "also train from the .txt corpus (held whole in every rank)"
    parser.add_argument("--baseline-text", action="store_true", help=baseline)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes_mb:
            base = Path(tmp) / f"{size}mb"
            base.mkdir()
            corpus = base / "corpus.txt"
            write_corpus(corpus, size)
            start = time.perf_counter()
            meta = prepare([str(corpus)], str(base / "shards"), progress=False)
            prepared = time.perf_counter() - start
            common = [f"train.steps={args.steps}", "log.progress=false", "train.warmup_steps=1"]
            shards = [*common, "data.source=shards", f"data.paths=[{base / 'shards'}]"]
            row = {
                "size": size, "documents": meta["documents"], "tokens": meta["tokens"],
                "prepare_s": prepared,
                "shards": train_peak_rss(args.world, [*shards, f"out_dir={base}/run"],
                                         base / "rss"),
                "restore_s": restore_seconds([*shards, f"out_dir={base}/r"], meta["documents"]),
            }  # fmt: skip
            if args.baseline_text:
                text = [*common, "data.source=text", f"data.paths=[{corpus}]"]
                row["text"] = train_peak_rss(args.world, [*text, f"out_dir={base}/text"],
                                             base / "rss_text")  # fmt: skip
            rows.append(row)
            print(f"{size} MB: {meta['documents']} documents, {meta['tokens']} tokens, "
                  f"prepare {prepared:.1f} s", flush=True)  # fmt: skip
    mib = 1 << 20
    print(f"\npeak RSS per rank (MiB), {args.world} ranks (sp={args.world}), {args.steps} steps")
    for row in rows:
        line = f"  {row['size']:>4} MB corpus: shards " + " ".join(
            f"{r / mib:.0f}" for r in row["shards"]
        )
        if "text" in row:
            line += "   | text " + " ".join(f"{r / mib:.0f}" for r in row["text"])
        print(line + f"   | loader restore at the last document {row['restore_s'] * 1e3:.1f} ms")
    first, last = rows[0], rows[-1]
    for key in ("shards", "text"):
        if key in first:
            ratio = max(last[key]) / max(first[key])
            print(f"{key}: max rank peak RSS at {last['size']} MB / at {first['size']} MB = "
                  f"{ratio:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
