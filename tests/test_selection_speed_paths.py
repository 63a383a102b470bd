"""The fast selection paths (tokenclean/selection.py) against the simple implementation they replaced: the same
keep masks, bit for bit, on random data with many ties, infinities, signed zeros, empty examples and examples
without candidates, in float32 and float64, large enough to take the sampled-band path. The simple implementation
lives in benchmarks/selection_speed.py, which times it beside the fast paths."""
import numpy as np
import pytest

from benchmarks.selection_speed import simple_keep_mask, simple_top_k
from tokenclean import selection
from tokenclean.ragged import Ragged
from tokenclean.selection import keep_mask


# -- random data -------------------------------------------------------------------------------------------------------
def make(rng, n_examples, max_len, dtype, distinct=None, all_candidates=False, specials=True, off=np.nan):
    """off: the scores off the candidates (NaN as the scorers write them, or None: numbers, which must be ignored)"""
    lengths = rng.integers(0, max_len + 1, n_examples)
    rows_t, rows_s = [], []
    for n in lengths:
        prompt = 0 if all_candidates else int(rng.integers(0, n + 1))
        t = np.r_[np.zeros(prompt, bool), np.ones(n - prompt, bool)]
        if not all_candidates:
            t &= rng.random(n) < 0.9
        s = rng.integers(0, distinct, n).astype(dtype) if distinct else rng.standard_normal(n).astype(dtype)
        if specials and n:
            pick = rng.random(n)
            s[pick < 0.02] = np.inf
            s[(pick >= 0.02) & (pick < 0.04)] = -np.inf
            s[(pick >= 0.04) & (pick < 0.06)] = -0.0
            s[(pick >= 0.06) & (pick < 0.08)] = 0.0
        if off is not None:
            s[~t] = off
        rows_t.append(t)
        rows_s.append(s)
    target = Ragged.from_list(rows_t, bool)
    scores = Ragged.from_list(rows_s, dtype)
    return scores, target


