"""ProFit (Utaotao/ProFit, a LLaMA-Factory fork): online and reference-free. In every training forward each response
token's probability under the current model, p_j = exp(-l_current(x_j)), decides whether it trains: tokens with
p_j >= tau (scorer.profit.tau, 0.1) carry their cross-entropy, the others none, that step. The reference code's
`_profit_cross_entropy` (threshold_direction=higher) drops `p < tau` on the detached probability, so a token at
exactly tau is kept.

It is the house's online selection with a rule of its own (OnlineSelector's `rule`): the score recorded per token
is p_j as it was when the token was last trained (rounded to 2^-16, online.SCORE_RESOLUTION), the decision is the
threshold, so selection.keep_ratio is not used and the kept share is ProFit's own. It caches nothing and runs no
pass before training in the fixed pipeline; in self-evolving rounds t >= 1 train with it (round 0 on every token).

Normalisation: the house's, the step's loss is the sum of the kept tokens' losses over the number kept in the whole
optimiser step (all micro-batches and ranks). The reference code divides by every response token of the batch
(LLaMA-Factory's num_items_in_batch), a per-step rescaling of the gradient by kept/all that AdamW undoes except for
its variation from step to step.
"""
from __future__ import annotations

import numpy as np

from tokenclean.config import Method, check
from tokenclean.scorers import Scorer


def probability(_cached, current):
    """p = exp(-l) of the current model (nothing cached)."""
    return np.exp(-current)


def rule(cfg):
    tau = cfg.scorer.profit.tau
    return lambda p: p >= tau


def validate(cfg) -> None:
    check(0 <= cfg.scorer.profit.tau <= 1, "scorer.profit.tau", cfg.scorer.profit.tau, "a probability: in [0, 1]")
    check(cfg.selection.method != Method.soft, "selection.method", cfg.selection.method,
          "scorer=profit decides by its own threshold (scorer.profit.tau), it has no soft weights; use "
          "selection=global (its rule then replaces the ratio)")


SCORER = Scorer("profit", uses_base=False, online=True, own_rules=True, cached=None, online_score=probability,
                online_rule=rule, validate=validate)
