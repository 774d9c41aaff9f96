"""Training config: dataclass schema, YAML + dotted ``key=value`` overrides (OmegaConf), checks.

Every check here runs before any process-group work and raises ``ValueError`` naming the
offending key, so a typo fails in milliseconds instead of after a rendezvous.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distseq.kernels import BACKENDS, LINEAR_BACKENDS, unavailable_reason
from distseq.layout import LAYOUTS, chunks_per_rank
from distseq.memory.config import MemoryConfig, check_memory_config
from distseq.models.config import GDN_CONV_SIZE, ModelConfig, check_model_config
from distseq.planner.spec import ModelSpec
from distseq.strategies import REGISTRY_BY_MIXER
from distseq.train.data.shards import ShardCorpus
from distseq.train.data.sources import recall_vocab_size
from distseq.train.data.tokenizer import load_tokenizer
from distseq.train.mesh import pick_device

ENGINES = ("ddp", "fsdp", "deepspeed")
STRATEGY_KEYS = {
    "softmax": "parallel.attention_strategy",
    "linear": "parallel.linear_strategy",
    "gdn": "parallel.linear_strategy",  # Gated DeltaNet layers run the delta-rule namesake
}
PLANNERS = ("static", "adaptive")
DATA_SOURCES = ("recall", "text", "hf_dataset", "shards")
DTYPES = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ParallelConfig:
    """``dp x sp`` ranks; a null ``dp`` (``sp``) is ``world_size // sp`` (``// dp``); both
    null: ``dp = 1``, every rank sequence-parallel. ``zero_stage`` (0-3) is
    used by the ``deepspeed`` engine only; ``fsdp`` shards parameters, gradients and
    optimizer state (ZeRO-3) over all ``dp x sp`` ranks. ``attention_backend`` /
    ``linear_backend``: the local kernels of softmax / linear layers, a name of
    ``distseq.kernels.BACKENDS`` / ``LINEAR_BACKENDS``, or ``auto`` (the fastest that runs).
    ``ulysses_degree``: ranks per Ulysses group of ``attention_strategy: usp`` (null: its
    default, the largest divisor of ``sp`` and the query heads within a node); refused with
    any other strategy. The adaptive planner picks each group's degree itself."""

    dp: int | None = None
    sp: int | None = None
    attention_strategy: str = "ring"
    linear_strategy: str = "lasp2"
    layout: str = "zigzag"
    engine: str = "ddp"
    zero_stage: int = 2
    attention_backend: str = "auto"
    linear_backend: str = "auto"
    timeout_s: float = 1800.0
    ulysses_degree: int | None = None


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio``. A step whose loss
    or gradient norm is NaN/inf stops the run, unless ``skip_nonfinite`` allows skipping up to
    that many such steps in a row (a skipped step's batch is consumed and dropped; weights and
    optimizer state stay as they were)."""

    steps: int = 200
    seed: int = 0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    global_batch: int = 2
    dtype: str = "float32"
    device: str = "auto"
    activation_checkpointing: bool = False
    skip_nonfinite: int = 0


@dataclass
class RecallConfig:
    """Multi-key associative recall: ``n_pairs`` key-value pairs, filler, then ``n_queries``
    of the keys, each followed by its value (the only tokens the loss counts). Documents have
    random lengths in ``[min_len, max_len]``; every document is sharded over the ``sp`` ranks,
    so the pairs (start) and the queries (end) live on different ranks."""

    n_keys: int = 32
    n_values: int = 32
    n_pairs: int = 8
    n_queries: int = 8
    min_len: int = 64
    max_len: int = 128


@dataclass
class DataConfig:
    """``seq_len`` is the global packed length of one sequence (sharded over ``sp``);
    ``pad_multiple`` is what every document is padded to: fixed (not derived from the
    layout) so a step's tokens are the same at any dp / sp / layout; every layout it serves
    (``sp``, or ``2 sp`` zigzag) must divide it. ``paths``: local ``.txt`` / ``.jsonl``
    files (``source: text``), Hugging Face datasets saved to disk / ``.parquet`` files
    (``source: hf_dataset``; column ``jsonl_key``) or shard directories written by
    ``python -m distseq.data prepare`` (``source: shards``); ``tokenizer`` an optional local
    Hugging Face tokenizer directory (default: ``model.hf``'s directory when it holds a
    tokenizer, else bytes; shards are already tokenized)."""

    source: str = "recall"
    seq_len: int = 256
    pad_multiple: int = 64
    paths: list[str] = field(default_factory=list)
    jsonl_key: str = "text"
    tokenizer: str | None = None
    recall: RecallConfig = field(default_factory=RecallConfig)


@dataclass
class CheckpointConfig:
    """Save every ``every`` steps (0: only at the end if ``save_final``) under ``dir``
    (default ``<out_dir>/checkpoints``), keeping the newest ``keep_last`` (0: all).
    ``resume``: ``auto`` (the newest complete checkpoint under ``dir`` if there is one, else a
    fresh start: what ``torchrun --max-restarts`` needs), ``latest`` (the same, but having none
    is an error), a ``step_N`` directory, or ``none`` / null (always start fresh).
    ``export_hf``: a directory where a Hugging Face model (``model.hf`` / ``model.hf_config``)
    is written at the end of training, loadable by ``AutoModelForCausalLM.from_pretrained``."""

    every: int = 0
    save_final: bool = False
    dir: str | None = None
    keep_last: int = 0
    resume: str | None = "auto"
    export_hf: str | None = None


@dataclass
class LogConfig:
    progress: bool = True
    peak_flops: float | None = None


@dataclass
class AdaptiveConfig:
    """Options of ``planner: adaptive`` (each step's batch is planned over all ranks by
    :func:`distseq.planner.plan_batch`). ``profile``: a shipped profile name or a file from
    ``python -m distseq.planner calibrate`` (``auto``: ``cpu_gloo`` on CPU,
    ``h100_nvlink_ib400`` on CUDA); ``memory``: usable bytes per rank such as ``"60GiB"``
    (null: the device's memory, or RAM / local ranks on CPU); ``gpus_per_node`` (null:
    torchrun's local world size, rounded up to a power of two); ``time_limit``: MILP seconds
    per step; ``zero_stage``: 0 replicates optimizer state and gradients on every rank, 1
    shards the optimizer state over all ranks, 2 the gradients too
    (:mod:`distseq.train.zero`), 3 the parameters too (FSDP2; idle ranks run a dummy
    micro-batch so its per-layer collectives stay matched); ``zero_bucket_mb``: stage 2
    reduce-scatters the gradients during the backward in buckets of about this many MiB of
    fp32 gradient (a larger parameter is a bucket of its own)."""

    profile: str = "auto"
    memory: str | None = None
    gpus_per_node: int | None = None
    time_limit: float = 0.25
    zero_stage: int = 0
    zero_bucket_mb: float = 25.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    out_dir: str = "runs/default"
    planner: str = "static"
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)


# Keys older configs may still set, and what replaces them.
_REMOVED_KEYS = {
    "parallel.kernel_backend": "set parallel.attention_backend (softmax layers) and "
    "parallel.linear_backend (linear layers) instead",
}

_SEXAGESIMAL = re.compile(r"^([\w.]+)=(\d+:\d+)$")


def _quote_ratios(overrides: list[str]) -> list[str]:
    """YAML 1.1 reads ``3:1`` as the base-60 number 181; keep ratios like it strings."""
    return [_SEXAGESIMAL.sub(r"\1='\2'", item) for item in overrides]


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Merge the schema defaults, the YAML file at ``path`` and dotted ``key=value`` overrides.

    Type errors and unknown keys raise ``ValueError`` naming the key.
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form dotted.key=value")
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            if not Path(path).is_file():
                raise ValueError(f"--config {path}: no such file")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(_quote_ratios(list(overrides))))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        if key in _REMOVED_KEYS:
            raise ValueError(f"config key {key} was removed; {_REMOVED_KEYS[key]}") from None
        reason = str(getattr(exc, "msg", exc)).splitlines()[0]
        raise ValueError(f"config key {key}: {reason}") from None


def config_to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _one_of(key: str, value: object, choices: tuple | list) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r}; choose one of {list(choices)}")


def _positive(key: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{key}={value!r} must be {bound}")


def resolve_world(cfg: Config, world_size: int) -> None:
    """Fill a null ``parallel.dp`` / ``parallel.sp`` from the launched world size (both null:
    all ranks sequence-parallel) and check ``dp * sp == world_size``."""
    par = cfg.parallel
    if par.dp is None and par.sp is None:
        par.dp = 1
    for key, other in (("dp", "sp"), ("sp", "dp")):
        if getattr(par, key) is None:
            given = getattr(par, other)
            _positive(f"parallel.{other}", given)
            if world_size % given:
                raise ValueError(
                    f"parallel.{other}={given} does not divide the {world_size} launched "
                    f"processes; launch a multiple of {given} processes or change it"
                )
            setattr(par, key, world_size // given)
    _positive("parallel.dp", par.dp)
    _positive("parallel.sp", par.sp)
    if par.dp * par.sp != world_size:
        raise ValueError(
            f"parallel.dp={par.dp} x parallel.sp={par.sp} = {par.dp * par.sp} but "
            f"{world_size} processes were launched; make dp*sp equal --nproc_per_node*nnodes"
        )


def validate_config(cfg: Config, world_size: int) -> Config:
    """Check every value (no process-group work); fills defaults that depend on the world."""
    _one_of("planner", cfg.planner, PLANNERS)
    spec = model_spec(cfg.model)
    resolve_world(cfg, world_size)
    _check_parallel(cfg, spec)
    if cfg.planner == "adaptive":
        _check_adaptive(cfg)
    _check_optim(cfg.train)
    check_memory_config(cfg.memory, cfg.train.activation_checkpointing)
    _check_backends(cfg, spec)
    _check_data(cfg, spec)
    _check_resilience(cfg)
    _check_export(cfg)
    return cfg


def model_spec(model: ModelConfig) -> ModelSpec:
    """The checked model's description (layers, heads, vocabulary); for a Hugging Face model
    read from its config (never downloading), which must be one distseq trains exactly."""
    check_model_config(model)
    if model.hf_key is not None:
        from distseq.hf.model import check_trainable, load_hf_config, meta_model

        check_trainable(meta_model(load_hf_config(model), model.hf_key), model.hf_key)
    return ModelSpec.from_config(model)


def model_key(model: ModelConfig, own: str, hf: str) -> str:
    """How an error names a model value: ``model.<own>`` for distseq's decoder, or the Hugging
    Face config field ``hf`` of ``model.hf`` / ``model.hf_config``."""
    return f"model.{own}" if model.hf_key is None else f"{model.hf_key} {hf}"


def _check_parallel(cfg: Config, spec: ModelSpec) -> None:
    par = cfg.parallel
    _one_of("parallel.layout", par.layout, LAYOUTS)
    _one_of("parallel.engine", par.engine, ENGINES)
    _one_of("parallel.zero_stage", par.zero_stage, (0, 1, 2, 3))
    mixers = set(spec.layers)
    for mixer, registry in REGISTRY_BY_MIXER.items():
        key = STRATEGY_KEYS[mixer]
        name = getattr(par, key.removeprefix("parallel."))
        _one_of(key, name, sorted(registry))
        # The adaptive planner picks each group's strategies from the same capabilities.
        if mixer in mixers and cfg.planner == "static":
            shape = _group_shape(cfg, spec, mixer)
            try:
                registry.check(name, *shape.values())
            except ValueError as exc:
                where = ", ".join(f"{k}={v}" for k, v in shape.items())
                raise ValueError(f"{key}={name!r} cannot run with {where}: {exc}") from None
    if cfg.planner == "adaptive" and {"linear", "gdn"} <= mixers:
        # A group's SequenceContext has one linear-strategy slot for both layer types, while
        # the planner picks (and costs) a strategy per layer type.
        raise ValueError(
            "planner=adaptive with both linear and gdn layers in model.mixers: the planner "
            "picks a strategy per layer type but a group runs all of them with one linear "
            "strategy; use one of the two recurrent layer types, or planner=static "
            "(parallel.linear_strategy serves both)"
        )
    if par.engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(
            "parallel.engine=deepspeed but deepspeed is not installed "
            "(DS_BUILD_OPS=0 pip install deepspeed==0.19.8), or choose ddp / fsdp"
        )


def _group_shape(cfg: Config, spec: ModelSpec, mixer: str) -> dict[str, int | str]:
    """The arguments of the ``mixer`` strategies' ``check_group`` for this run, in order, by
    the config key each comes from."""
    shape: dict[str, int | str] = {"parallel.sp": cfg.parallel.sp}
    if mixer == "softmax":
        shape |= {
            model_key(cfg.model, "n_heads", "num_attention_heads"): spec.n_heads,
            model_key(cfg.model, "n_kv_heads", "num_key_value_heads"): spec.n_kv_heads,
        }
    shape |= {"parallel.layout": cfg.parallel.layout}
    if mixer == "softmax" and cfg.parallel.ulysses_degree is not None:
        shape["parallel.ulysses_degree"] = cfg.parallel.ulysses_degree
    return shape


def _check_adaptive(cfg: Config) -> None:
    """The planner forms its own SP groups over every rank and picks their strategies and
    layouts, so ``parallel.dp``/``sp``/strategies/layout do not apply."""
    par, opts = cfg.parallel, cfg.adaptive
    if par.dp != 1:
        raise ValueError(
            f"planner=adaptive with parallel.dp={par.dp}: the planner splits all ranks into "
            "groups itself; set parallel.dp=1 (or leave dp and sp null)"
        )
    if par.engine != "ddp":
        raise ValueError(
            f"planner=adaptive with parallel.engine={par.engine!r}: ranks run different "
            "micro-batches per step, which only the replicated (ddp) engine supports; use ddp"
        )
    from distseq.planner.profile import load_profile
    from distseq.planner.units import parse_bytes

    checks = (("profile", load_profile, "auto"), ("memory", parse_bytes, None))
    for key, parse, default in checks:
        value = getattr(opts, key)
        if value != default:
            try:
                parse(value)
            except ValueError as exc:
                raise ValueError(f"adaptive.{key}={value!r}: {exc}") from None
    gpn = opts.gpus_per_node
    if gpn is not None and (gpn < 1 or gpn & (gpn - 1)):
        raise ValueError(f"adaptive.gpus_per_node={gpn} must be a power of two (1, 2, 4, ...)")
    _positive("adaptive.time_limit", opts.time_limit)
    if opts.zero_stage not in (0, 1, 2, 3):
        raise ValueError(
            f"adaptive.zero_stage={opts.zero_stage!r}; use 0 (replicated), 1 (sharded "
            "optimizer state), 2 (and gradients) or 3 (and parameters)"
        )
    _positive("adaptive.zero_bucket_mb", opts.zero_bucket_mb)


def _check_optim(opt: OptimConfig) -> None:
    _positive("train.steps", opt.steps)
    _positive("train.lr", opt.lr)
    _positive("train.global_batch", opt.global_batch)
    _positive("train.warmup_steps", opt.warmup_steps, allow_zero=True)
    _positive("train.weight_decay", opt.weight_decay, allow_zero=True)
    _positive("train.grad_clip", opt.grad_clip, allow_zero=True)
    if not 0 <= opt.min_lr_ratio <= 1:
        raise ValueError(f"train.min_lr_ratio={opt.min_lr_ratio} must lie in [0, 1]")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(opt, key) < 1:
            raise ValueError(f"train.{key}={getattr(opt, key)} must lie in [0, 1)")
    _one_of("train.dtype", opt.dtype, DTYPES)
    _one_of("train.device", opt.device, DEVICES)


def _check_backends(cfg: Config, spec: ModelSpec) -> None:
    """Each family's backend is a name of its registry or ``auto``; a named backend that cannot
    run on the training device with ``train.dtype`` fails here instead of at the first layer.
    A config checked away from its GPUs (``train.device=cuda``, none visible, e.g. on a login
    node) skips the device check; the launcher validates again where the run starts."""
    try:
        device = pick_device(cfg.train.device)
    except ValueError:
        device = None
    mixers = set(spec.layers)
    families = (
        ("attention_backend", BACKENDS, "softmax"),
        ("linear_backend", LINEAR_BACKENDS, "linear"),
    )
    for key, table, mixer in families:
        name = getattr(cfg.parallel, key)
        _one_of(f"parallel.{key}", name, ("auto", *table))
        if name == "auto" or mixer not in mixers or device is None:
            continue
        reason = unavailable_reason(name, device, getattr(torch, cfg.train.dtype), table)
        if reason is not None:
            raise ValueError(
                f"parallel.{key}={name!r} cannot run on {device.type} with "
                f"train.dtype={cfg.train.dtype}: {reason}; use auto or torch"
            )


def layout_multiple(cfg: Config) -> int:
    """What every document must be padded to: ``sp`` (contiguous) or ``2 sp`` (zigzag)."""
    return cfg.parallel.sp * chunks_per_rank(cfg.parallel.layout)


def _check_data(cfg: Config, spec: ModelSpec) -> None:
    data, dp = cfg.data, cfg.parallel.dp
    _one_of("data.source", data.source, DATA_SOURCES)
    _positive("data.seq_len", data.seq_len)
    if cfg.planner == "static":
        _check_packing(cfg)
        _check_conv_pieces(cfg, spec)
    if cfg.train.global_batch % dp:
        raise ValueError(
            f"train.global_batch={cfg.train.global_batch} is not divisible by parallel.dp={dp}"
        )
    vocab_key = model_key(cfg.model, "vocab_size", "vocab_size")
    if data.source == "recall":
        _check_recall(data.recall, data.seq_len, spec.vocab_size, vocab_key)
    else:
        _check_paths(data.source, data.paths)
    if data.source == "shards":
        vocab = ShardCorpus(data.paths).vocab_size
        if vocab > spec.vocab_size:
            raise ValueError(
                f"{vocab_key}={spec.vocab_size} is smaller than the shards' vocab_size {vocab} "
                f"(data.paths={data.paths})"
            )
        return
    if data.tokenizer is None and cfg.model.hf is not None:
        from distseq.hf.model import has_tokenizer

        if has_tokenizer(cfg.model.hf):
            data.tokenizer = cfg.model.hf
    if data.tokenizer is not None and not Path(data.tokenizer).is_dir():
        raise ValueError(f"data.tokenizer={data.tokenizer!r} is not a local directory")
    if data.source in ("text", "hf_dataset"):
        size = load_tokenizer(data.tokenizer).vocab_size
        if size > spec.vocab_size:
            raise ValueError(
                f"{vocab_key}={spec.vocab_size} is smaller than the tokenizer's "
                f"{size} ids (data.tokenizer={data.tokenizer!r})"
            )


_PATH_KINDS = {
    "text": ("file", ".txt/.jsonl files"),
    "hf_dataset": ("any", "Hugging Face datasets saved to disk or .parquet/.arrow files"),
    "shards": ("dir", "shard directories from `python -m distseq.data prepare`"),
}


def _check_paths(source: str, paths: list[str]) -> None:
    kind, what = _PATH_KINDS[source]
    if not paths:
        raise ValueError(f"data.paths is empty; data.source={source} needs local {what}")
    for path in paths:
        ok = {"file": Path(path).is_file, "dir": Path(path).is_dir, "any": Path(path).exists}
        if not ok[kind]():
            noun = {"file": "a file", "dir": "a directory", "any": "an existing path"}[kind]
            raise ValueError(f"data.paths entry {path!r} is not {noun} (data.source={source})")


def _check_packing(cfg: Config) -> None:
    """Static packing: fixed ``seq_len`` sequences whose documents are padded to the fixed
    ``data.pad_multiple`` (the adaptive planner pads per group instead)."""
    data, par = cfg.data, cfg.parallel
    need = layout_multiple(cfg)
    if data.pad_multiple <= 0 or data.pad_multiple % need:
        raise ValueError(
            f"data.pad_multiple={data.pad_multiple} is not a positive multiple of the layout's "
            f"{need} (parallel.sp={par.sp} x {chunks_per_rank(par.layout)} chunks per rank for "
            f"parallel.layout={par.layout}); set data.pad_multiple to a multiple of {need} "
            "(the same value for every layout the run may resume at)"
        )
    if data.seq_len % data.pad_multiple:
        raise ValueError(
            f"data.seq_len={data.seq_len} is not a multiple of data.pad_multiple="
            f"{data.pad_multiple}; use {-(-data.seq_len // data.pad_multiple) * data.pad_multiple}"
        )


def _check_conv_pieces(cfg: Config, spec: ModelSpec) -> None:
    """Gated DeltaNet's short convolution takes its history from the previous piece only, so
    every piece of a (padded) document needs ``GDN_CONV_SIZE - 1`` tokens."""
    pieces = layout_multiple(cfg)
    if "gdn" not in spec.layers or pieces == 1:
        return
    shortest = cfg.data.pad_multiple // pieces
    if shortest < GDN_CONV_SIZE - 1:
        need = pieces * (GDN_CONV_SIZE - 1)
        raise ValueError(
            f"data.pad_multiple={cfg.data.pad_multiple} leaves pieces of {shortest} tokens per "
            f"rank (parallel.sp={cfg.parallel.sp}, parallel.layout={cfg.parallel.layout}); "
            f"gdn layers' convolution needs {GDN_CONV_SIZE - 1}: set data.pad_multiple to a "
            f"multiple of {pieces} that is at least {need}"
        )


def _check_recall(rc: RecallConfig, seq_len: int, vocab: int, vocab_key: str) -> None:
    for key in ("n_keys", "n_values", "n_pairs", "n_queries", "min_len"):
        _positive(f"data.recall.{key}", getattr(rc, key))
    if rc.n_pairs > rc.n_keys:
        raise ValueError(
            f"data.recall.n_pairs={rc.n_pairs} exceeds data.recall.n_keys={rc.n_keys} "
            "(keys in one document are distinct)"
        )
    if rc.n_queries > rc.n_pairs:
        raise ValueError(
            f"data.recall.n_queries={rc.n_queries} exceeds data.recall.n_pairs={rc.n_pairs}"
        )
    shortest = 2 * (rc.n_pairs + rc.n_queries) + 1
    if rc.min_len < shortest or rc.max_len < rc.min_len:
        raise ValueError(
            f"data.recall.min_len={rc.min_len} / max_len={rc.max_len}: need "
            f"{shortest} <= min_len <= max_len (pairs + separator + queries)"
        )
    if rc.max_len > seq_len:
        raise ValueError(f"data.recall.max_len={rc.max_len} exceeds data.seq_len={seq_len}")
    if recall_vocab_size(rc) > vocab:
        raise ValueError(
            f"data.recall needs {recall_vocab_size(rc)} token ids but {vocab_key}={vocab}"
        )


def _check_resilience(cfg: Config) -> None:
    """Checkpointing, the process-group timeout and non-finite step handling."""
    ckpt = cfg.checkpoint
    _positive("checkpoint.every", ckpt.every, allow_zero=True)
    _positive("checkpoint.keep_last", ckpt.keep_last, allow_zero=True)
    if ckpt.resume == "":
        raise ValueError(
            "checkpoint.resume='' names nothing; use auto, latest, none or a step_N dir"
        )
    _positive("parallel.timeout_s", cfg.parallel.timeout_s)
    skip = cfg.train.skip_nonfinite
    _positive("train.skip_nonfinite", skip, allow_zero=True)
    if skip and cfg.parallel.engine == "deepspeed" and cfg.planner == "static":
        raise ValueError(
            f"train.skip_nonfinite={skip} with parallel.engine=deepspeed: DeepSpeed clips and "
            "updates in one call, so a non-finite step cannot be skipped (it stops the run); "
            "set train.skip_nonfinite=0 or use ddp / fsdp"
        )


def _check_export(cfg: Config) -> None:
    target = cfg.checkpoint.export_hf
    if target is None:
        return
    if cfg.model.hf_key is None:
        raise ValueError(
            f"checkpoint.export_hf={target!r} writes a Hugging Face model, but this run trains "
            "distseq's own decoder; set model.hf or model.hf_config, or remove export_hf"
        )
    if not target or Path(target).is_file():
        raise ValueError(f"checkpoint.export_hf={target!r} must name a directory")
