"""Per-step metrics: a progress bar and one line per step on stdout, ``metrics.jsonl`` on disk."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from distseq.memory.tracker import TensorPeak
from distseq.planner.spec import ModelSpec

# Dense bf16 peak FLOP/s per device, for the MFU estimate (override with log.peak_flops).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_memory_bytes(device: torch.device, tensors: TensorPeak | None = None) -> int:
    """Peak allocated CUDA memory; on a CPU the peak bytes of live tensors that ``tensors``
    (a :class:`~distseq.memory.tracker.TensorPeak` active during the steps) counted, not the
    resident set size (which includes the runtime, allocator caches and page-level noise)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if tensors is None:
        raise ValueError(
            f"peak_memory_bytes on {device.type} needs the TensorPeak tracker that was active "
            "during the steps (a CPU has no allocator counter)"
        )
    return tensors.peak


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """Training FLOPs per token of the model ``spec`` describes: ``6 N`` for the matmuls
    (blocks and output head, tied or not) plus causal attention scores
    (``6 * 2 * H * hd * seq / 2`` per softmax layer; linear layers add ``6 * 2 * H * hd^2``).
    Uses the packed length, an upper bound when documents are shorter."""
    hd, heads = spec.head_dim, spec.n_heads
    dense = 6 * (sum(spec.block_params) + spec.vocab_size * spec.d_model)
    mixer = sum(
        6 * heads * hd * seq_len if m == "softmax" else 12 * heads * hd * hd for m in spec.layers
    )
    return float(dense + mixer)


def drop_after(path: Path, step: int) -> None:
    """Keep only ``path``'s records of steps up to ``step`` (a resumed run re-runs the later
    ones; a line cut short by a crash is dropped too), replacing the file atomically."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", step + 1) <= step:
            kept.append(line + "\n")
    temp = path.with_name(path.name + ".tmp")
    temp.write_text("".join(kept), encoding="utf-8")
    os.replace(temp, path)


class MetricsLogger:
    """Rank 0 writes; other ranks only keep the history (returned by the trainer)."""

    def __init__(self, out_dir: str, total_steps: int, start_step: int, enabled: bool,
                 progress: bool) -> None:  # fmt: skip
        """A resumed run (``start_step > 0``) keeps the records of ``metrics.jsonl`` up to
        ``start_step`` and appends; a new one starts it afresh."""
        self.enabled = enabled
        self.history: list[dict] = []
        self._file = None
        self._bar = None
        if enabled:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            # Kept open for the whole run (one line per step); closed in close().
            mode = "a" if start_step else "w"
            path = Path(out_dir) / "metrics.jsonl"
            if start_step and path.is_file():
                drop_after(path, start_step)
            self._file = open(path, mode, encoding="utf-8")  # noqa: SIM115
            if progress:
                self._bar = tqdm(
                    total=total_steps, initial=start_step, desc="train", file=sys.stdout,
                    dynamic_ncols=True, leave=True,
                )  # fmt: skip

    def log(self, record: dict) -> None:
        self.history.append(record)
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        line = (
            f"step {record['step']} loss {record['loss']:.4f} lr {record['lr']:.2e} "
            f"tok/s {record['tokens_per_s']:.0f} ({record['tokens_per_s_per_rank']:.0f}/rank) "
            f"peak_mem {record['peak_mem_bytes'] / 2**20:.0f} MiB"
        )
        if "mfu" in record:
            line += f" mfu {record['mfu']:.1%}"
        if self._bar is not None:
            self._bar.write(line)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}")
            self._bar.update(1)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
