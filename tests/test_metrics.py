"""The metrics logger: only the main rank draws the progress bar, prints and writes."""

from __future__ import annotations

import json

from distseq.train.metrics import MetricsLogger

RECORD = {"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 10.0,
          "tokens_per_s_per_rank": 5.0, "peak_mem_bytes": 2**20}  # fmt: skip


def test_other_ranks_draw_and_write_nothing(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), 3, 0, enabled=False, progress=True)
    logger.log(RECORD)
    logger.close()
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""
    assert not (tmp_path / "metrics.jsonl").exists()
    assert logger.history == [RECORD]


def test_main_rank_draws_one_bar_and_logs_each_step(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), 3, 0, enabled=True, progress=True)
    logger.log(RECORD)
    logger.close()
    out = capsys.readouterr().out
    assert "step 1 loss 2.0000" in out and out.count("train:") >= 1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [RECORD]
