"""Pre-tokenized shards: ``prepare`` (text / JSONL / Arrow inputs), the lazy validating
reader, loader state restored without replay, and prepare -> train -> resume."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import train_cases
from distseq.data.__main__ import main as cli_main
from distseq.train.data import DocumentLoader, ShardCorpus, StepLoader, prepare, read_meta
from distseq.train.data.loader import document_source
from distseq.train.data.shards import token_dtype
from distseq.train.data.sources import ShardSource

TEXTS = [f"document {i} " + "abcdefghij" * (i % 7 + 1) for i in range(40)]


@pytest.fixture
def corpus(tmp_path):
    """Two inputs (.txt and .jsonl) prepared into shards of at most ~300 tokens."""
    (tmp_path / "a.txt").write_text("\n\n".join(TEXTS[:20]) + "\n")
    lines = [json.dumps({"body": text}) for text in TEXTS[20:]]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    out = tmp_path / "shards"
    meta = prepare(inputs, str(out), key="body", shard_tokens=300, progress=False)
    return out, meta


def test_prepare_writes_documents_index_and_header(corpus):
    out, meta = corpus
    assert meta == read_meta(out)
    assert (meta["dtype"], meta["vocab_size"], meta["documents"]) == ("uint16", 256, 40)
    assert meta["tokens"] == sum(len(t.encode()) for t in TEXTS) and len(meta["shards"]) > 1
    data = ShardCorpus([str(out)])
    for index in (0, 19, 20, 39):  # across shard boundaries and both inputs
        assert bytes(data.tokens(index).tolist()).decode() == TEXTS[index]
        assert data.length(index) == len(TEXTS[index])
    assert data.tokens(5, 2, 6).tolist() == list(TEXTS[5].encode()[2:6])


def test_token_dtype_is_the_smallest_that_holds_the_vocabulary():
    assert token_dtype(1 << 16) == np.uint16 and token_dtype((1 << 16) + 1) == np.uint32


def test_cli_prepares(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("one doc\n\nanother doc\n")
    args = ["prepare", "--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-m", "distseq.data", *args, "--quiet"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert "2 documents, 18 tokens (uint16)" in done.stdout
    args[2] = str(tmp_path / "nope.txt")
    assert cli_main(args) == 2 and "nope.txt" in capsys.readouterr().err


def test_prepare_reads_parquet_and_saved_datasets(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"text": ["from parquet", "second row"], "id": [1, 2]})
    pq.write_table(table, tmp_path / "part.parquet")
    saved = tmp_path / "saved"  # what datasets.Dataset.save_to_disk writes: Arrow streams
    saved.mkdir()
    arrow = str(saved / "data-00000-of-00001.arrow")
    with pa.OSFile(arrow, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(pa.table({"text": ["from arrow"], "id": [3]}))
    meta = prepare([str(tmp_path / "part.parquet"), str(saved)], str(tmp_path / "out"),
                   progress=False)  # fmt: skip
    data = ShardCorpus([str(tmp_path / "out")])
    texts = [bytes(data.tokens(i).tolist()).decode() for i in range(meta["documents"])]
    assert texts == ["from parquet", "second row", "from arrow"]
    # data.source=hf_dataset trains from the same inputs directly (tokenized at start)
    cfg = _cfg(f"{tmp_path / 'part.parquet'},{saved}", "data.source=hf_dataset")
    sequences, real = StepLoader(cfg, 0, 1).next_step()
    first = bytes(sequences[0].tokens[sequences[0].tokens > 0].tolist()).decode()
    assert len(sequences) == 4 and real > 0 and "from arrow" in first and "second row" in first


def _cfg(out, *overrides):
    return train_cases.build_config(
        ["data.source=shards", f"data.paths=[{out}]", "train.global_batch=4", *overrides], 1
    )


def test_order_is_seeded_and_covers_every_document_each_epoch(corpus):
    out, _ = corpus
    source = ShardSource([str(out)], seed=3)
    epoch = [source.order(g) for g in range(40)]
    assert sorted(epoch) == list(range(40)) and epoch != list(range(40))
    assert sorted(source.order(g) for g in range(40, 80)) == list(range(40))
    assert epoch == [ShardSource([str(out)], seed=3).order(g) for g in range(40)]
    assert epoch != [ShardSource([str(out)], seed=4).order(g) for g in range(40)]


class Spy:
    """Counts a source's reads (index lookups and token reads)."""

    def __init__(self, source):
        self.source, self.lengths, self.pieces = source, 0, 0

    def length(self, index):
        self.lengths += 1
        return self.source.length(index)

    def piece(self, index, start, stop):
        self.pieces += 1
        return self.source.piece(index, start, stop)


