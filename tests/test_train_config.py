"""Config loading and validation: bad values fail before any process-group work, naming the
key; the shipped configs validate at their intended world sizes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distseq.kernels import BACKENDS, LINEAR_BACKENDS
from distseq.layout import LAYOUTS
from distseq.strategies import ATTENTION_STRATEGIES, LINEAR_STRATEGIES
from distseq.train import load_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def check(overrides, world=2):
    return validate_config(load_config(TINY, overrides), world)


@pytest.mark.parametrize(
    "override, key",
    [
        ("parallel.sp=abc", "parallel.sp"),
        ("parallel.bogus=1", "parallel.bogus"),
        ("parallel.sp=3", "parallel.sp"),
        ("parallel.dp=3", "parallel.dp"),
        ("parallel.layout=spiral", "parallel.layout"),
        ("parallel.attention_strategy=tree", "parallel.attention_strategy"),
        ("parallel.engine=horovod", "parallel.engine"),
        ("parallel.zero_stage=4", "parallel.zero_stage"),
        ("model.n_kv_heads=3", "model.n_kv_heads"),
        ("model.d_model=30", "model.d_model"),
        ("model.mixers=mamba", "model.mixers"),
        ("model.mixers=[softmax]", "model.mixers"),
        ("model.hybrid_ratio=3-1", "model.hybrid_ratio"),
        ("model.linear_decay=fast", "model.linear_decay"),
        ("model.hybrid_linear=mamba", "model.hybrid_linear"),
        ("train.lr=-1", "train.lr"),
        ("train.steps=0", "train.steps"),
        ("train.global_batch=0", "train.global_batch"),
        ("train.dtype=fp8", "train.dtype"),
        ("data.source=web", "data.source"),
        ("data.seq_len=250", "data.seq_len"),
        ("data.pad_multiple=6", "data.pad_multiple"),
        ("data.recall.n_pairs=40", "data.recall.n_pairs"),
        ("data.recall.max_len=512", "data.recall.max_len"),
        ("data.tokenizer=/no/such/dir", "data.tokenizer"),
        ("planner=dynamic", "planner"),
    ],
)
def test_bad_value_names_key(override, key):
    overrides = [override, "train.global_batch=2"] if "global_batch" not in override else [override]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check(overrides)
    assert not dist.is_initialized()


def test_global_batch_must_split_over_dp():
    with pytest.raises(ValueError, match=r"train\.global_batch=3 .*parallel\.dp=2"):
        check(["train.global_batch=3", "parallel.dp=2", "parallel.sp=1"])


def test_ulysses_needs_query_heads_divisible_by_sp():
    # usp can: its default degree (1 here, a ring) divides both
    expected = (
        r"parallel\.sp=3, model\.n_heads=4.*4 query heads.*can: \[.allgather., .ring., .usp.\]"
    )
    with pytest.raises(ValueError, match=expected):
        check(["parallel.attention_strategy=ulysses"], world=3)
    # 2 K/V heads over 4 ranks: replicated for the all-to-all, accepted
    check(["parallel.attention_strategy=ulysses"], world=4)


def test_text_source_needs_existing_files(tmp_path):
    with pytest.raises(ValueError, match=r"data\.paths"):
        check(["data.source=text"])
    with pytest.raises(ValueError, match=r"data\.paths"):
        check(["data.source=text", f"data.paths=[{tmp_path}/missing.txt]"])
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"model\.vocab_size=100 .*256"):
        check(["data.source=text", f"data.paths=[{tmp_path}/a.txt]", "model.vocab_size=100"])


def test_gdn_convolution_needs_pieces_of_three_tokens():
    gdn = ["model.mixers=gdn", "parallel.sp=2", "parallel.dp=1", "parallel.layout=zigzag"]
    with pytest.raises(ValueError, match=r"pad_multiple=8 leaves pieces of 2 tokens.*least 12"):
        check([*gdn, "data.pad_multiple=8"])
    check([*gdn, "data.pad_multiple=16"])
    check(["model.mixers=linear", "parallel.sp=2", "parallel.dp=1", "data.pad_multiple=8"])


def test_adaptive_planner_refuses_linear_beside_gdn_layers():
    """The planner would pick one strategy per layer type; a group runs one for both."""
    adaptive = ROOT / "configs" / "tiny_adaptive.yaml"
    both = ["model.n_layers=3", "model.mixers=[linear,gdn,softmax]"]
    with pytest.raises(ValueError, match="planner=adaptive with both linear and gdn layers"):
        validate_config(load_config(adaptive, both), 4)
    validate_config(load_config(adaptive, [*both, "planner=static", "parallel.sp=4"]), 4)
    validate_config(load_config(adaptive, ["model.n_layers=2", "model.mixers=[gdn,softmax]"]), 4)


def test_hybrid_pattern_with_gdn_layers():
    from distseq.models.config import ModelConfig, layer_mixers

    cfg = ModelConfig(mixers="hybrid", n_layers=4, hybrid_ratio="1:1", hybrid_linear="gdn")
    assert layer_mixers(cfg) == ["gdn", "softmax", "gdn", "softmax"]
    assert layer_mixers(ModelConfig(mixers="hybrid", n_layers=2, hybrid_ratio="1:1")) == [
        "linear", "softmax"
    ]  # fmt: skip


def test_zigzag_allscan_names_the_strategies_that_can():
    expected = r"parallel\.linear_strategy='allscan'.*contiguous.*can: \['lasp2', 'ring'\]"
    with pytest.raises(ValueError, match=expected):
        check(["model.mixers=hybrid", "parallel.linear_strategy=allscan"])
    check(["model.mixers=hybrid", "parallel.linear_strategy=allscan", "parallel.layout=contiguous"])


def _accepted(overrides: list[str], world: int) -> bool:
    try:
        check(overrides, world)
    except ValueError as exc:
        assert "strategy" in str(exc), exc  # rejected for the strategy, nothing else
        return False
    return True


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sp", (1, 2, 3, 4))
@pytest.mark.parametrize("strategy", sorted(ATTENTION_STRATEGIES))
def test_config_accepts_exactly_what_attention_strategies_declare(strategy, sp, layout):
    """Capabilities live in the strategy (``check_group``); the config validation agrees."""
    heads = {"model.n_heads": 12, "model.n_kv_heads": 6, "model.d_model": 96}
    overrides = [f"{k}={v}" for k, v in heads.items()]
    overrides += [f"parallel.attention_strategy={strategy}", f"parallel.layout={layout}"]
    overrides += ["data.seq_len=768", "data.recall.max_len=96", "data.pad_multiple=24"]
    try:
        ATTENTION_STRATEGIES.get(strategy).check_group(sp, 12, 6, layout)
        declared = True
    except ValueError:
        declared = False
    assert _accepted(overrides, sp) == declared


@pytest.mark.parametrize(
    "strategy, degree, error",
    [
        ("usp", 2, None),
        ("usp", 4, None),
        ("usp", 3, "usp: ulysses_degree=3 must be a positive integer dividing both the group"),
        ("ring", 2, "ulysses_degree=2 applies to strategy 'usp' only"),
    ],
)
def test_config_ulysses_degree(strategy, degree, error):
    """``parallel.ulysses_degree`` reaches usp's check (sp=4, 12 heads) and no other's."""
    overrides = ["model.n_heads=12", "model.n_kv_heads=6", "model.d_model=96"]
    overrides += [f"parallel.attention_strategy={strategy}", f"parallel.ulysses_degree={degree}"]
    overrides += ["data.seq_len=768", "data.recall.max_len=96", "data.pad_multiple=24"]
    if error is None:
        assert check(overrides, 4).parallel.ulysses_degree == degree
        return
    with pytest.raises(ValueError, match=re.escape(error)) as info:
        check(overrides, 4)
    assert "parallel.ulysses_degree" in str(info.value)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sp", (1, 2, 3))
@pytest.mark.parametrize("strategy", sorted(LINEAR_STRATEGIES))
def test_config_accepts_exactly_what_linear_strategies_declare(strategy, sp, layout):
    overrides = ["model.mixers=linear", f"parallel.linear_strategy={strategy}"]
    overrides += [
        f"parallel.layout={layout}",
        "data.seq_len=768",
        "data.recall.max_len=96",
        "data.pad_multiple=24",
    ]
    declared = layout in LINEAR_STRATEGIES.get(strategy).layouts
    assert _accepted(overrides, sp) == declared
    # linear ring runs zigzag (it did not pass validation before strategies declared it)
    if strategy == "ring":
        assert declared


# Each backend family, its registry, and a model whose layers are all of the *other* family
# (so a name is accepted whatever this machine's devices can run).
FAMILIES = (
    ("attention_backend", BACKENDS, "model.mixers=linear"),
    ("linear_backend", LINEAR_BACKENDS, "model.mixers=softmax"),
)


@pytest.mark.parametrize(
    "key, name, mixers",
    [(key, name, mixers) for key, table, mixers in FAMILIES for name in ("auto", *table)],
)
def test_backend_accepts_every_registry_name(key, name, mixers):
    assert getattr(check([f"parallel.{key}={name}", mixers]).parallel, key) == name


@pytest.mark.parametrize("key, table, mixers", FAMILIES)
def test_unknown_backend_names_key_and_choices(key, table, mixers):
    choices = re.escape(str(["auto", *table]))
    with pytest.raises(ValueError, match=rf"parallel\.{key}='cudnn'; choose one of {choices}"):
        check([f"parallel.{key}=cudnn", mixers])


@pytest.mark.parametrize(
    "override, mixers",
    [("attention_backend=flash", "softmax"), ("linear_backend=fla", "linear")],
)
def test_backend_that_cannot_run_on_the_device_fails_validation(override, mixers):
    key, name = override.split("=")
    with pytest.raises(ValueError, match=rf"parallel\.{key}='{name}' cannot run on cpu"):
        check([f"parallel.{override}", f"model.mixers={mixers}", "train.device=cpu"])
    # A model without that family's layers never runs the backend.
    other = "linear" if mixers == "softmax" else "softmax"
    check([f"parallel.{override}", f"model.mixers={other}", "train.device=cpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_config_checked_without_gpus_skips_the_device_check():
    # e.g. on a login node: the launcher checks again on the GPU nodes.
    cfg = check(["parallel.attention_backend=flash", "train.device=cuda"])
    assert cfg.parallel.attention_backend == "flash"


@pytest.mark.parametrize("source", ("yaml", "override"))
def test_removed_kernel_backend_names_its_replacements(tmp_path, source):
    path, overrides = TINY, ["parallel.kernel_backend=torch"]
    if source == "yaml":
        path, overrides = tmp_path / "old.yaml", []
        path.write_text("parallel:\n  kernel_backend: torch\n")
    with pytest.raises(ValueError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "parallel.kernel_backend was removed" in message
    assert "parallel.attention_backend" in message and "parallel.linear_backend" in message


def test_ratio_override_is_not_read_as_base_60():
    assert load_config(TINY, ["model.hybrid_ratio=1:1"]).model.hybrid_ratio == "1:1"


def test_world_size_fills_null_dims():
    cfg = check([], world=4)
    assert (cfg.parallel.dp, cfg.parallel.sp) == (1, 4)
    cfg = check(["parallel.dp=null", "parallel.sp=2", "parallel.layout=contiguous"], world=4)
    assert (cfg.parallel.dp, cfg.parallel.sp) == (2, 2)
    assert check([], world=1).parallel.sp == 1


@pytest.mark.parametrize(
    "name, world",
    [
        ("tiny.yaml", 2),
        ("tiny_adaptive.yaml", 3),
        ("bench_small.yaml", 4),
        ("hybrid_1b_128k_8gpu.yaml", 8),
        ("llama_7b_512k_64gpu.yaml", 64),
    ],
)
def test_shipped_configs_validate(name, world):
    cfg = validate_config(load_config(ROOT / "configs" / name), world)
    assert cfg.parallel.dp * cfg.parallel.sp == world


def test_launcher_rejects_bad_key_without_process_group(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(TINY),
         "parallel.engine=horovod", f"out_dir={tmp_path}"],
        check=False, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "parallel.engine" in proc.stderr and "horovod" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "overrides",
    (
        {},
        {"mixers": "hybrid", "n_layers": 4, "linear_decay": "data", "tie_embeddings": True},
        {"mixers": ["linear", "softmax"], "linear_decay": "constant", "head_dim": 24},
    ),
)
def test_parameter_count_matches_the_model(overrides):
    """The planner's count (no tensors) equals the built decoder's."""
    from distseq.models import Decoder, ModelConfig, count_parameters

    cfg = ModelConfig(**overrides)
    model = Decoder(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
