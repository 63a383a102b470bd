"""Per-token soft weights: every response token trains with a weight in [0, 1] instead of a hard keep/drop.

    w_j = sigmoid((s_j - tau) / (temperature * sigma))

tau is the score at the hard cut (the floor(n * keep_ratio)-th largest score of the n candidates, the token that
`selection.method=global` keeps last), sigma the standard deviation of the candidates' scores. A token at the cut
gets 1/2, a token one temperature-sigma above it 0.73, below it 0.27; as temperature -> 0 the weights become the
hard top-keep_ratio mask. Scale-free: multiplying every score by a constant changes nothing. Tokens outside the
response weigh 0. Training minimises sum_j w_j l_j / sum_j w_j over each optimiser step (tokenclean/train.py), and
cleaned.parquet carries the weights as a `weights` column next to `labels`.
"""
from __future__ import annotations

import numpy as np


def soft_weights(scores: np.ndarray, keep_ratio: float, temperature: float) -> np.ndarray:
    """float32 weights for the candidate scores `scores` (finite, one per candidate token)."""
    s = np.asarray(scores, np.float64)
    if len(s) == 0:
        return np.zeros(0, np.float32)
    k = max(int(np.floor(len(s) * keep_ratio + 1e-9)), 1)
    tau = np.partition(s, len(s) - k)[len(s) - k]
    sigma = max(float(s.std()), 1e-12)
    z = np.clip((s - tau) / (temperature * sigma), -60.0, 60.0)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
