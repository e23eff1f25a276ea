"""Typed schemas of the training config and their validation.

The dataclasses below are registered in Hydra's ConfigStore as the schema of
configs/config.yaml (``base_config``) and of each group, so an unknown key or a value of
the wrong type fails at compose time with the key's name. `validate()` then checks the
values (ranges, choices, cross-field rules) before any work is done; each problem is one
line naming the key and what would be valid (`ConfigError`, exit code 2 from the CLI).

Every key, with its default, is documented in docs/configuration.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from kimi_train.data.indexed import RAW_DTYPES
from kimi_train.data.sources import SOURCES
from kimi_train.errors import UserError
from kimi_train.data.tokenizer import TOKENIZER_KINDS
from kimi_train.model.config import ModelConfig
from optim.muon import ADJUST_LR, NS_DTYPE_NAMES
from optim.newton_schulz import NS_BACKENDS, NS_METHODS

OPTIMIZERS = ("muonclip", "muon", "adamw")
ENGINES = ("fsdp2", "deepspeed")
ZERO_STAGES = (1, 2, 3)
TRAIN_DTYPES = ("auto", "fp32", "bf16")
ACTIVATION_CHECKPOINTING = ("none", "selective", "full")
PP_SCHEDULES = ("1F1B", "Interleaved1F1B")  # kimi_train/parallel/pipeline_engine.py
RESUME_MODES = ("auto", "never")
WANDB_MODES = ("offline", "online", "disabled")
SCHEDULE_TYPES = ("wsd", "cosine", "constant")  # kimi_train.loop.schedule implements them
DECAY_SHAPES = ("cosine", "linear")


class ConfigError(UserError, ValueError):
    """A bad config value: the message is one line naming the key and the valid values."""


@dataclass
class QKClipConfig:
    enabled: bool = True  # optim=muonclip only: rescale q/k rows of heads whose max logit exceeds tau
    tau: float = 100.0  # K2 used 100; a soft cap at small batch (docs/stability.md)


@dataclass
class OptimConfig:
    name: str = "muonclip"  # muonclip | muon | adamw
    lr: float = 2e-4
    weight_decay: float = 0.1
    momentum: float = 0.95  # Muon momentum
    nesterov: bool = True
    ns_steps: int = 5
    ns_method: str = "keller"  # keller | polar_express | gram
    ns_dtype: str = "bf16"  # bf16 | fp32 (or fp16, fp64): dtype of the Newton-Schulz iteration
    ns_backend: str = "auto"  # auto | torch | triton
    adjust_lr: str = "match_rms_adamw"  # Muon update scale: match_rms_adamw | original | none
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW (and Muon's AdamW groups)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping (the norm is still logged)
    qk_clip: QKClipConfig = field(default_factory=QKClipConfig)


@dataclass
class ScheduleConfig:
    type: str = "wsd"  # wsd | cosine | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: share of train.steps spent decaying at the end
    decay_shape: str = "cosine"  # wsd: cosine | linear
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * optim.lr (wsd and cosine)


@dataclass
class MixSource:
    path: str  # a prepared directory, a Megatron prefix or a token file
    weight: float = 1.0  # share of the training tokens (normalised over data.mix)
    max_epochs: Optional[float] = None  # refuse a run that would read this source more often


@dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib | files | hub (prepared into cache_dir on first use) | prepared
    # files: local .txt/.md, .json/.jsonl(.gz), .parquet files or directories of them;
    # prepared: prepared directories, Megatron prefixes (P of P.bin/P.idx) or .bin/.npy token files
    paths: list[str] = field(default_factory=list)
    mix: list[MixSource] = field(default_factory=list)  # a weighted mixture of prepared datasets (docs/training.md)
    name: Optional[str] = None  # hub: dataset name, streamed
    subset: Optional[str] = None  # hub: dataset config name
    split: str = "train"  # hub: split to stream
    text_field: str = "text"  # json/jsonl/parquet/hub: the column holding the text
    max_bytes: int = 16_000_000  # read at most this much text (0 = all)
    tokenizer: str = "byte"  # byte | bpe | hf
    tokenizer_path: Optional[str] = None  # hf: a local tokenizer.json or tokenizer directory
    bpe_vocab_size: int = 4096  # bpe: trained on the corpus, cached in cache_dir
    bpe_sample_bytes: int = 50_000_000  # bpe: trained on the first this-much text of the source
    cache_dir: Optional[str] = None  # default $KIMI_TRAIN_CACHE or ~/.cache/kimi_train
    val_fraction: float = 0.01  # held out: the documents from this share of the tokens from the end
    val_sequences: int = 64  # validation windows (seq_len + 1 tokens) from the held-out documents
    dtype: Optional[str] = None  # raw token files (.bin/.npy without a header): uint16 | uint32 | int32 ...
    eod_id: Optional[int] = None  # raw token files: the end-of-document id (where held-out documents begin)


@dataclass
class DeepSpeedConfig:
    """parallel.engine=deepspeed only (docs/distributed.md)."""

    offload_optimizer: bool = False  # ZeRO-Offload: fp32 master partitions and optimizer state on the CPU
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduce bucket
    allgather_bucket_size: int = 500_000_000  # elements per all-gather bucket (stage 3: prefetch bucket)


@dataclass
class ParallelConfig:
    engine: str = "fsdp2"  # fsdp2 | deepspeed
    zero_stage: int = 3  # engine=deepspeed: ZeRO stage 1 | 2 | 3 (FSDP2 shards like stage 3)
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: every rank not used by dp_replicate
    ep: int = 1
    # Pipeline parallelism (docs/distributed.md "Pipeline parallelism"): pp stages by depth, each
    # with its own dp_replicate * dp_shard data ranks; world = pp * dp_replicate * dp_shard.
    pp: int = 1
    pp_schedule: str = "1F1B"  # 1F1B | Interleaved1F1B (two stages per rank, or len(pp_layout) / pp)
    # Pipeline micro-batches per step, each train.micro_batch_size sequences: they ARE the step's
    # accumulation micro-batches, so global_batch_size = micro_batch_size * pp_microbatches * dp.
    # -1: global_batch_size / (micro_batch_size * dp), or pp when global_batch_size is null.
    pp_microbatches: int = -1
    # Decoder layers per stage (stage 0 also has the embedding, the last the norm, lm_head and the
    # loss), e.g. [1, 3]; null: an even split.
    pp_layout: Optional[list[int]] = None
    # Seconds a collective may wait before the job fails (torch's process-group timeout).
    timeout_s: float = 1800.0
    # Seconds every rank may take to join the process group at start (slow node starts). One-time
    # preparation (data, tokenizer) is not bounded by either: other ranks wait for it outside any collective.
    init_timeout_s: float = 1800.0
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class TrainLoopConfig:
    steps: int = 300
    seed: int = 0
    seq_len: int = 128
    micro_batch_size: int = 8
    global_batch_size: Optional[int] = None  # sequences per optimizer step; null = micro_batch_size * dp
    log_every: int = 10
    val_every: int = 100  # 0 = only at the end
    val_batches: int = 8
    max_skipped_steps: int = 10  # non-finite loss/grad steps tolerated before stopping
    compile: bool = False  # torch.compile the model
    # Recompute activations in the backward (docs/training.md "Memory"): none | selective (K2's set:
    # norms, SwiGLU, RoPE, MLA up-projections) | full (each decoder layer from its input)
    activation_checkpointing: str = "none"
    recompute_moe_down_proj: bool = False  # selective: also recompute the routed experts' down projection
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    # torch intra-op threads per process. 1 vs 2 on 2 cores: 7-14x faster when other jobs run, ~1.5x
    # slower when idle (docs/training.md). The count changes CPU results: a resume must keep it.
    cpu_threads: int = 1
    peak_flops: Optional[float] = None  # per device, for MFU; null = known GPU table (none on CPU)
    expert_bias_rate: float = 1e-3  # aux-loss-free balancing: bias += rate * sign(mean load - load)


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps; 0 = only at the end
    keep: int = 2  # complete checkpoints kept (oldest deleted)


@dataclass
class LoggingConfig:
    wandb: str = "offline"  # offline | online | disabled
    wandb_project: str = "kimi-train"
    progress_bar: bool = True
    plots: bool = True  # write PNG plots into run_dir at the end
    # Diagnostic (one extra no-grad forward per step): also log the max logit of the updated,
    # QK-clipped weights on the step's own batch, "max_logit_post_step" (docs/stability.md).
    post_step_max_logit: bool = False


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_name: Optional[str] = None  # null: "<model>-<optim>" from the config choices
    run_dir: Optional[str] = None  # null: runs/<run_name>
    resume: str = "auto"  # auto: continue from the latest complete checkpoint in run_dir | never


def register_configs() -> None:
    """Register the schemas with Hydra (configs/config.yaml lists base_config first in its defaults)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=TrainConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="optim", name="base_optim", node=OptimConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="parallel", name="base_parallel", node=ParallelConfig)


