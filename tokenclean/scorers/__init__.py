"""Token scorers: which response tokens are worth learning. One module per scorer; each declares a `Scorer`
(named SCORER) that says what it needs and how it scores, and the pipelines and the report ask that description
instead of comparing names. Adding a scorer is one module here, one YAML in conf/scorer/ and its tests.

  module        score (higher = keep)                     needs                  where it ranks
  ------------  ----------------------------------------  ---------------------  --------------------------------
  influence     l_base - l_ref             (Token Cleaning) base + reference      offline, by selection.method:
                                                                                  global (the paper), sample (the
                                                                                  reference code's "rho" baseline)
  rho           l_current - l_ref          (Rho-1)          cached l_ref          online, per training batch
  self_online   l_base - l_current         (ssToken's REL)  cached l_base         online, per training batch
  xtf           KN, RI, TR union rule      (XTF)            base model only       offline, rules (own keep ratio)
  entropy       -H_base (predictive entropy)                base model only       offline, by selection.method
  profit        p_current = exp(-l_current)    (ProFit)     nothing                online, own rule: p >= tau
  forgetting    l_base - l_ref; dropped ones unlearned       base + reference      offline (as influence); trains
                with weight -lambda(step)     (Forgetting)                         its decision with signed weights
  eksft         KL(p_cur || p_ref), H(p_cur): the top       reference model       online, own rule: the top 20% by
                20% leave the CE, regularised  (EKSFT)      (in memory)           KL and/or entropy per step
  sstoken       g norm(l_base - l_current) + (1 - g) A     cached l_base,         online, per sample (selection=
                A: last layer's attention to the prompt     the last layer's q/k   sample); attention alone in the
                                              (ssToken)                            warm-up
  (baselines)   selection=random, selection=all            nothing                offline

The reference is the fixed pipeline's warm-up model, or in self-evolving rounds the current model theta_t.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from tokenclean.config import BASELINES, Config, ConfigError, Method, OnlineScope, check
from tokenclean.ragged import Ragged


@dataclass
class Signals:
    """What a pipeline hands an offline scorer for one set of examples (the training pool, or a round's chunk): the
    per-token signals the pipeline computed, and for a scorer that runs a model of its own (XTF) what that takes."""
    examples: Any                           # tokenclean.data.Examples: input_ids and the response mask (target)
    base_losses: Ragged | None = None       # l(x_j; base), NaN outside the response
    reference_losses: Ragged | None = None  # l(x_j; reference)
    base_entropy: Ragged | None = None      # entropy of the base's prediction at j
    cfg: Config | None = None               # the run's config (scorer.<name>, model, training.score_batch_size, seed)
    accelerator: Any = None                 # accelerate.Accelerator: the device and the processes
    tokenizer: Any = None                   # the base's tokenizer
    base_dir: str | None = None             # the base model's HF checkpoint directory


@dataclass
class Scored:
    """An offline scorer's answer. `keep` (optional) is the scorer's own hard decision (XTF's rules), used instead of
    ranking the scores; `weights` (optional) its own soft weights for selection.method=soft; `arrays` are extra
    per-token arrays stored beside the scores (rel path -> array); `info` goes to the manifest and the metrics."""
    scores: Ragged | None
    keep: Ragged | None = None
    weights: Ragged | None = None
    arrays: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Scorer:
    name: str
    needs_reference: bool = False       # the fixed pipeline trains a warm-up reference and computes its losses
    uses_base: bool = True              # reads the base model's per-token losses (computed once per run)
    base_entropy: bool = False          # ... and the base's predictive entropy (computed in the same pass)
    online: bool = False                # ranks tokens per training batch (online.OnlineSelector), not once
    own_rules: bool = False             # decides its tokens by rules of its own (XTF): selection.keep_ratio unused
    pipelines: tuple = ("fixed", "self_evolving")
    reasons: tuple = ()                 # (label, rel path of a bool array of the tokens it calls noise): the report
    score: Callable[[Signals], Scored] | None = None       # offline scorers
    cached: str | None = "base"         # online scorers: the losses cached once, "base", "reference" or None ...
    online_score: Callable | None = None  # ... and score(cached, current) per batch (float64 arrays; cached NaN
    #                                       when None)
    online_rule: Callable | None = None   # online + own_rules: rule(cfg) -> keep(scores) (bool), its own decision
    #                                       per batch instead of selection.method (ProFit's probability threshold)
    validate: Callable[[Config], None] | None = None       # the scorer's own config checks (raise ConfigError)
    # offline scorers whose decision trains with weights of their own, per step: step_weights(cfg, keep, target,
    # n_steps) -> a train.OnlineHook over the stage (Forgetting: -lambda(step) on the dropped tokens), with
    # .weights_ragged() (each token's weight when last trained: cleaned.parquet's weights) and .summary()
    step_weights: Callable | None = None
    # online scorers whose per-batch choice needs more than score(cached, current): online_hook(cfg, target, cached,
    # reference) -> a train.OnlineHook used instead of online.OnlineSelector, with its results (scores_ragged,
    # keep_ragged, summary, arrays: rel -> Ragged stored beside the scores). ssToken: per-sample normalisation and
    # the last layer's attention; EKSFT: KL to the reference *model* per position
    online_hook: Callable | None = None
    # online_hook's `reference`: a whole copy of the stage's reference model on this rank (the fixed pipeline's
    # warm-up model; a self-evolving round's theta_t), else None
    reference_model: bool = False


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name != "online")


def get(name: str) -> Scorer:
    if name not in names():
        raise ConfigError(f"scorer.name={name!r}: must be one of {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}").SCORER


def validate(cfg: Config) -> None:
    """The scorer's part of validation: its pipelines, online constraints and its own checks."""
    s = cfg.selection
    scorer = get(cfg.scorer.name)
    if s.method in BASELINES:
        return  # a baseline: no scorer runs
    check(cfg.pipeline.name in scorer.pipelines, "pipeline.name", cfg.pipeline.name,
          f"scorer={scorer.name} runs in the {' and '.join(scorer.pipelines)} pipeline only; use pipeline="
          f"{scorer.pipelines[0]}, or a scorer that runs in {cfg.pipeline.name} (influence, self_online, entropy)")
    if scorer.online:
        check(cfg.pipeline.train_final, "pipeline.train_final", cfg.pipeline.train_final,
              f"scorer={scorer.name} chooses tokens while the final model trains (online), so there is nothing to "
              "export without training it; score-only runs need an offline scorer (influence, entropy, xtf)")
        # a rule whose count is known only once scored: the step's loss normaliser must be known before the
        # first backward, which micro scope's first forward would need
        counted_late = f"scorer={scorer.name} (its own rule)" if scorer.own_rules else \
            f"selection.method={s.method}" if s.method in (Method.threshold, Method.soft) else None
        check(not (counted_late and cfg.scorer.online_scope == OnlineScope.micro), "scorer.online_scope",
              cfg.scorer.online_scope, f"{counted_late} needs online_scope=step (the step's loss normaliser must be "
              "known before the first backward)")
    check(cfg.pipeline.train_final or scorer.step_weights is None, "pipeline.train_final", cfg.pipeline.train_final,
          f"scorer={scorer.name} weighs its decision per training step (its weights depend on the step), so a "
          "score-only run has nothing of its own to export; run it with training, or score with scorer=influence")
    if scorer.validate is not None:
        scorer.validate(cfg)
