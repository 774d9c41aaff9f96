"""``python -m distseq.data prepare --input FILES [--tokenizer DIR] --out DIR``."""

from __future__ import annotations

import argparse
import sys

from distseq.train.data.prepare import DEFAULT_SHARD_TOKENS, prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distseq.data")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser(
        "prepare",
        help="tokenize documents into memory-mapped shards for data.source=shards",
    )
    cmd.add_argument("--input", nargs="+", required=True, metavar="FILE",
                     help=".txt (blank-line separated), .jsonl, .parquet / .arrow files or "
                     "Hugging Face datasets saved to disk")  # fmt: skip
    cmd.add_argument("--out", required=True, metavar="DIR", help="shard directory to write")
    cmd.add_argument("--tokenizer", metavar="DIR",
                     help="local Hugging Face tokenizer directory (default: bytes)")  # fmt: skip
    cmd.add_argument("--key", default="text", help="JSONL field / dataset column (text)")
    cmd.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                     help="tokens per shard file before a new one starts")  # fmt: skip
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.input, args.out, args.tokenizer, args.key, args.shard_tokens,
                       progress=not args.quiet)  # fmt: skip
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {meta['documents']} documents, {meta['tokens']} tokens "
          f"({meta['dtype']}) in {len(meta['shards'])} shard(s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
