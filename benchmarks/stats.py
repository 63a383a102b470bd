"""Paired statistics for comparing two models on the same documents (DESIGN.md section 6).

Both models of a comparison answer the same documents, so their difference is measured per document: far better
determined than either accuracy. `paired` resamples documents (and, with several seeds, seeds) with replacement and
reports the mean difference, its bootstrap standard error and 95% interval, and the smallest true difference this
many documents and seeds would detect (two-sided 5% test, 80% power: (1.96 + 0.84) x the standard error).
"""
from __future__ import annotations

import numpy as np

Z_DETECT = 1.96 + 0.84


def paired(a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> dict:
    """a, b: [seeds, documents] scores of two methods (a[s] and b[s] from the same seed, the same documents in the
    same order; a 1-D array is one seed). Returns the mean of a - b, its bootstrap se, 95% interval, the minimal
    detectable effect, and how many documents only a (only b) got right where the scores are 0/1."""
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same seeds and documents: {a.shape} vs {b.shape}")
    d = a - b
    n_seeds, n_docs = d.shape
    rng = np.random.default_rng(seed)
    docs = rng.integers(0, n_docs, size=(n_boot, n_docs))
    if n_seeds > 1:   # resample the seeds too: a training seed's luck is part of the uncertainty
        seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
        per_seed = np.stack([d[:, idx].mean(axis=1) for idx in docs])      # [boot, seeds]
        boot = np.take_along_axis(per_seed, seeds, axis=1).mean(axis=1)
    else:
        boot = d[0, docs].mean(axis=1)
    se = float(boot.std(ddof=1))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    binary = np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()
    return {"diff": float(d.mean()), "se": se, "ci": (float(lo), float(hi)), "mde": Z_DETECT * se,
            "n_docs": int(n_docs), "n_seeds": int(n_seeds),
            "only_a": int(((a == 1) & (b == 0)).sum()) if binary else None,
            "only_b": int(((a == 0) & (b == 1)).sum()) if binary else None}


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive's score > a negative's), ties counting half (the Mann-Whitney U over n_pos x n_neg)."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    pos, neg = pos[~np.isnan(pos)], neg[~np.isnan(neg)]
    if not len(pos) or not len(neg):
        return float("nan")
    both = np.concatenate([pos, neg])
    order = both.argsort(kind="stable")
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))
