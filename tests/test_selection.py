import numpy as np
import pytest

from tokenclean.ragged import Ragged
from tokenclean.selection import keep_mask, kept_count, summary

NAN = np.nan


def rag(rows, dtype):
    return Ragged.from_list(rows, dtype)


@pytest.fixture
def case():
    # two examples; position 0 and the prompt (NaN) are never candidates
    target = rag([[0, 0, 1, 1, 1], [0, 1, 1, 1]], bool)
    scores = rag([[NAN, NAN, 0.5, 2.0, -1.0], [NAN, 3.0, 0.5, 0.1]], np.float32)
    return scores, target


def test_global_top_k_exact(case):
    scores, target = case
    keep = keep_mask(scores, target, "global", keep_ratio=0.5)     # 6 candidates -> 3 kept: 3.0, 2.0, first 0.5
    assert keep[0].tolist() == [False, False, True, True, False]
    assert keep[1].tolist() == [False, True, False, False]


def test_global_ties_go_to_the_earlier_token(case):
    scores, target = case
    keep = keep_mask(scores, target, "global", keep_ratio=4 / 6)   # 4 kept: 3.0, 2.0, both 0.5s
    assert keep[0].tolist() == [False, False, True, True, False]
    assert keep[1].tolist() == [False, True, True, False]
    s = rag([[NAN, 1.0, 1.0, 1.0]], np.float32)
    t = rag([[0, 1, 1, 1]], bool)
    assert keep_mask(s, t, "global", keep_ratio=0.67)[0].tolist() == [False, True, True, False]


def test_sample_top_k_floors_per_sample(case):
    scores, target = case
    keep = keep_mask(scores, target, "sample", keep_ratio=0.6)      # floor(3*0.6)=1 per sample
    assert keep[0].tolist() == [False, False, False, True, False]
    assert keep[1].tolist() == [False, True, False, False]
    keep = keep_mask(scores, target, "sample", keep_ratio=0.3)      # floor(0.9)=0: nothing kept
    assert not keep.values.any()


def test_threshold_random_all(case):
    scores, target = case
    assert keep_mask(scores, target, "threshold", threshold=0.5).values.tolist() == \
        [False, False, False, True, False, False, True, False, False]
    a = keep_mask(None, target, "random", keep_ratio=0.5, seed=1)
    b = keep_mask(None, target, "random", keep_ratio=0.5, seed=1)
    c = keep_mask(None, target, "random", keep_ratio=0.5, seed=2)
    assert a.values.sum() == 3 and np.array_equal(a.values, b.values)
    assert not (a.values & ~target.values.astype(bool)).any()
    assert summary(c, target)["tokens_kept"] == 3
    assert np.array_equal(keep_mask(None, target, "all").values, target.values)


def test_counts_exact_at_scale():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 50, size=500)
    target = Ragged.from_list([np.r_[False, rng.random(n - 1) < 0.7] for n in lengths], bool)
    scores = target.like(np.where(target.values, rng.integers(0, 20, len(target.values)), np.nan).astype(np.float32))
    n = int(target.values.sum())
    for ratio in (0.0, 0.29, 0.6, 1.0):
        keep = keep_mask(scores, target, "global", keep_ratio=ratio)
        assert keep.values.sum() == kept_count(n, ratio)
        # every kept score >= every dropped score
        s = scores.values
        if 0 < keep.values.sum() < n:
            assert s[keep.values].min() >= s[target.values.astype(bool) & ~keep.values].max()
    per = keep_mask(scores, target, "sample", keep_ratio=0.6)
    counts = np.add.reduceat(per.values.astype(int), per.offsets[:-1])
    assert np.array_equal(counts, kept_count(np.add.reduceat(target.values.astype(int), target.offsets[:-1]), 0.6))
    assert kept_count(100, 0.29) == 29


def test_nan_score_on_a_response_token_is_an_error(case):
    scores, target = case
    bad = scores.like(scores.values.copy())
    bad.values[3] = np.nan
    with pytest.raises(ValueError, match="example 0"):
        keep_mask(bad, target, "global", keep_ratio=0.5)