RATIOS = (0.0, 0.01, 0.29, 0.5, 0.6, 0.999, 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("distinct", [None, 2, 7, 1000])
@pytest.mark.parametrize("all_candidates, off", [(False, np.nan), (False, None), (False, -np.inf), (True, None)])
def test_same_masks_as_the_simple_path(dtype, distinct, all_candidates, off):
    rng = np.random.default_rng([np.dtype(dtype).itemsize, distinct or 0, all_candidates, off is None])
    scores, target = make(rng, 300, 60, dtype, distinct, all_candidates, off=off)
    for method in ("global", "sample"):
        for ratio in RATIOS:
            fast = keep_mask(scores, target, method, keep_ratio=ratio).values
            np.testing.assert_array_equal(fast, simple_keep_mask(scores, target, method, ratio),
                                          err_msg=f"{method} {ratio}")
    for t in (-np.inf, -0.0, 0.5, 3, 0.1):
        np.testing.assert_array_equal(keep_mask(scores, target, "threshold", threshold=t).values,
                                      simple_keep_mask(scores, target, "threshold", threshold=t))


def small_bands(monkeypatch):
    """The sampled-band paths with small samples and blocks, so that test-sized data take them; returns the list
    of what _banded_keep returned (a mask, or None when it left the work to the plain way)."""
    kth, banded, seen = selection._kth_smallest, selection._banded_keep, []
    monkeypatch.setattr(selection, "_kth_smallest", lambda *a, **kw: kth(*a, **{"sample": 1 << 14, "block": 4096,
                                                                                 **kw}))

    def spy(*a, **kw):
        seen.append(banded(*a, **{"sample": 1 << 14, "block": 4096, **kw}))
        return seen[-1]
    monkeypatch.setattr(selection, "_banded_keep", spy)
    return seen


@pytest.mark.parametrize("distinct, off", [(None, np.nan), (3, np.nan), (None, None)])
def test_same_masks_at_scale(distinct, off, monkeypatch):
    # more than 8 * sample positions: the global cut comes from the sampled band
    seen = small_bands(monkeypatch)
    rng = np.random.default_rng(7)
    scores, target = make(rng, 2000, 300, np.float32, distinct, off=off)
    assert len(target.values) > 8 * (1 << 14)
    for method in ("global", "sample"):
        for ratio in (0.05, 0.6, 0.97):
            np.testing.assert_array_equal(keep_mask(scores, target, method, keep_ratio=ratio).values,
                                          simple_keep_mask(scores, target, method, ratio), err_msg=f"{method} {ratio}")
    # the one-pass band took the work where NaN marks the non-candidates (but at 0.97, too near the low end for
    # the bracket), and only there
    assert [m is not None for m in seen] == [off is not None] * 2 + [False]
    bad = scores.like(scores.values.copy())
    last = np.flatnonzero(target.values)[-1]
    bad.values[last] = np.nan                                       # found by the band pass's check, then named
    with pytest.raises(ValueError, match=f"example {target.example_ids()[last]} "):
        keep_mask(bad, target, "global", keep_ratio=0.6)


def test_banded_keep_against_the_simple_top_k():
    rng = np.random.default_rng(11)
    for distinct in (None, 2, 7, 1000):
        size = 40_000
        s = rng.integers(0, distinct, size).astype(np.float32) if distinct else rng.standard_normal(size, np.float32)
        s[rng.random(size) < 0.02] = np.inf
        s[rng.random(size) < 0.02] = -np.inf
        t = rng.random(size) < 0.7
        v = np.where(t, s, np.float32(np.nan))
        n = int(t.sum())
        cand = np.flatnonzero(t)
        for k in (1, 17, n // 3, n // 2, n - 40, n - 1):
            want = np.zeros(size, bool)
            want[cand[simple_top_k(s[t], k)]] = True
            got = selection._banded_keep(v, t, n, k, sample=1 << 11, block=1000)
            if got is not None:
                np.testing.assert_array_equal(got, want, err_msg=f"{distinct} {k}")
            elif distinct is None and n // 3 <= k <= n // 2:
                pytest.fail(f"the band missed on plain random data ({k})")
        k = n // 2
        assert selection._banded_keep(v, t, n, k, sample=1 << 11, block=1000) is not None
        wrong = t.copy()
        wrong[size - 5] = ~wrong[size - 5]          # NaN not exactly off the candidates: left to the plain way
        assert selection._banded_keep(v, wrong, int(wrong.sum()), k, sample=1 << 11, block=1000) is None
        assert selection._banded_keep(v, t, n, k, sample=1 << 13, block=1000) is None      # too few positions
    # step 20: the sample sees only the 0.0s of this periodic array, so the bracket misses the cut
    x = np.tile(np.r_[0.0, np.full(19, 1.0)], 2048).astype(np.float32)
    assert selection._banded_keep(x, np.ones(len(x), bool), len(x), 100, sample=1 << 11, block=1000) is None


def test_kth_smallest_band_and_fallback():
    rng = np.random.default_rng(3)
    # step 80: the sample sees only the 0.0s of these periodic arrays (the second one makes the band miss: fallback)
    period, skewed = np.r_[0.0, np.full(39, 1.0), np.full(40, -1.0)], np.r_[0.0, np.full(79, 1.0)]
    with_nan = rng.standard_normal(20480)
    with_nan[rng.random(20480) < 0.3] = np.nan
    cases = [rng.standard_normal(20480), rng.integers(0, 4, 20480).astype(np.float32),
             np.sort(rng.standard_normal(20480)), np.tile(period, 256), np.tile(skewed, 256),
             np.tile(np.r_[np.full(79, -np.inf), 1.0], 256), np.r_[np.full(16000, 2.0), rng.standard_normal(4480)],
             with_nan, np.sort(with_nan), np.r_[np.full(30000, np.nan), rng.standard_normal(2000)]]
    for x in cases:
        n = int(np.count_nonzero(~np.isnan(x)))     # NaN sorts last: ranks below n are numbers
        for r in (0, 1, 17, n // 4, n // 3, n // 2, n - 2, n - 1):
            want = np.partition(x, r)[r]
            got, ties = selection._kth_smallest(x, r, int(np.isnan(x).sum()), sample=256, block=1000)
            assert got == want, (r, want)
            if ties is not None:
                np.testing.assert_array_equal(ties, np.flatnonzero(x == want))


def test_running_count():
    rng = np.random.default_rng(4)
    for size in [*range(0, 41), 1000, 1003, 4096]:
        for density in (0.0, 0.3, 0.9, 1.0):
            t = rng.random(size) < density
            p = np.r_[0, size, rng.integers(0, size + 1, 30)]
            got = selection._running_count(t)(p)
            np.testing.assert_array_equal(got, np.r_[0, np.cumsum(t)][p], err_msg=f"{size} {density}")
            assert got.dtype == np.int64


def make_responses(rng, n_examples, max_len, dtype, distinct=None, off=np.nan, tail_at=()):
    """Examples laid out as a prompt, then its response to the end (the candidates: the last positions), with
    ties, infinities, empty examples, examples without candidates and examples of candidates only; the examples
    in tail_at end with one non-candidate (an end token, say), which breaks that layout."""
    rows_t, rows_s = [], []
    for e, n in enumerate(rng.integers(0, max_len + 1, n_examples)):
        prompt = int(rng.choice([0, n, rng.integers(0, n + 1)]))
        if e in tail_at:
            n, prompt = max(n, 3), 1
        t = np.arange(n) >= prompt
        if e in tail_at:
            t[-1] = False
        s = rng.integers(0, distinct, n).astype(dtype) if distinct else rng.standard_normal(n).astype(dtype)
        s[rng.random(n) < 0.03] = np.inf
        s[rng.random(n) < 0.03] = -np.inf
        if off is not None:
            s[~t] = off
        rows_t.append(t)
        rows_s.append(s)
    return Ragged.from_list(rows_s, dtype), Ragged.from_list(rows_t, bool)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("distinct, off", [(None, np.nan), (2, np.nan), (5, None), (None, 7.0)])
@pytest.mark.parametrize("tail_at", [(), (3,)])
def test_sample_rows_read_from_the_scores(dtype, distinct, off, tail_at, monkeypatch):
    # where every example's candidates are its last positions, the rows are read from the scores themselves;
    # one example ending in a non-candidate sends all of them the packed way: the same masks either way
    cuts, direct = selection._sample_cuts, []
    monkeypatch.setattr(selection, "_sample_cuts", lambda c, *a, **kw: direct.append(len(c) == len(scores.values))
                        or cuts(c, *a, **kw))
    rng = np.random.default_rng([np.dtype(dtype).itemsize, distinct or 0, off is None, len(tail_at)])
    scores, target = make_responses(rng, 400, 40, dtype, distinct, off, tail_at)
    for ratio in RATIOS:
        np.testing.assert_array_equal(keep_mask(scores, target, "sample", keep_ratio=ratio).values,
                                      simple_keep_mask(scores, target, "sample", ratio), err_msg=f"{ratio}")
    assert direct == [not tail_at] * len(RATIOS)


def test_sample_nan_check_covers_every_example(monkeypatch):
    # a NaN candidate is named wherever it is: in an example that keeps nothing (k = 0), in a late piece
    target = Ragged.from_list([[0, 1, 1], [0, 1], [0, 1, 1, 1]] * 50, bool)
    scores = Ragged.from_list([[np.nan, 1.0, 2.0], [np.nan, 3.0], [np.nan, 1.0, 1.0, 5.0]] * 50, np.float32)
    for example, pos in ((1, 1), (149, 2)):
        bad = scores.like(scores.values.copy())
        bad.values[target.offsets[example] + pos] = np.nan
        with pytest.raises(ValueError, match=f"example {example} "):
            selection._sample_keep(bad.values, target.values, target.offsets, 0.6, rows_per_pass=4)
    keep = selection._sample_keep(scores.values, target.values, target.offsets, 0.6, rows_per_pass=4)
    np.testing.assert_array_equal(keep, simple_keep_mask(scores, target, "sample", 0.6))


def test_nan_on_a_candidate_names_the_example():
    rng = np.random.default_rng(5)
    scores, target = make(rng, 50, 20, np.float32)
    cand = np.flatnonzero(target.values)
    bad = scores.like(scores.values.copy())
    bad.values[cand[len(cand) // 2]] = np.nan
    ex = int(target.example_ids()[cand[len(cand) // 2]])
    for method in ("global", "sample", "threshold"):
        with pytest.raises(ValueError, match=f"example {ex} "):
            keep_mask(bad, target, method, keep_ratio=0.5, threshold=0.0)


def test_empty_and_candidate_free_examples():
    target = Ragged.from_list([[], [0, 0], [0, 1, 1], [], [0, 1]], bool)
    scores = Ragged.from_list([[], [np.nan, np.nan], [np.nan, 1.0, 1.0], [], [np.nan, 1.0]], np.float32)
    for method in ("global", "sample"):
        for ratio in RATIOS:
            np.testing.assert_array_equal(keep_mask(scores, target, method, keep_ratio=ratio).values,
                                          simple_keep_mask(scores, target, method, ratio))