@pytest.mark.parametrize("steps", (1, 25))
def test_loader_state_is_a_position_restored_without_reading(corpus, steps):
    out, _ = corpus
    cfg = _cfg(out)
    loader = StepLoader(cfg, 0, 1)
    for _ in range(steps):
        loader.next_step()
    state = loader.state_dict()
    assert set(state) == {"document", "offset"} and json.loads(json.dumps(state)) == state
    # the state is the global position, and the dp ranks split the same global batch
    reference = StepLoader(cfg, 0, 1)
    split = [StepLoader(cfg, rank, 2) for rank in range(2)]
    for _ in range(steps):
        whole, total = reference.next_step()
        halves = [rank.next_step() for rank in split]
        assert [h[1] for h in halves] == [total, total]
        assert all(a.tokens.equal(b.tokens) for a, b in zip(whole, halves[0][0] + halves[1][0]))
    assert all(rank.state_dict() == state for rank in split)
    fresh = StepLoader(cfg, 0, 1)
    spy = fresh.cursor.source = Spy(fresh.cursor.source)
    fresh.load_state_dict(state)
    assert (spy.lengths, spy.pieces) == (0, 0)  # O(1): nothing replayed, nothing read
    got, real = fresh.next_step()
    want, want_real = loader.next_step()
    assert real == want_real and all(a.tokens.equal(b.tokens) for a, b in zip(got, want))


def test_document_loader_chooses_by_index_lengths_and_reads_only_its_batch(corpus):
    out, _ = corpus
    cfg = _cfg(out, "planner=adaptive", "data.seq_len=64")
    loader = DocumentLoader(cfg)
    spy = loader.cursor.source = Spy(loader.cursor.source)
    docs, real = loader.next_step()
    assert spy.pieces == len(docs) and sum(len(t) for t, _ in docs) <= 4 * 64
    upcoming = loader.peek()
    state = loader.state_dict()  # peeking does not move the saved position
    fresh = DocumentLoader(cfg)
    fresh.load_state_dict(state)
    assert fresh.next_step()[0] == upcoming
    source = document_source(cfg)  # whole documents in order, cut at seq_len
    assert len(docs[0][0]) == min(64, source.length(0)) and real > 0


def test_truncated_or_malformed_shards_name_the_file_and_offset(corpus):
    out, meta = corpus
    shard = meta["shards"][0]["name"]
    bin_path, idx_path = out / f"{shard}.bin", out / f"{shard}.idx"
    original_bin, original_idx = bin_path.read_bytes(), idx_path.read_bytes()

    bin_path.write_bytes(original_bin[:-3])
    end = len(original_bin) - 3
    with pytest.raises(ValueError, match=rf"{bin_path}.*truncated.*byte offset {end}"):
        ShardCorpus([str(out)])
    bin_path.write_bytes(original_bin)

    idx_path.write_bytes(original_idx[:-8])
    with pytest.raises(ValueError, match=rf"{idx_path}.*truncated"):
        ShardCorpus([str(out)])

    offsets = np.frombuffer(original_idx, dtype=np.int64).copy()
    offsets[2] = 10**9  # a document ending past the shard
    idx_path.write_bytes(offsets.tobytes())
    data = ShardCorpus([str(out)])  # opening checks sizes and the ends; documents on read
    assert data.length(0) == offsets[1]
    with pytest.raises(ValueError, match=rf"{idx_path}.*document 1 .*byte offset 8"):
        data.length(1)
    idx_path.write_bytes(original_idx)

    tokens = np.frombuffer(original_bin, dtype=np.uint16).copy()
    tokens[3] = 300  # beyond the header's byte vocabulary
    bin_path.write_bytes(tokens.tobytes())
    with pytest.raises(ValueError, match=rf"{bin_path}: token 300 near byte offset 0 .*256"):
        ShardCorpus([str(out)]).tokens(0)
    bin_path.write_bytes(original_bin)

    (out / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"meta\.json is not valid JSON"):
        ShardCorpus([str(out)])
    (out / "meta.json").unlink()
    with pytest.raises(ValueError, match=r"meta\.json does not exist"):
        _cfg(out)


def test_prepare_train_resume(pools, corpus, tmp_path):
    out, _ = corpus
    common = ["data.source=shards", f"data.paths=[{out}]", "train.steps=4", "parallel.dp=1",
              "parallel.sp=2", f"out_dir={tmp_path}/run", "checkpoint.every=2"]  # fmt: skip
    full = pools(2).run(train_cases.train_run, common, timeout=300)[0]
    assert len(full["losses"]) == 4 and all(np.isfinite(full["losses"]))
    resumed = pools(2).run(
        train_cases.train_run,
        [*common, f"checkpoint.resume={tmp_path}/run/checkpoints/step_2"],
        timeout=300,
    )[0]
    assert [r["step"] for r in resumed["history"]] == [3, 4]
    assert resumed["losses"] == pytest.approx(full["losses"][2:], rel=1e-6)
