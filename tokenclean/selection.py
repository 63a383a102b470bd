"""From per-token scores to what training uses: a keep mask over response tokens (bool), or soft weights (float32,
method=soft, tokenclean/soft_weights.py). Higher score = more worth learning.

Counts are exact: a ratio keeps floor(n * keep_ratio) tokens of the n candidates (globally, or per sample).
Ties are broken by position: among equal scores the token that comes first (earlier example, then earlier
position) is kept, which is what the reference code's stable Python sort does, without its Python loop.
"""
from __future__ import annotations

import numpy as np

from tokenclean.ragged import Ragged
from tokenclean.soft_weights import soft_weights

HARD = ("global", "sample", "threshold", "random", "all")


def select(scores: Ragged | None, target: Ragged, method: str, keep_ratio: float = 1.0,
           threshold: float | None = None, temperature: float = 0.5, seed: int = 0) -> Ragged:
    """A bool keep mask (hard methods) or float32 weights (soft), aligned with `target`."""
    if method != "soft":
        return keep_mask(scores, target, method, keep_ratio, threshold, seed)
    is_target = np.asarray(target.values, dtype=bool)
    cand = np.flatnonzero(is_target)
    s = _candidate_scores(scores, target, cand)
    w = np.zeros(len(is_target), np.float32)
    w[cand] = soft_weights(s, keep_ratio, temperature)
    return target.like(w)


def _candidate_scores(scores: Ragged | None, target: Ragged, cand: np.ndarray) -> np.ndarray:
    assert scores is not None and scores.same_layout(target), "scores must be aligned with the target mask"
    s = np.asarray(scores.values, dtype=np.float64)[cand]
    if np.isnan(s).any():
        bad = int(target.example_ids()[cand[np.isnan(s)][0]])
        raise ValueError(f"example {bad} has a response token without a score (NaN)")
    return s


def keep_mask(scores: Ragged | None, target: Ragged, method: str, keep_ratio: float = 1.0,
              threshold: float | None = None, seed: int = 0) -> Ragged:
    """A bool Ragged aligned with `target`: True where a response token keeps its label."""
    is_target = np.asarray(target.values, dtype=bool)
    cand = np.flatnonzero(is_target)           # flat positions of the response tokens
    keep = np.zeros(len(is_target), dtype=bool)
    if method == "all":
        keep[cand] = True
        return target.like(keep)
    if method == "random":
        # a seeded uniform score, then the same exact-count global rule as the real scorers
        s = np.random.default_rng(seed).random(len(cand))
        keep[cand[_top_k(s, kept_count(len(cand), keep_ratio))]] = True
        return target.like(keep)

    s = _candidate_scores(scores, target, cand)
    if method == "global":
        keep[cand[_top_k(s, kept_count(len(cand), keep_ratio))]] = True
    elif method == "sample":
        keep[cand[_top_k_per_group(s, target.example_ids()[cand], keep_ratio)]] = True
    elif method == "threshold":
        keep[cand[s > threshold]] = True
    else:
        raise ValueError(f"unknown selection method {method!r}; expected one of {HARD}")
    return target.like(keep)


def kept_count(n, ratio):
    """floor(n * ratio), robust to float error (0.29 * 100 is 28.999999999999996 in binary floating point)."""
    return np.floor(np.asarray(n) * ratio + 1e-9).astype(np.int64)


def _top_k(s: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, ties to the lowest index. O(n): one partition, then the boundary ties."""
    n = len(s)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n)
    kth = np.partition(s, n - k)[n - k]          # the k-th largest value
    above = np.flatnonzero(s > kth)
    ties = np.flatnonzero(s == kth)[: k - len(above)]
    return np.sort(np.concatenate([above, ties]))


def _top_k_per_group(s: np.ndarray, group: np.ndarray, ratio: float) -> np.ndarray:
    """Within each group (sample), the floor(n_g * ratio) largest values, ties to the lowest index."""
    order = np.lexsort((np.arange(len(s)), -s, group))   # by group, then score descending, then position
    sizes = np.bincount(group)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    g = group[order]
    rank = np.arange(len(s)) - starts[g]
    k = kept_count(sizes, ratio)
    return np.sort(order[rank < k[g]])


def summary(keep: Ragged, target: Ragged) -> dict:
    """Counts of a keep mask; for soft weights, tokens_kept counts the tokens of nonzero weight and kept_ratio is
    the weight sum over the response tokens (the share of the full loss the weights keep)."""
    n_target = int(np.count_nonzero(target.values))
    n_keep = int(np.count_nonzero(keep.values))
    out = {"tokens_target": n_target, "tokens_kept": n_keep, "kept_ratio": n_keep / max(n_target, 1),
           "examples_with_no_kept_token": int(np.sum(keep.row_sums() == 0))}
    if keep.values.dtype != bool:
        weight_sum = float(np.sum(keep.values, dtype=np.float64))
        out.update(weight_sum=weight_sum, kept_ratio=weight_sum / max(n_target, 1))
    return out
