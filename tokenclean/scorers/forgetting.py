"""Forgetting (Taheri, Taban et al., TMLR 2026, arXiv 2508.04329; alireza-taban/Forgetting-A-New-Mechanism-...):
Token Cleaning's offline influence score l_base - l_ref with the warm-up reference, the top keep_ratio of response
tokens kept (the paper: 0.7, `selection.keep_ratio=0.7`; ranked by selection.method as every offline scorer), and
the rest not ignored but *unlearned*: at optimiser step s of S the step's loss is

  negative_norm=dropped (the reference code's finetune.py):  mean_kept(l) - lambda(s) * mean_dropped(l)
  negative_norm=kept:                                        (sum_kept(l) - lambda(s) * sum_dropped(l)) / n_kept
  lambda(s) = (t_max - t_min) * s / S                       (t_max 0.25, t_min 1e-5; s = 0, 1, ..., S - 1)

As house weights: a kept token weighs 1, a dropped one -lambda(s) * c_s with c_s = n_kept(s) / n_dropped(s) (the
step's counts over every micro-batch and rank; 1 for negative_norm=kept), and the step's loss is the signed weighted
sum over the kept count: exact under accumulation and across processes (train.fit's normaliser). The reference code
takes each mean per micro-batch and per GPU instead; its lambda restarts with every epoch (it counts the steps of
the epoch); here s counts the stage's steps. It also unlearns int(n (1 - rho)) tokens, which can be one short of
the n - int(n rho) dropped ones; here every dropped token is unlearned. A step that keeps no token trains nothing
(c_s = 0, as the reference code's loss then is the unlearning term over 1e-10 kept tokens).

The decision (keep) is a plain mask, as influence's; the weights each token carried when last trained are stored as
train_weights, and cleaned.parquet labels every token of nonzero weight and carries the signed weights.
"""
from __future__ import annotations

import numpy as np

from tokenclean.config import Method, check
from tokenclean.ragged import Ragged
from tokenclean.scorers import Scorer
from tokenclean.scorers.influence import score


def lambda_at(step: int, n_steps: int, t_max: float, t_min: float) -> float:
    """The reference code's linear balancing coefficient at 0-based optimiser step `step` of `n_steps`."""
    return (t_max - t_min) * step / n_steps


class ForgettingWeights:
    """A train.OnlineHook over one stage: each step's kept tokens weigh 1 and its dropped ones -lambda(s) c_s;
    the step's normaliser is its kept count. Nothing is ranked while training: the decision is `keep`."""

    def __init__(self, keep: Ragged, target: Ragged, n_steps: int, t_max: float, t_min: float,
                 negative_norm: str = "dropped"):
        assert keep.same_layout(target) and keep.values.dtype == bool
        self.target = target
        is_t = np.asarray(target.values, bool)
        self.kept = np.asarray(keep.values, bool) & is_t
        self.dropped = is_t & ~self.kept
        self.n_kept, self.n_dropped = target.like(self.kept).row_sums(), target.like(self.dropped).row_sums()
        self.n_steps, self.t_max, self.t_min, self.negative_norm = n_steps, t_max, t_min, negative_norm
        self.weights = np.where(is_t, np.nan, 0.0).astype(np.float32)   # NaN: a response token not trained yet
        self.lambdas = []          # lambda(s) of every step trained, in order
        self._step_i = -1

    def negative_weight(self, step_i: int, n_kept: int, n_dropped: int) -> float:
        lam = lambda_at(step_i, self.n_steps, self.t_max, self.t_min)
        if self.negative_norm == "kept":
            return -lam
        return -lam * n_kept / n_dropped if n_dropped else 0.0

    def begin_step(self, accelerator, model, step, micro, n_micro, micro_size, input_ids, pad_id):
        self._step_i += 1
        n_kept, n_dropped = int(self.n_kept[step].sum()), int(self.n_dropped[step].sum())
        negative = np.float32(self.negative_weight(self._step_i, n_kept, n_dropped))
        self.lambdas.append(lambda_at(self._step_i, self.n_steps, self.t_max, self.t_min))
        rows = {}
        for i in step:
            lo, hi = self.target.offsets[int(i)], self.target.offsets[int(i) + 1]
            row = np.where(self.kept[lo:hi], np.float32(1), np.where(self.dropped[lo:hi], negative, np.float32(0)))
            rows[int(i)] = row.astype(np.float32)
            is_t = self.kept[lo:hi] | self.dropped[lo:hi]
            self.weights[lo:hi][is_t] = rows[int(i)][is_t]
        return rows, n_kept

    def weigh(self, idx, losses, n_kept):
        return losses, n_kept        # train.fit applied the rows' weights already

    def finish(self, accelerator) -> None:
        pass                         # every rank computed every step's weights itself

    def shared_state(self) -> dict:
        return {"weights": self.weights, "lambdas": np.asarray(self.lambdas, np.float64), "step_i": self._step_i}

    def rank_state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        self.weights, self.lambdas = state["weights"], [float(x) for x in state["lambdas"]]
        self._step_i = int(state["step_i"])

    def weights_ragged(self) -> Ragged:
        return self.target.like(np.nan_to_num(self.weights, nan=0.0).astype(np.float32))

    def summary(self) -> dict:
        unlearned = self.dropped & (np.nan_to_num(self.weights) < 0)
        return {"forgetting_tokens_unlearned": int(unlearned.sum()),
                "forgetting_lambda_last": self.lambdas[-1] if self.lambdas else None}


def step_weights(cfg, keep: Ragged, target: Ragged, n_steps: int) -> ForgettingWeights:
    f = cfg.scorer.forgetting
    return ForgettingWeights(keep, target, n_steps, f.t_max, f.t_min, str(f.negative_norm))


def validate(cfg) -> None:
    f = cfg.scorer.forgetting
    check(f.t_min >= 0, "scorer.forgetting.t_min", f.t_min, "must be >= 0")
    check(f.t_max >= f.t_min, "scorer.forgetting.t_max", f.t_max, f"must be >= scorer.forgetting.t_min ({f.t_min})")
    check(cfg.selection.method != Method.soft, "selection.method", cfg.selection.method,
          "scorer=forgetting splits the tokens into kept and unlearned ones, it has no soft weights; use "
          "selection=global (the paper) or sample or threshold")


SCORER = Scorer("forgetting", needs_reference=True, score=score, step_weights=step_weights, validate=validate)
