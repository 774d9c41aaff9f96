"""Long-sequence memory savers against the plain path: the fused chunked loss, the tiled MLP
and offloaded checkpoints, alone and in distseq's decoder and a tiny Hugging Face Llama, on
one process and trained at sp = 2 (ring softmax, lasp2 linear); bad ``memory.*`` values."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import train_cases
from cases import relative_error
from distseq.memory import (
    IGNORE_INDEX,
    PLAIN,
    MemoryConfig,
    linear_cross_entropy,
    resolve_mlp_tiles,
    tiled_apply,
)
from distseq.memory.offload import OffloadInputs
from distseq.models import Decoder, ModelConfig, SequenceContext
from distseq.models.layers import SwiGLU
from distseq.train import load_config, validate_config
from test_train_e2e import STEPS, assert_same

TOL = 1e-6  # float32, relative to the largest reference value
ALL_ON = MemoryConfig(loss_chunk_tokens=5, mlp_tiles=3, offload_checkpoints=True)


def _grads(params) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params]


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float = TOL) -> None:
    assert len(got) == len(want) > 0
    for index, (a, b) in enumerate(zip(got, want)):
        assert b.abs().max() > 0, f"reference {index} is all zeros"
        assert relative_error(a, b) <= tol, (index, relative_error(a, b))


@pytest.mark.parametrize("chunk", (1, 7, 64, 10_000))
@pytest.mark.parametrize("tied", (False, True), ids=("untied", "tied"))
def test_linear_cross_entropy_matches_plain(chunk, tied):
    """Loss and the gradients of the hidden states' producer and the output weight (also
    when that weight is the embedding the hidden states come from) equal the unfused
    ``F.cross_entropy(h @ W.T)``, for chunks of one row up to more rows than exist."""
    gen = torch.Generator().manual_seed(chunk)
    vocab, d, shape = 53, 12, (2, 29)
    tokens = torch.randint(vocab, shape, generator=gen)
    labels = torch.randint(vocab, shape, generator=gen)
    labels[0, 3:8] = IGNORE_INDEX
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        embed, proj = torch.nn.Embedding(vocab, d), torch.nn.Linear(d, d)
        weight = embed.weight if tied else torch.nn.Parameter(torch.randn(vocab, d))
        hidden = proj(embed(tokens)).tanh() * 3
        if fused:
            loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk, scale=0.3)
        else:
            logits = hidden @ weight.t()
            loss = 0.3 * F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        (loss * 1.7).backward()
        params = [embed.weight, proj.weight, proj.bias] + ([] if tied else [weight])
        results.append([loss.detach(), *_grads(params)])
    _assert_close(results[1], results[0])


def test_linear_cross_entropy_under_bf16_autocast_matches_linear():
    """Under autocast the projection runs in bfloat16 as ``nn.Linear`` would; the losses
    then agree to bfloat16 rounding of the logits."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 16, generator=gen)
    weight = torch.randn(30, 16, generator=gen)
    labels = torch.randint(30, (40,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(hidden, weight, labels, chunk_tokens=8)
        plain = F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")
    assert fused.dtype == torch.float32
    assert relative_error(fused, plain) <= 1e-5
    exact = F.cross_entropy(hidden @ weight.t(), labels, reduction="sum")
    assert relative_error(fused, exact) > 1e-6  # it did run in bfloat16


def test_linear_cross_entropy_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"expected \[\.\.\., d\], \[vocab, d\]"):
        linear_cross_entropy(torch.zeros(4, 8), torch.zeros(10, 7), torch.zeros(4).long(),
                             chunk_tokens=2)  # fmt: skip
    with pytest.raises(ValueError, match="chunk_tokens=0 must be positive"):
        linear_cross_entropy(torch.zeros(4, 8), torch.zeros(10, 8), torch.zeros(4).long(),
                             chunk_tokens=0)  # fmt: skip


@pytest.mark.parametrize("tiles", (2, 5, 18, 40))
def test_tiled_mlp_matches_plain(tiles):
    """Output, input gradient and every weight gradient; tiles that do not divide the 18
    tokens, and more tiles than tokens (empty tiles)."""
    torch.manual_seed(0)
    mlp = SwiGLU(16, 40)
    x = torch.randn(2, 9, 16, requires_grad=True)
    upstream = torch.randn(2, 9, 16)
    results = []
    for tiled in (False, True):
        x.grad = None
        mlp.zero_grad()
        params = list(mlp.parameters())
        out = tiled_apply(mlp, x, tiles, params) if tiled else mlp(x)
        out.backward(upstream)
        results.append([out.detach(), x.grad.clone(), *_grads(params)])
    _assert_close(results[1], results[0])


def test_mlp_tiles_auto_bounds_a_tile_by_d_model():
    assert resolve_mlp_tiles("auto", 1000, 256) == 4
    assert resolve_mlp_tiles("auto", 100, 256) == 1
    assert resolve_mlp_tiles(8, 5, 256) == 5  # never more tiles than tokens
    assert resolve_mlp_tiles(1, 10_000, 16) == 1


def test_offload_packs_only_the_checkpointed_input():
    """Around a non-reentrant checkpoint the hooks see exactly the layer's input (the
    checkpoint's own hooks take everything saved inside), and gradients are unchanged."""
    torch.manual_seed(0)
    mlp = SwiGLU(8, 24)
    x = torch.randn(3, 10, 8, requires_grad=True)
    results = []
    for offload in (False, True):
        x.grad = None
        mlp.zero_grad()
        hooks = OffloadInputs()
        if offload:
            with hooks:
                out = checkpoint(mlp, x, use_reentrant=False)
        else:
            out = checkpoint(mlp, x, use_reentrant=False)
        out.square().sum().backward()
        results.append([x.grad.clone(), *_grads(mlp.parameters())])
        assert hooks.packed_bytes == (x.numel() * 4 if offload else 0)
    _assert_close(results[1], results[0])


def _decoder_case(memory: MemoryConfig, checkpointing: bool, **model) -> list[torch.Tensor]:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_hidden=48, **model)  # fmt: skip
    decoder = Decoder(cfg)
    decoder.checkpoint_blocks = checkpointing
    decoder.memory = memory
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(97, (1, 40), generator=gen)
    labels = torch.randint(97, (1, 40), generator=gen)
    labels[0, 11:19] = IGNORE_INDEX
    ctx = SequenceContext.build([16, 24])
    loss = decoder(tokens, ctx, labels)
    loss.backward()
    return [loss.detach(), *_grads(decoder.parameters())]