def _one_of(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; valid values: {', '.join(valid)}")


def _check(ok: bool, key: str, value: Any, want: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not valid; {want}")


def grad_accum_steps(cfg: TrainConfig, dp_size: int) -> int:
    """Micro-batches per optimizer step on each data rank: global / (micro * dp); with pipeline
    parallelism and no global_batch_size, parallel.pp_microbatches (-1: pp)."""
    t, p = cfg.train, cfg.parallel
    if t.global_batch_size is None:
        if p.pp > 1:
            return p.pp_microbatches if p.pp_microbatches > 0 else p.pp
        return 1
    return t.global_batch_size // (t.micro_batch_size * dp_size)


def validate(cfg: TrainConfig, dp_size: int = 1) -> TrainConfig:
    """Check every value; raise ConfigError with one line naming the first bad key."""
    o, s, d, t, c = cfg.optim, cfg.schedule, cfg.data, cfg.train, cfg.checkpoint
    try:
        cfg.model.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None

    _one_of("optim.name", o.name, OPTIMIZERS)
    _check(math.isfinite(o.lr) and o.lr > 0, "optim.lr", o.lr, "must be a finite number > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _check(o.ns_steps >= 1, "optim.ns_steps", o.ns_steps, "must be >= 1")
    _one_of("optim.ns_method", o.ns_method, NS_METHODS)
    _one_of("optim.ns_dtype", o.ns_dtype, tuple(NS_DTYPE_NAMES))
    _one_of("optim.ns_backend", o.ns_backend, NS_BACKENDS)
    _one_of("optim.adjust_lr", o.adjust_lr, ADJUST_LR)
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas),
           "must be two numbers in [0, 1), e.g. [0.9,0.95]")
    _check(o.eps > 0, "optim.eps", o.eps, "must be > 0")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 = no clipping)")
    _check(math.isfinite(o.qk_clip.tau) and o.qk_clip.tau > 0, "optim.qk_clip.tau", o.qk_clip.tau,
           "must be a finite number > 0 (K2 uses 100)")

    _one_of("schedule.type", s.type, SCHEDULE_TYPES)
    _one_of("schedule.decay_shape", s.decay_shape, DECAY_SHAPES)
    _check(s.warmup_steps >= 0, "schedule.warmup_steps", s.warmup_steps, "must be >= 0")
    _check(0 <= s.decay_fraction <= 1, "schedule.decay_fraction", s.decay_fraction, "must be in [0, 1]")
    _check(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio", s.min_lr_ratio, "must be in [0, 1]")

    validate_data(d)
    _check(d.tokenizer != "bpe" or d.bpe_vocab_size <= cfg.model.vocab_size, "data.bpe_vocab_size",
           d.bpe_vocab_size, f"must be <= model.vocab_size={cfg.model.vocab_size}")
    _check(d.tokenizer != "byte" or cfg.model.vocab_size >= 256, "model.vocab_size", cfg.model.vocab_size,
           "must be >= 256 for data.tokenizer=byte")

    _check(t.steps >= 1, "train.steps", t.steps, "must be >= 1")
    _check(t.seq_len >= 2, "train.seq_len", t.seq_len, "must be >= 2")
    _check(t.seq_len <= cfg.model.max_position_embeddings, "train.seq_len", t.seq_len,
           f"must be <= model.max_position_embeddings={cfg.model.max_position_embeddings}")
    _check(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, "must be >= 1")
    if t.global_batch_size is not None:
        unit = t.micro_batch_size * dp_size
        _check(t.global_batch_size >= unit and t.global_batch_size % unit == 0, "train.global_batch_size",
               t.global_batch_size,
               f"must be a positive multiple of micro_batch_size * dp ranks = {t.micro_batch_size} * {dp_size}")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    _check(t.val_every >= 0, "train.val_every", t.val_every, "must be >= 0 (0 = only at the end)")
    _check(t.val_batches >= 0, "train.val_batches", t.val_batches, "must be >= 0 (0 = no validation)")
    _check(t.max_skipped_steps >= 0, "train.max_skipped_steps", t.max_skipped_steps, "must be >= 0")
    _one_of("train.dtype", t.dtype, TRAIN_DTYPES)
    _one_of("train.activation_checkpointing", t.activation_checkpointing, ACTIVATION_CHECKPOINTING)
    _check(not t.recompute_moe_down_proj or t.activation_checkpointing == "selective", "train.recompute_moe_down_proj",
           t.recompute_moe_down_proj, "needs train.activation_checkpointing=selective (full recomputes it already)")
    _check(t.cpu_threads >= 1, "train.cpu_threads", t.cpu_threads, "must be >= 1")
    _check(t.peak_flops is None or t.peak_flops > 0, "train.peak_flops", t.peak_flops, "must be > 0 or null")
    _check(t.expert_bias_rate >= 0, "train.expert_bias_rate", t.expert_bias_rate, "must be >= 0")

    _check(c.every >= 0, "checkpoint.every", c.every, "must be >= 0 (0 = only at the end)")
    _check(c.keep >= 1, "checkpoint.keep", c.keep, "must be >= 1")
    _one_of("resume", cfg.resume, RESUME_MODES)
    _one_of("logging.wandb", cfg.logging.wandb, WANDB_MODES)
    clip_on = o.name == "muonclip" and o.qk_clip.enabled
    _check(cfg.model.record_max_logits or not clip_on, "model.record_max_logits", cfg.model.record_max_logits,
           "QK-Clip needs the max logits: keep it true, or set optim.qk_clip.enabled=false")
    _check(cfg.model.record_max_logits or not cfg.logging.post_step_max_logit, "logging.post_step_max_logit",
           cfg.logging.post_step_max_logit, "needs model.record_max_logits=true")
    for key, value in (("run_name", cfg.run_name), ("run_dir", cfg.run_dir)):
        _check(value is None or value.strip() != "", key, value, "must be a non-empty string or null")
    _check(cfg.run_name is None or "/" not in cfg.run_name, "run_name", cfg.run_name,
           "must not contain '/' (use run_dir for a path)")
    p = cfg.parallel
    _check(p.dp_replicate >= 1, "parallel.dp_replicate", p.dp_replicate, "must be >= 1")
    _check(p.dp_shard >= 1 or p.dp_shard == -1, "parallel.dp_shard", p.dp_shard, "must be >= 1 or -1 (all ranks)")
    _check(p.ep >= 1, "parallel.ep", p.ep, "must be >= 1")
    _check(p.timeout_s > 0, "parallel.timeout_s", p.timeout_s, "must be > 0 seconds")
    _check(p.init_timeout_s > 0, "parallel.init_timeout_s", p.init_timeout_s, "must be > 0 seconds")
    _one_of("parallel.engine", p.engine, ENGINES)
    _check(p.zero_stage in ZERO_STAGES, "parallel.zero_stage", p.zero_stage, "must be 1, 2 or 3")
    _validate_pipeline(cfg, dp_size)
    if p.engine == "deepspeed":
        _validate_deepspeed(cfg)
    return cfg


def validate_data(d: DataConfig) -> None:
    """The data keys alone (kimi-train-prepare has no model); validate() adds the vocabulary checks."""
    _one_of("data.source", d.source, SOURCES)
    _one_of("data.tokenizer", d.tokenizer, TOKENIZER_KINDS)
    _check(d.source != "files" or len(d.paths) > 0, "data.paths", list(d.paths),
           "data.source=files needs a list of local files or directories, e.g. data.paths=[a.jsonl]")
    _check(d.source != "prepared" or len(d.paths) > 0 or bool(d.mix), "data.paths", list(d.paths),
           "data.source=prepared needs prepared directories or token files, e.g. data.paths=[DIR] (or data.mix)")
    _check(not (d.mix and d.paths), "data.mix", "[...]", "give data.mix or data.paths, not both")
    for i, m in enumerate(d.mix):
        _check(math.isfinite(m.weight) and m.weight > 0, f"data.mix[{i}].weight", m.weight, "must be > 0")
        _check(m.max_epochs is None or m.max_epochs > 0, f"data.mix[{i}].max_epochs", m.max_epochs,
               "must be > 0 or null")
    _check(d.source != "hub" or bool(d.name), "data.name", d.name, "data.source=hub needs a dataset name")
    _check(d.tokenizer != "hf" or bool(d.tokenizer_path), "data.tokenizer_path", d.tokenizer_path,
           "data.tokenizer=hf needs a local tokenizer.json or tokenizer directory")
    _check(d.bpe_vocab_size >= 260, "data.bpe_vocab_size", d.bpe_vocab_size, "must be >= 260")
    _check(d.bpe_sample_bytes >= 1, "data.bpe_sample_bytes", d.bpe_sample_bytes, "must be >= 1")
    _check(d.max_bytes >= 0, "data.max_bytes", d.max_bytes, "must be >= 0 (0 = no cap)")
    _check(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
    _check(d.val_sequences >= 0, "data.val_sequences", d.val_sequences, "must be >= 0")
    _check(d.dtype is None or d.dtype in RAW_DTYPES, "data.dtype", d.dtype, f"must be one of {', '.join(RAW_DTYPES)}")


def pp_stages_per_rank(p: ParallelConfig) -> int:
    """Pipeline stages each rank holds: 1 under 1F1B; under Interleaved1F1B len(pp_layout) / pp, or 2."""
    if p.pp_schedule == "1F1B":
        return 1
    return len(p.pp_layout) // p.pp if p.pp_layout else 2


def _validate_pipeline(cfg: TrainConfig, dp_size: int) -> None:
    """parallel.pp*: the stages fit the model, the micro-batches fit the schedule and the batch."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    _check(isinstance(p.pp, int) and p.pp >= 1, "parallel.pp", p.pp, "must be an int >= 1")
    _one_of("parallel.pp_schedule", p.pp_schedule, PP_SCHEDULES)
    _check(p.pp_microbatches == -1 or p.pp_microbatches >= 1, "parallel.pp_microbatches", p.pp_microbatches,
           "must be >= 1, or -1 (from train.global_batch_size)")
    if p.pp == 1:
        _check(p.pp_layout is None, "parallel.pp_layout", p.pp_layout, "needs parallel.pp > 1")
        _check(p.pp_schedule == "1F1B", "parallel.pp_schedule", p.pp_schedule, "needs parallel.pp > 1")
        _check(p.pp_microbatches == -1, "parallel.pp_microbatches", p.pp_microbatches,
               "needs parallel.pp > 1 (without PP the micro-batches come from train.global_batch_size)")
        return
    _check(not t.compile, "train.compile", t.compile, "is not supported with parallel.pp > 1 yet")
    _check(p.engine == "fsdp2", "parallel.engine", p.engine, "must be fsdp2 with parallel.pp > 1 "
           "(DeepSpeed's pipeline engine is not supported)")
    _check(not m.tie_word_embeddings, "model.tie_word_embeddings", m.tie_word_embeddings,
           "must be false with parallel.pp > 1 (the embedding and lm_head sit on different stages)")
    layout = list(p.pp_layout) if p.pp_layout else None
    if layout is not None:
        _check(all(isinstance(n, int) and n >= 0 for n in layout) and sum(layout) == m.num_hidden_layers,
               "parallel.pp_layout", layout, f"must be layers per stage (ints >= 0) summing to "
               f"model.num_hidden_layers={m.num_hidden_layers}")
        if p.pp_schedule == "1F1B":
            _check(len(layout) == p.pp, "parallel.pp_layout", layout, f"must give pp={p.pp} stages under 1F1B")
        else:
            _check(len(layout) % p.pp == 0 and len(layout) >= 2 * p.pp, "parallel.pp_layout", layout,
                   f"must give a multiple of pp={p.pp} stages, at least {2 * p.pp}, under Interleaved1F1B")
    stages = p.pp * pp_stages_per_rank(p)
    _check(layout is not None or m.num_hidden_layers >= stages, "parallel.pp", p.pp,
           f"gives {stages} stages ({p.pp_schedule}) but the model has {m.num_hidden_layers} layers")
    accum = grad_accum_steps(cfg, dp_size)
    if p.pp_microbatches > 0 and t.global_batch_size is not None:
        _check(accum == p.pp_microbatches, "parallel.pp_microbatches", p.pp_microbatches,
               f"must equal train.global_batch_size / (micro_batch_size * dp) = {t.global_batch_size} / "
               f"({t.micro_batch_size} * {dp_size}) = {accum} (or -1)")
    if p.pp_schedule == "1F1B":
        _check(accum >= p.pp, "parallel.pp_microbatches", accum, f"must be >= pp={p.pp} under 1F1B (the "
               "step's micro-batches: raise train.global_batch_size or parallel.pp_microbatches)")
    else:
        rounds = max(1, accum // p.pp)
        _check(accum % rounds == 0, "parallel.pp_microbatches", accum,
               f"must be a multiple of max(1, pp_microbatches // pp) = {rounds} under Interleaved1F1B")


def _validate_deepspeed(cfg: TrainConfig) -> None:
    """What parallel.engine=deepspeed can honour (kimi_train/parallel/deepspeed_engine.py)."""
    import importlib.util

    p = cfg.parallel
    _check(p.ep == 1, "parallel.ep", p.ep, "must be 1 with parallel.engine=deepspeed (expert parallelism "
           "runs on parallel.engine=fsdp2)")
    _check(p.dp_replicate == 1, "parallel.dp_replicate", p.dp_replicate,
           "must be 1 with parallel.engine=deepspeed (ZeRO shards over every rank)")
    _check(not cfg.train.compile, "train.compile", cfg.train.compile,
           "is not supported with parallel.engine=deepspeed; use parallel.engine=fsdp2 to compile")
    _check(p.deepspeed.reduce_bucket_size >= 1, "parallel.deepspeed.reduce_bucket_size",
           p.deepspeed.reduce_bucket_size, "must be >= 1 (elements)")
    _check(p.deepspeed.allgather_bucket_size >= 1, "parallel.deepspeed.allgather_bucket_size",
           p.deepspeed.allgather_bucket_size, "must be >= 1 (elements)")
    _check(importlib.util.find_spec("deepspeed") is not None, "parallel.engine", p.engine,
           "needs the deepspeed package, which is not installed: pip install 'kimi-train[deepspeed]' "
           "(or use parallel.engine=fsdp2)")
