"""From per-token scores to what training uses: a keep mask over response tokens (bool), or soft weights (float32,
method=soft, tokenclean/soft_weights.py). Higher score = more worth learning.

Counts are exact: a ratio keeps floor(n * keep_ratio) tokens of the n candidates (globally, or per sample).
Ties are broken by position: among equal scores the token that comes first (earlier example, then earlier
position) is kept, which is what the reference code's stable Python sort does, without its Python loop.

Speed (benchmarks/performance.py, `topk`): scores are compared in their own floating dtype (float32 -> float64 is
exact and keeps the order, so a float64 copy would change nothing), and every rule is "keep what is above a cut
value, then the ties at the cut in position order":
  global  the cut is the k-th largest candidate, found on a strided sample's narrow band around it (O(n) compares
          and a partition of the band; the whole array is partitioned only when the band misses)
  sample  each example's cut comes from one row sort per example, on rows of similar length laid out as 2D blocks
          (numpy sorts each row with SIMD; no lexsort of the whole array)
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

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
    if method == "all":
        return target.like(is_target.copy())
    if method == "random":
        # a seeded uniform score, then the same exact-count global rule as the real scorers
        cand = np.flatnonzero(is_target)
        s = np.random.default_rng(seed).random(len(cand))
        keep = np.zeros(len(is_target), dtype=bool)
        keep[cand[_top_k(s, kept_count(len(cand), keep_ratio))]] = True
        return target.like(keep)

    assert scores is not None and scores.same_layout(target), "scores must be aligned with the target mask"
    v = np.asarray(scores.values)
    if v.dtype not in (np.float32, np.float64):
        v = v.astype(np.float64)
    if method not in ("global", "sample", "threshold"):
        raise ValueError(f"unknown selection method {method!r}; expected one of {HARD}")
    n = int(np.count_nonzero(is_target))
    if method == "global":
        keep = _global_keep(v, is_target, n, target, keep_ratio)
    else:
        nan_off = _nan_marks_the_rest(v, is_target, n, target)
        if method == "sample":
            keep = _sample_keep(v, is_target, n, target.offsets, keep_ratio, nan_off)
        else:   # compared in float64, as a float32 score against the float64 threshold must be
            keep = np.greater(v, threshold, signature=(np.float64, np.float64, np.bool_))
            if not nan_off:
                keep &= is_target
    return target.like(keep)


def _nan_marks_the_rest(v: np.ndarray, is_target: np.ndarray, n: int, target: Ragged) -> bool:
    """Raise when a candidate has no score (NaN). True when NaN marks exactly the other positions, as the scorers
    write them (or there are none): comparisons then leave those out by themselves (NaN compares False)."""
    nan = np.isnan(v)
    if n == len(v):
        bad = nan
    elif (nan ^ is_target).all():
        return True
    else:
        bad = nan & is_target
    if bad.any():
        example = int(np.searchsorted(target.offsets, int(np.argmax(bad)), side="right") - 1)
        raise ValueError(f"example {example} has a response token without a score (NaN)")
    return n == len(v)


def kept_count(n, ratio):
    """floor(n * ratio), robust to float error (0.29 * 100 is 28.999999999999996 in binary floating point)."""
    return np.floor(np.asarray(n) * ratio + 1e-9).astype(np.int64)


def _global_keep(v: np.ndarray, is_target: np.ndarray, n: int, target: Ragged, ratio: float) -> np.ndarray:
    """The k = floor(n * ratio) largest candidates, ties to the earlier position: every candidate above the k-th
    largest, then the ones equal to it in position order. Works on the scores as they are when NaN marks exactly
    the non-candidates (as the scorers write them: NaN sorts above every number in np.partition, and compares
    False), which the pass that finds the k-th largest checks on its way; else on a copy with -inf there (below
    every candidate)."""
    k = int(kept_count(n, ratio))
    if k <= 0 or k >= n:
        _nan_marks_the_rest(v, is_target, n, target)
        return is_target.copy() if k >= n > 0 else np.zeros(len(v), dtype=bool)
    x, found = v, _kth_smallest(v, n - k, len(v) - n, non_nan=is_target)
    nan_off = found is not None
    if found is None:
        nan_off = _nan_marks_the_rest(v, is_target, n, target)
        if nan_off:
            found = _kth_smallest(v, n - k, len(v) - n)
        else:
            x = np.where(is_target, v, v.dtype.type(-np.inf))
            found = _kth_smallest(x, len(v) - k)
    kth, ties = found
    keep = x > kth                 # never a non-candidate: NaN compares False, -inf <= kth
    missing = k - int(np.count_nonzero(keep))
    if kth == -np.inf and not nan_off:        # the filled -inf ties with the cut: only candidates count
        ties = np.flatnonzero((x == kth) & is_target)
    elif ties is None:
        ties = np.flatnonzero(x == kth)
    keep[ties[:missing]] = True
    return keep


def _kth_smallest(x: np.ndarray, r: int, n_nan: int = 0, sample: int = 1 << 17, non_nan: np.ndarray | None = None,
                  block: int = 1 << 17):
    """(x's r-th smallest value, the positions of the values equal to it or None), for r below len(x) - n_nan:
    NaN (n_nan of them) sort last, as in np.partition.

    On a large array a strided sample brackets the value; one pass over x in cache-sized blocks counts what lies
    below the bracket and takes what lies inside (about 2% of x: every tie is there), and only that band is
    partitioned. Exact either way: when the band misses, the whole array is partitioned.

    non_nan: a mask that must be True exactly where x is a number (n_nan counts its False), checked on that pass
    (a number is >= the bracket's low end or <= its high end, NaN neither). Returns None when it does not hold, or
    when x is too small or r too close to an end for the bracket (the caller then checks the plain way)."""
    n = len(x)
    step = max(n // sample, 1)
    ns = (n + step - 1) // step
    at, d = r * ns // n, int(3 * np.sqrt(ns)) + 16        # d: about 6 standard deviations of the sample rank
    lo_i, hi_i = at - d, at + d
    smp = None
    if n > 8 * sample and lo_i > 0 and hi_i < ns - 1:
        smp = np.partition(x[::step], [lo_i, hi_i])
    if smp is None or np.isnan(smp[hi_i]):
        return None if non_nan is not None else (np.partition(x, r)[r], None)
    lo, hi = smp[lo_i], smp[hi_i]
    below, ok, where = n - n_nan, True, []
    for i in range(0, n, block):
        part = x[i:i + block]
        inside = part >= lo
        le = part <= hi
        below -= int(np.count_nonzero(inside))
        if non_nan is not None and ok:
            ok = np.array_equal(inside | le, non_nan[i:i + block])
        inside &= le
        where.append(np.flatnonzero(inside) + i)
    if not ok:
        return None
    where = np.concatenate(where)
    band = x[where]
    if below <= r < below + len(band):
        kth = np.partition(band, r - below)[r - below]
        return kth, where[band == kth]
    return np.partition(x, r)[r], None


def _top_k(s: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, ties to the lowest index. O(n): one selection, then the boundary ties."""
    n = len(s)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n)
    kth, _ = _kth_smallest(s, n - k)
    above = np.flatnonzero(s > kth)
    ties = np.flatnonzero(s == kth)[: k - len(above)]
    return np.sort(np.concatenate([above, ties]))


def _row_counts(is_target: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Candidates per example (reduceat over the non-empty examples only: it misreads empty ones)."""
    lengths = np.diff(offsets)
    counts = np.zeros(len(lengths), dtype=np.int64)
    full = lengths > 0
    if full.any():
        counts[full] = np.add.reduceat(is_target.view(np.uint8), offsets[:-1][full], dtype=np.int32)
    return counts


def _sample_keep(v: np.ndarray, is_target: np.ndarray, n: int, offsets: np.ndarray, ratio: float, nan_off: bool,
                 block: int = 1 << 21) -> np.ndarray:
    """Within each example, the floor(n_e * ratio) largest candidates, ties to the earlier position: every
    candidate above the example's cut (its k-th largest), then the ones equal to it in position order.

    The cuts come from sorting each example's candidates as one row of a 2D block of examples of similar candidate
    count (shorter rows padded with -inf, which sorts below every candidate; blocks of at most `block` values)."""
    counts = _row_counts(is_target, offsets)
    k = kept_count(counts, ratio)
    active = np.flatnonzero(k > 0)
    if len(active) == 0:
        return np.zeros(len(v), dtype=bool)
    c = v if n == len(v) else v[is_target]                # the candidates, packed
    starts = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    # windows of up to the longest row: the last rows' windows run past c, into this -inf padded copy of its end
    lo = max(n - int(counts.max()), 0)
    end = np.concatenate([c[lo:], np.full(int(counts.max()), -np.inf, dtype=c.dtype)])

    # each example's cut: keep what lies above it. +inf keeps nothing (k = 0); where every tie at the k-th largest
    # is kept, the cut is the float just below it (so "above" takes the ties too); where only some are, the cut is
    # the k-th largest itself and the first need[e] ties (in position order) are added afterwards
    cut = np.full(len(counts), np.inf, dtype=v.dtype)
    need = np.zeros(len(counts), dtype=np.int64)
    order = active[np.argsort(counts[active], kind="stable")]
    sizes = counts[order]
    i = 0
    while i < len(order):
        limit = max(sizes[i] + sizes[i] // 8, sizes[i] + 8)   # rows padded by at most ~1/8 (or 8 values)
        j = int(np.searchsorted(sizes, limit, side="right"))
        j = min(j, i + max(1, block // int(sizes[j - 1])))
        rows, width = order[i:j], int(sizes[j - 1])
        s = starts[rows]
        past = s > n - width
        if past.any():
            r = np.empty((len(rows), width), dtype=c.dtype)
            r[~past] = sliding_window_view(c, width)[s[~past]]
            r[past] = sliding_window_view(end, width)[s[past] - lo]
        else:
            r = sliding_window_view(c, width)[s]             # a copy: one row per example
        tail = r[:, sizes[i]:]
        if tail.shape[1]:
            np.putmask(tail, np.arange(sizes[i], width) >= sizes[i:j, None], -np.inf)
        r.sort(axis=1)
        kr = k[rows]
        at = width - kr                                      # the k-th largest, in ascending order
        ar = np.arange(len(rows))
        kth = r[ar, at]
        # a row whose k-th largest has an equal neighbour (or is -inf, like the padding) counts its ties
        tied = (kth == -np.inf) | (r[ar, at - (at > 0)] == kth) & (at > 0) | \
            (r[ar, np.minimum(at + 1, width - 1)] == kth) & (at + 1 < width)
        n_above, n_tied = kr - 1, np.ones(len(rows), dtype=np.int64)
        if tied.any():
            rt, kt = r[tied], kth[tied, None]
            n_above[tied] = np.count_nonzero(rt > kt, axis=1)
            n_tied[tied] = np.count_nonzero(rt == kt, axis=1)
        some = (kr - n_above < n_tied) | (kth == -np.inf)
        cut[rows] = np.where(some, kth, np.nextafter(kth, c.dtype.type(-np.inf)))
        need[rows[some]] = (kr - n_above)[some]
        i = j

    keep = v > np.repeat(cut, np.diff(offsets))
    if not nan_off:                                          # the non-candidates hold numbers
        keep &= is_target
    partial = np.flatnonzero(need)
    if len(partial):                                         # the first need[e] ties of these examples
        pos = _ranges(offsets[partial], offsets[partial + 1])
        ex = np.repeat(partial, np.diff(offsets)[partial])
        hit = (v[pos] == cut[ex]) & is_target[pos]
        pos, ex = pos[hit], ex[hit]
        first = np.flatnonzero(np.r_[True, ex[1:] != ex[:-1]])
        rank = np.arange(len(pos)) - np.repeat(first, np.diff(np.r_[first, len(pos)]))
        keep[pos[rank < need[ex]]] = True
    return keep


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The ranges lo[i]..hi[i]-1, one after the other."""
    sizes = hi - lo
    return np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes - lo, sizes)


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
