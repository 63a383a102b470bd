"""Entropy rule, no reference model: score = -H_j, the negative entropy of the base model's predictive distribution
at position j (H_j = -sum_v p(v | x_<j) log p(v | x_<j)). Positions where the base is unsure what comes next score
low and are the first dropped; confident positions are kept. This is the entropy criterion of EKSFT (arXiv
2605.29303, which also masks tokens of high KL to a reference) and the signal behind entropy-weighted SFT losses
(LLaMA-Factory's EAFT); with selection=soft it becomes such a weighting. It needs one forward pass of the base and
nothing else, in both pipelines (the base's entropies are computed once, with its losses)."""
from __future__ import annotations

import numpy as np

from tokenclean.scorers import Scored, Scorer, Signals


def score(signals: Signals) -> Scored:
    h = signals.base_entropy
    return Scored(h.like(-np.asarray(h.values, np.float32)))


SCORER = Scorer("entropy", base_entropy=True, score=score)