@pytest.mark.parametrize(
    "model",
    (dict(), dict(tie_embeddings=True), dict(mixers="hybrid", hybrid_ratio="1:1")),
    ids=("softmax", "tied", "hybrid"),
)
def test_decoder_memory_savers_match_plain(model):
    reference = _decoder_case(PLAIN, False, **model)
    for memory, checkpointing in ((ALL_ON, True), (PLAIN, True), (ALL_ON, False)):
        if memory.offload_checkpoints and not checkpointing:
            memory = dataclasses.replace(memory, offload_checkpoints=False)
        _assert_close(_decoder_case(memory, checkpointing, **model), reference)


def test_decoder_offloads_each_checkpointed_layer_input(monkeypatch):
    """With checkpointing and offload the decoder packs exactly one ``[1, S, d_model]``
    float32 input per layer to the host."""
    import distseq.models.decoder as decoder_module

    hooks = []

    def recording(enabled: bool):
        hooks.append(OffloadInputs() if enabled else None)
        return hooks[-1] if enabled else contextlib.nullcontext()

    monkeypatch.setattr(decoder_module, "offload_context", recording)
    _decoder_case(ALL_ON, True)
    assert len(hooks) == 2  # one per layer, forward only (the recomputation is not offloaded)
    assert [h.packed_bytes for h in hooks] == [40 * 32 * 4] * 2


def test_decoder_labels_loss_is_the_logits_cross_entropy():
    """``forward(labels=...)`` on the plain path sums what the logits' cross-entropy gives."""
    torch.manual_seed(0)
    decoder = Decoder(ModelConfig(vocab_size=50, d_model=16, n_heads=2, n_kv_heads=1))
    tokens = torch.randint(50, (1, 12))
    labels = tokens.roll(-1, 1).masked_fill(torch.arange(12) >= 10, IGNORE_INDEX)
    ctx = SequenceContext.build([12])
    logits = decoder(tokens, ctx)
    want = F.cross_entropy(logits[0], labels[0], reduction="sum")
    assert relative_error(decoder(tokens, ctx, labels).detach(), want.detach()) <= TOL


