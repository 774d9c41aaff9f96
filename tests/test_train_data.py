"""Data: varlen packing with per-document padding and loss masks, recall task, loader state,
tokenizers, and the layout-following positions of SequenceContext."""

from __future__ import annotations

import json

import torch

from distseq.layout import shard_layout
from distseq.models import SequenceContext
from distseq.models.context import document_positions
from distseq.train import load_config, validate_config
from distseq.train.config import RecallConfig
from distseq.train.data import (
    ByteTokenizer,
    DocumentLoader,
    StepLoader,
    pack_documents,
    pack_group,
    recall_document,
)
from distseq.train.data.loader import document_stream
from distseq.train.data.sources import PAD_ID, SEPARATOR_ID, text_documents


def doc(tokens, first_masked=True):
    return list(tokens), [not first_masked or i > 0 for i in range(len(tokens))]


def test_packing_pads_each_document_to_the_multiple_and_masks_padding():
    docs = [doc(range(10, 15)), doc(range(20, 23)), doc(range(30, 39))]
    packed = list(pack_documents(docs, seq_len=16, multiple=4))
    assert [p.doc_lengths for p in packed] == [(8, 4, 4), (12, 4)]
    first = packed[0]
    assert first.tokens.tolist() == [10, 11, 12, 13, 14, 0, 0, 0, 20, 21, 22, 0, 0, 0, 0, 0]
    # targets are next tokens inside the document; a document's last token predicts nothing
    assert first.targets[:4].tolist() == [11, 12, 13, 14]
    assert first.loss_mask.tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    assert first.cu_seqlens.tolist() == [0, 8, 12, 16]
    assert packed[1].real_tokens == 8
    for seq in packed:
        assert not seq.loss_mask[seq.tokens == PAD_ID].any()
        assert sum(seq.doc_lengths) == 16 and all(n % 4 == 0 for n in seq.doc_lengths)


def test_long_documents_are_split_and_each_piece_restarts_context():
    packed = list(pack_documents([doc(range(1, 41))], seq_len=16, multiple=8))
    assert [p.doc_lengths for p in packed] == [(16,), (16,), (8, 8)]
    assert [p.real_tokens for p in packed] == [15, 15, 7]
    assert packed[1].tokens[0].item() == 17


def test_loss_mask_follows_document_mask():
    tokens, mask = [5, 6, 7, 8], [False, False, True, True]
    (packed,) = pack_documents([(tokens, mask)], seq_len=8, multiple=8)
    assert packed.loss_mask.tolist() == [0, 1, 1, 0, 0, 0, 0, 0]
    assert packed.targets[1:3].tolist() == [7, 8]


def test_recall_documents_answer_from_the_pairs():
    rc = RecallConfig(n_keys=16, n_values=16, n_pairs=6, n_queries=4, min_len=40, max_len=60)
    for index in range(20):
        tokens, mask = recall_document(rc, seed=3, index=index)
        assert 40 <= len(tokens) <= 60 and sum(mask) == 4
        pairs = dict(zip(tokens[0:12:2], tokens[1:12:2]))
        sep = tokens.index(SEPARATOR_ID)
        assert all(t >= 2 + 16 for t in tokens[12:sep])  # filler holds values only
        for pos in (i for i, m in enumerate(mask) if m):
            assert pos > sep and tokens[pos] == pairs[tokens[pos - 1]]
    assert recall_document(rc, 3, 7) == recall_document(rc, 3, 7)
    assert recall_document(rc, 3, 7) != recall_document(rc, 4, 7)


def _cfg(world=2, *overrides):
    return validate_config(
        load_config(None, ["train.global_batch=4", "data.seq_len=256", *overrides]), world
    )


def test_loader_splits_the_global_batch_over_dp_and_resumes():
    cfg = _cfg(2, "parallel.dp=2", "parallel.sp=1")
    ranks = [StepLoader(cfg, r, 2) for r in range(2)]
    steps = [[loader.next_step() for _ in range(3)] for loader in ranks]
    for (mine0, total0), (mine1, total1) in zip(*steps):
        assert len(mine0) == len(mine1) == 2 and total0 == total1
        assert total0 == sum(s.real_tokens for s in mine0 + mine1)
        assert not torch.equal(mine0[0].tokens, mine1[0].tokens)
    fresh = StepLoader(cfg, 0, 2)
    fresh.load_state_dict(ranks[0].state_dict())
    expected, _ = ranks[0].next_step()
    got, _ = fresh.next_step()
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(got, expected))


def test_document_loader_fills_the_token_budget_in_stream_order_and_resumes():
    cfg = _cfg(3, "planner=adaptive", "data.recall.min_len=40", "data.recall.max_len=200")
    loader = DocumentLoader(cfg)
    budget = 4 * 256
    upcoming = loader.peek()
    assert loader.peek() is upcoming  # peeking twice consumes nothing
    stream = document_stream(cfg)
    for _ in range(4):
        docs, real = loader.next_step()
        lengths = [len(tokens) for tokens, _ in docs]
        assert sum(lengths) <= budget < sum(lengths) + 200  # the next one would not fit
        assert real == sum(sum(mask[1:]) for _, mask in docs) > 0
        assert docs == [next(stream) for _ in docs]  # whole documents, none skipped
    fresh = DocumentLoader(cfg)
    fresh.load_state_dict(loader.state_dict())
    assert fresh.next_step() == loader.next_step()


def test_pack_group_pads_each_document_and_adds_no_tail():
    docs = [doc([5, 6, 7]), doc([8, 9, 10, 11, 12])]
    seq = pack_group(docs, 4)
    assert seq.doc_lengths == (4, 8) and seq.tokens.numel() == 12
    assert seq.real_tokens == 2 + 4


def test_text_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc é\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n")
    paths = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    stream = text_documents(paths, ByteTokenizer(), "text", seed=0)
    texts = {bytes(next(stream)[0]).decode() for _ in range(3)}
    assert texts == {"first doc", "second doc é", "third"}
    cfg = _cfg(2, "data.source=text", f"data.paths=[{paths[0]},{paths[1]}]", "data.seq_len=32",
               "data.pad_multiple=8")  # fmt: skip
    sequences, real = StepLoader(cfg, 0, 1).next_step()
    assert len(sequences) == 4 and real > 0


def test_positions_follow_the_layout_and_restart_per_document():
    lengths = (8, 12)
    in_document = torch.cat([torch.arange(n) for n in lengths])
    for layout in ("zigzag", "contiguous"):
        for rank in range(2):
            shard = shard_layout(lengths, 2, rank, layout)
            got = document_positions(shard)
            assert torch.equal(got, in_document[shard.positions]), (layout, rank, got)
    assert SequenceContext.build(lengths, layout="zigzag").cu_seqlens.tolist() == [0, 8, 20]
