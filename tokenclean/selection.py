"""From per-token scores to what training uses: a keep mask over response tokens (bool), or soft weights (float32,
method=soft, tokenclean/soft_weights.py). Higher score = more worth learning.

Counts are exact: a ratio keeps floor(n * keep_ratio) tokens of the n candidates (globally, or per sample).
Ties are broken by position: among equal scores the token that comes first (earlier example, then earlier
position) is kept, which is what the reference code's stable Python sort does, without its Python loop.

Speed (benchmarks/selection_speed.py): scores are compared in their own floating dtype (float32 -> float64 is
exact and keeps the order, so a float64 copy would change nothing), and every rule is "keep what is above a cut
value, then the ties at the cut in position order":
  global  the cut is the k-th largest candidate: a strided sample brackets it, then one pass over the scores in
          cache-sized blocks writes the keep mask above the bracket and takes the ~1% inside it, which alone is
          partitioned (O(n) compares; the plain way, with a whole partition, only when the bracket misses or NaN
          is not exactly off the candidates)
  sample  each example's cut comes from one row sort per example, on rows of similar length laid out as 2D blocks
          (numpy sorts each row with SIMD; no lexsort of the whole array), read straight from the scores when each
          example's candidates are its last positions (else from the packed candidates); the candidates per
          example come from a running count of the mask read 8 positions at a time
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
    if method == "sample":
        return target.like(_sample_keep(v, is_target, target.offsets, keep_ratio))
    n = int(np.count_nonzero(is_target))
    if method == "global":
        return target.like(_global_keep(v, is_target, n, target, keep_ratio))
    # compared in float64, as a float32 score against the float64 threshold must be
    keep = np.greater(v, threshold, signature=(np.float64, np.float64, np.bool_))
    if not _nan_marks_the_rest(v, is_target, n, target):
        keep &= is_target
    return target.like(keep)


def _nan_marks_the_rest(v: np.ndarray, is_target: np.ndarray, n: int, target: Ragged, block: int = 1 << 17) -> bool:
    """Raise when a candidate has no score (NaN). True when NaN marks exactly the other positions, as the scorers
    write them (or there are none): comparisons then leave those out by themselves (NaN compares False).
    The common case is checked in cache-sized blocks (isnan and its comparison with the mask stay in cache)."""
    def marks_the_rest(i):
        nan = np.isnan(v[i:i + block])
        return np.logical_xor(nan, is_target[i:i + block], out=nan).all()

    if n < len(v) and all(marks_the_rest(i) for i in range(0, len(v), block)):
        return True
    bad = np.isnan(v) & is_target
    if bad.any():
        example = int(np.searchsorted(target.offsets, int(np.argmax(bad)), side="right") - 1)
        raise ValueError(f"example {example} has a response token without a score (NaN)")
    return n == len(v)


def kept_count(n, ratio):
    """floor(n * ratio), robust to float error (0.29 * 100 is 28.999999999999996 in binary floating point)."""
    return np.floor(np.asarray(n) * ratio + 1e-9).astype(np.int64)


def _global_keep(v: np.ndarray, is_target: np.ndarray, n: int, target: Ragged, ratio: float) -> np.ndarray:
    """The k = floor(n * ratio) largest candidates, ties to the earlier position: every candidate above the k-th
    largest, then the ones equal to it in position order. One banded pass when NaN marks exactly the
    non-candidates (as the scorers write them); else on the scores as they are (NaN sorts above every number in
    np.partition, and compares False), or on a copy with -inf off the candidates (below every candidate)."""
    k = int(kept_count(n, ratio))
    if k <= 0 or k >= n:
        _nan_marks_the_rest(v, is_target, n, target)
        return is_target.copy() if k >= n > 0 else np.zeros(len(v), dtype=bool)
    keep = _banded_keep(v, is_target, n, k)
    if keep is not None:
        return keep
    x, nan_off = v, _nan_marks_the_rest(v, is_target, n, target)
    if nan_off:
        kth, ties = _kth_smallest(v, n - k, len(v) - n)
    else:
        x = np.where(is_target, v, v.dtype.type(-np.inf))
        kth, ties = _kth_smallest(x, len(v) - k)
    keep = x > kth                 # never a non-candidate: NaN compares False, -inf <= kth
    missing = k - int(np.count_nonzero(keep))
    if kth == -np.inf and not nan_off:        # the filled -inf ties with the cut: only candidates count
        ties = np.flatnonzero((x == kth) & is_target)
    elif ties is None:
        ties = np.flatnonzero(x == kth)
    keep[ties[:missing]] = True
    return keep


def _bracket(x: np.ndarray, r: int, sample: int, spread: float):
    """(lo, hi) from a strided sample of about `sample` values of x: values that lie on either side of x's r-th
    smallest (NaN sorts last) with near certainty, `spread` x sqrt(sample size) sample ranks apart from it (at
    least 2 x spread standard deviations of the sample rank); None when x is too small for a sample to pay, the
    bracket would leave the sample, or its high end is NaN."""
    n = len(x)
    smp = x[::max(n // sample, 1)]
    at, d = r * len(smp) // n, int(spread * np.sqrt(len(smp))) + 16
    if n <= 8 * sample or at - d <= 0 or at + d >= len(smp) - 1:
        return None
    smp = np.partition(smp, [at - d, at + d])
    lo, hi = smp[at - d], smp[at + d]
    return None if np.isnan(hi) else (lo, hi)


def _banded_keep(v: np.ndarray, is_target: np.ndarray, n: int, k: int, sample: int = 1 << 17,
                 block: int = 1 << 17) -> np.ndarray | None:
    """The keep mask of the k largest of the n candidates in one pass over the scores, or None when this way cannot
    tell (too few positions, a bracket off the numbers or missing the cut, NaN not exactly off the candidates).

    A strided sample brackets the cut (the (n-k)-th smallest candidate); the pass goes in cache-sized blocks and
    per block writes keep = above the bracket, checks that NaN marks exactly the non-candidates (a number is above
    the bracket's high end or not, NaN neither: then comparisons leave the non-candidates out by themselves), counts
    what lies at or above the low end and takes the positions inside the bracket (about 1% of them; every tie is
    there). Only those are partitioned, and only their keep bits are set afterwards."""
    size, r = len(v), n - k
    bracket = _bracket(v, r, sample, spread=2)
    if bracket is None:
        return None
    lo, hi = bracket
    keep = np.empty(size, dtype=bool)
    n_ge, where, band = 0, [], []
    for i in range(0, size, block):
        part = v[i:i + block]
        above = np.greater(part, hi, out=keep[i:i + block])
        inside = part <= hi
        number = inside | above
        if np.logical_xor(number, is_target[i:i + block], out=number).any():
            return None
        ge = part >= lo
        n_ge += int(np.count_nonzero(ge))
        inside &= ge
        idx = inside.nonzero()[0]
        where.append(idx + i)
        band.append(part[idx])              # read here, while the block is in cache
    where, band = np.concatenate(where), np.concatenate(band)
    rb = r - (n - n_ge)                     # the cut's rank inside the band: n - n_ge candidates lie below it
    if not 0 <= rb < len(band):
        return None
    kth = np.partition(band, rb)[rb]
    up = band > kth
    keep[where[up]] = True
    missing = k - (n_ge - len(band)) - int(np.count_nonzero(up))
    keep[where[band == kth][:missing]] = True
    return keep


def _kth_smallest(x: np.ndarray, r: int, n_nan: int = 0, sample: int = 1 << 17, block: int = 1 << 17):
    """(x's r-th smallest value, the positions of the values equal to it or None), for r below len(x) - n_nan:
    NaN (n_nan of them) sort last, as in np.partition.

    On a large array a strided sample brackets the value; one pass over x in cache-sized blocks counts what lies
    below the bracket and takes what lies inside (about 2% of x: every tie is there), and only that band is
    partitioned. Exact either way: when the band misses, the whole array is partitioned."""
    n = len(x)
    bracket = _bracket(x, r, sample, spread=3)
    if bracket is None:
        return np.partition(x, r)[r], None
    lo, hi = bracket
    below, where = n - n_nan, []
    for i in range(0, n, block):
        part = x[i:i + block]
        inside = part >= lo
        below -= int(np.count_nonzero(inside))
        inside &= part <= hi
        where.append(np.flatnonzero(inside) + i)
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


def _running_count(is_target: np.ndarray):
    """A function of positions p: the number of candidates before each p. The mask is read 8 positions at a time (a
    uint64 word of eight 0/1 bytes has as many set bits as True bytes): a running count over the whole words before
    p's word, plus the bytes of p's word before p, plus the last positions (past the whole words) one by one."""
    b = np.ascontiguousarray(is_target).view(np.uint8)
    whole = len(b) // 8 * 8
    words = b[:whole].view(np.uint64) if whole else np.zeros(1, dtype=np.uint64)
    run = np.zeros(whole // 8 + 1, dtype=np.int32 if len(b) < 1 << 31 else np.int64)   # int32: half the memory
    run[1:] = np.bitwise_count(words[:whole // 8])
    np.cumsum(run, out=run)
    tail = np.zeros(8, dtype=np.int64)                          # [j]: Trues among the first j last positions
    np.cumsum(b[whole:], out=tail[1:len(b) - whole + 1])
    first_bytes = np.tril(np.full((8, 8), 255, dtype=np.uint8), -1).view(np.uint64).ravel()  # [r]: a word's first r

    def before(p: np.ndarray) -> np.ndarray:
        q = np.minimum(p, whole)
        word, rest = np.divmod(q, 8)
        head = np.bitwise_count(words[np.minimum(word, len(words) - 1)] & first_bytes[rest])
        return run[word] + head.astype(np.int64) + tail[p - q]
    return before


def _sample_keep(v: np.ndarray, is_target: np.ndarray, offsets: np.ndarray, ratio: float,
                 rows_per_pass: int = 512) -> np.ndarray:
    """Within each example, the floor(n_e * ratio) largest candidates, ties to the earlier position: every
    candidate above the example's cut (_sample_cuts), then the first need[e] ties at the cut in position order.
    Raises on a candidate without a score (NaN), checked on the way."""
    before = _running_count(is_target)
    at_offsets = before(offsets)
    counts = np.diff(at_offsets)
    # the rows are read from the scores as they are when each example's candidates are its last positions (a
    # prompt, then its response: the usual layout), which holds when no candidate comes before the first of them;
    # else from the candidates, packed
    last = offsets[1:] - counts
    if (before(last) == at_offsets[:-1]).all():
        cut, need = _sample_cuts(v, last, counts, ratio)
    else:
        cut, need = _sample_cuts(v[is_target], at_offsets[:-1], counts, ratio)

    keep = np.empty(len(v), dtype=bool)
    lengths = np.diff(offsets)
    for e in range(0, len(lengths), rows_per_pass):      # each example's cut repeated over its positions, in pieces
        a, b = offsets[e], offsets[min(e + rows_per_pass, len(lengths))]             # that stay in cache
        part, cand = v[a:b], is_target[a:b]
        nan = np.isnan(part)
        if np.logical_and(nan, cand, out=nan).any():
            example = int(np.searchsorted(offsets, a + int(np.argmax(nan)), side="right") - 1)
            raise ValueError(f"example {example} has a response token without a score (NaN)")
        np.greater(part, np.repeat(cut[e:e + rows_per_pass], lengths[e:e + rows_per_pass]), out=keep[a:b])
        keep[a:b] &= cand
    partial = np.flatnonzero(need)
    if len(partial):                                         # the first need[e] ties of these examples
        pos = _ranges(offsets[partial], offsets[partial + 1])
        ex = np.repeat(partial, lengths[partial])
        hit = (v[pos] == cut[ex]) & is_target[pos]
        pos, ex = pos[hit], ex[hit]
        first = np.flatnonzero(np.r_[True, ex[1:] != ex[:-1]])
        rank = np.arange(len(pos)) - np.repeat(first, np.diff(np.r_[first, len(pos)]))
        keep[pos[rank < need[ex]]] = True
    return keep


def _sample_cuts(c: np.ndarray, starts: np.ndarray, counts: np.ndarray, ratio: float, block: int = 1 << 18):
    """Each example's cut and need: its candidates are c[starts[e]:starts[e] + counts[e]]; keep what lies above the
    cut. +inf keeps nothing (k = 0); where every tie at the k-th largest is kept, the cut is the float just below it
    (so "above" takes the ties too); where only some are, the cut is the k-th largest itself and need[e] > 0 ties
    (the first, in position order) are added.

    The k-th largest comes from sorting each example's candidates as one row of a 2D block of examples of similar
    candidate count (shorter rows padded with -inf, which sorts below every candidate; blocks of at most `block`
    values). A NaN candidate, which the caller reports, makes nonsense cuts but no error here."""
    k = kept_count(counts, ratio)
    cut = np.full(len(counts), np.inf, dtype=c.dtype)
    need = np.zeros(len(counts), dtype=np.int64)
    active = np.flatnonzero(k > 0)
    if len(active) == 0:
        return cut, need
    # windows of up to the longest row: the last rows' windows run past c, into this -inf padded copy of its end
    longest = int(counts.max())
    lo = max(len(c) - longest, 0)
    end = np.concatenate([c[lo:], np.full(longest, -np.inf, dtype=c.dtype)])
    order = active[np.argsort(counts[active])]
    sizes = counts[order]
    i = 0
    while i < len(order):
        limit = max(sizes[i] + sizes[i] // 8, sizes[i] + 8)   # rows padded by at most ~1/8 (or 8 values)
        j = int(np.searchsorted(sizes, limit, side="right"))
        j = min(j, i + max(1, block // int(sizes[j - 1])))
        rows, width = np.sort(order[i:j]), int(sizes[j - 1])     # in position order: c is read front to back
        s = starts[rows]
        past = s > len(c) - width
        if past.any():
            r = np.empty((len(rows), width), dtype=c.dtype)
            r[~past] = sliding_window_view(c, width)[s[~past]]
            r[past] = sliding_window_view(end, width)[s[past] - lo]
        else:
            r = sliding_window_view(c, width)[s]             # a copy: one row per example
        np.copyto(r[:, sizes[i]:], -np.inf, where=np.arange(sizes[i], width) >= counts[rows, None])
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
    return cut, need


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