def _hf_case(memory: MemoryConfig, checkpointing: bool) -> list[torch.Tensor]:
    pytest.importorskip("transformers")
    from distseq.hf.model import build_hf_model
    from hf_cases import tiny_config

    config = tiny_config("llama").to_dict()
    torch.manual_seed(0)
    model = build_hf_model(ModelConfig(hf_config={**config, "model_type": "llama"}))
    model.checkpoint_blocks = checkpointing
    model.memory = memory
    wrapped = [hasattr(layer._gradient_checkpointing_func, "distseq_plain")
               for layer in model.layers if checkpointing]  # fmt: skip
    assert wrapped == [memory.offload_checkpoints] * len(wrapped)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(64, (1, 36), generator=gen)
    labels = torch.randint(64, (1, 36), generator=gen)
    labels[0, :4] = IGNORE_INDEX
    loss = model(tokens, SequenceContext.build([20, 16]), labels)
    loss.backward()
    return [loss.detach(), *_grads(model.parameters())]


def test_hf_llama_memory_savers_match_plain():
    reference = _hf_case(PLAIN, False)
    _assert_close(_hf_case(ALL_ON, True), reference)
    _assert_close(_hf_case(dataclasses.replace(ALL_ON, offload_checkpoints=False), False),
                  reference)  # fmt: skip


def test_hf_causal_lm_loss_fused_from_hidden_states():
    """``causal_lm_loss(hidden, labels, weight=lm_head.weight)`` equals the logits form."""
    import distseq.hf

    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 15, 8, generator=gen)
    weight = torch.randn(21, 8, generator=gen)
    labels = torch.randint(21, (2, 15), generator=gen)
    labels[1, -3:] = IGNORE_INDEX
    results = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            loss = distseq.hf.causal_lm_loss(h, labels, chunk_tokens=4, weight=w)
        else:
            loss = distseq.hf.causal_lm_loss(h @ w.t(), labels, chunk_tokens=4)
        loss.backward()
        results.append([loss.detach(), h.grad, w.grad])
    _assert_close(results[1], results[0])


@pytest.mark.parametrize(
    "override, message",
    (
        ("memory.loss_chunk_tokens=-1", "memory.loss_chunk_tokens=-1 must be an integer >= 0"),
        ("memory.mlp_tiles=0", "memory.mlp_tiles=0 must be 'auto' or an integer >= 1"),
        ("memory.mlp_tiles=many", "memory.mlp_tiles='many' must be 'auto'"),
        ("memory.offload_checkpoints=true", "train.activation_checkpointing is off"),
        ("memory.tile_mlp=2", "memory.tile_mlp"),
    ),
)
def test_bad_memory_values_name_their_key(override, message):
    with pytest.raises(ValueError, match=message):
        validate_config(load_config(train_cases.TINY, [*train_cases.SMALL, override]), 1)


SP_CASES = {
    "softmax-ring": ["parallel.attention_strategy=ring"],
    "linear-lasp2": ["model.mixers=linear", "parallel.linear_strategy=lasp2"],
}
PLAIN_ARGS = ["memory.loss_chunk_tokens=0", "memory.mlp_tiles=1"]
ON_ARGS = ["memory.loss_chunk_tokens=24", "memory.mlp_tiles=3",
           "memory.offload_checkpoints=true", "train.activation_checkpointing=true"]  # fmt: skip


@pytest.mark.parametrize("case", SP_CASES)
def test_training_with_memory_savers_matches_plain(pools, tmp_path, case):
    """Plain at sp = 1 against everything on at sp = 1 and sp = 2: every step's loss and
    the last gradients."""
    common = [f"train.steps={STEPS}", "train.lr=2e-5", *SP_CASES[case]]

    def run(world: int, extra: list[str], name: str) -> dict:
        args = [*common, *extra, f"parallel.sp={world}", f"out_dir={tmp_path}/{name}"]
        return pools(world).run(train_cases.train_run, args, timeout=300)[0]

    reference = run(1, PLAIN_ARGS, "plain")
    assert_same(run(1, ON_ARGS, "on1"), reference, f"{case} sp=1")
    assert_same(run(2, ON_ARGS, "on2"), reference, f"{case} sp=2")


def test_hf_training_with_memory_savers_matches_plain(pools, tmp_path):
    pytest.importorskip("transformers")
    import hf_train_cases

    common = [f"train.steps={STEPS}", "train.lr=2e-5"]
    reference = pools(1).run(
        hf_train_cases.hf_train, [*common, *PLAIN_ARGS, f"out_dir={tmp_path}/plain"], timeout=300
    )[0]
    on = pools(2).run(hf_train_cases.hf_train, [*common, *ON_ARGS, "parallel.sp=2",
                      f"out_dir={tmp_path}/on"], timeout=300)[0]  # fmt: skip
    assert on["checkpointing"]
    assert_same(on, reference, "hf llama sp=2")


def test_tensor_peak_agrees_with_memtracker():
    """distseq's tracker and torch's MemTracker count the same peak on a plain training step
    (MemTracker's module hooks cannot follow the tiled MLP, hence a tracker of our own)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from distseq.memory.tracker import TensorPeak

    torch.manual_seed(0)
    decoder = Decoder(ModelConfig(vocab_size=2048, d_model=32, n_heads=4, n_kv_heads=2))
    optimizer = torch.optim.AdamW(decoder.parameters(), foreach=False)
    tokens, ctx = torch.randint(2048, (1, 256)), SequenceContext.build([256])

    def step() -> None:
        decoder(tokens, ctx, tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW state
    ours = TensorPeak()
    ours.track([*decoder.parameters(), *(t for s in optimizer.state.values() for t in s.values())])
    with ours:
        step()
    theirs = MemTracker()
    theirs.track_external(decoder, optimizer)
    with theirs:
        step()
    expected = theirs.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    assert ours.peak == expected
    assert ours.peak > 256 * 2048 * 4 * 2  # the logits and their gradient were counted
    assert ours.live < ours.peak


def test_metrics_peak_is_the_tensor_peak_and_drops_with_the_savers(pools, tmp_path):
    """``peak_mem_bytes`` on CPU counts tensors: a 16K vocabulary's float32 logits
    (``S x V x 4`` = 32 MiB per 512-token sequence) are in the plain run's peak, not the fused
    one's."""
    common = ["train.steps=1", "model.vocab_size=16384", "parallel.sp=1", "data.seq_len=512"]
    peaks = {}
    for name, extra in (("plain", PLAIN_ARGS), ("on", ON_ARGS)):
        args = [*common, *extra, f"out_dir={tmp_path}/{name}"]
        run = pools(1).run(train_cases.train_run, args, timeout=300)[0]
        peaks[name] = run["history"][0]["peak_mem_bytes"]
    params = ModelConfig(vocab_size=16384).vocab_size * 64 * 2 * 4  # embedding + head
    logits = 512 * 16384 * 4
    assert peaks["plain"] > params + 2 * logits, peaks
    assert peaks["on"] < peaks["plain"] - logits, peaks


@pytest.mark.slow  # about 3 minutes on 2 loaded cores (16K-token softmax steps)
def test_planner_memory_model_within_15_percent_of_measured_peaks(pools):
    """The planner's memory model with each saver setting against the measured tensor peak
    of a training step (one rank, softmax), at lengths where activations dominate."""
    import memory_cases

    cases = [(0, 2048), (1, 2048), (2, 8192), (3, 16384), (4, 16384)]
    rows = pools(1).run(memory_cases.planner_vs_measured, cases, timeout=600)[0]
    assert [r["length"] for r in rows] == [n for _, n in cases]
    for r in rows:
        assert abs(r["predicted"] / r["measured"] - 1) <= 0.15, r
    # the savers lower both, in the same order
    assert rows[0]["measured"] > 2 * rows[-1]["measured"]


def test_planner_memory_follows_the_savers():
    """Per-token bytes drop with each saver; the fused loss and tiles move bytes from per
    token to a fixed amount; offload keeps no layer input on the device."""
    from distseq.planner import Cluster, CostModel, load_profile
    from distseq.planner.spec import ModelSpec

    spec = ModelSpec.from_config(ModelConfig(vocab_size=131072, d_model=256, n_layers=4,
                                             n_heads=4, n_kv_heads=2, ffn_hidden=688))  # fmt: skip
    settings = [(False, PLAIN), (True, PLAIN), (True, MemoryConfig(4096, 1, False)),
                (True, MemoryConfig(4096, "auto", False)),
                (True, MemoryConfig(4096, "auto", True))]  # fmt: skip
    per_token, static = [], []
    for checkpointing, memory in settings:
        cost = CostModel(spec, load_profile("cpu_gloo"), Cluster(1, 1, 2**40),
                         activation_checkpointing=checkpointing, memory=memory)  # fmt: skip
        kind = cost.kinds(1)[0]
        per_token.append(kind.bytes_per_token)
        static.append(kind.static_bytes)
    assert per_token == sorted(per_token, reverse=True) and len(set(per_token)) == 5, per_token
    assert static[2] - static[1] == 2 * 4096 * 131072 * 4  # one chunk's logits + probabilities
    assert static[3] - static[2] == 2 * 4 * 3 * 688 * 256  # one d_model-token MLP tile, twice
