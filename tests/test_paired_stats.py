"""The paired statistics of the benchmarks (benchmarks/stats.py) and lm-eval's per-document scores
(tokenclean.evaluation.per_document), checked by hand."""
import json

import numpy as np
import pytest

from benchmarks import stats
from tokenclean.evaluation import per_document


def test_paired_difference_counts_and_bootstrap_se_match_the_analytic_values():
    rng = np.random.default_rng(0)
    a = (rng.random(2000) < 0.7).astype(float)
    b = np.where(rng.random(2000) < 0.95, a, 1 - a)         # agrees with a on 95% of documents
    p = stats.paired(a, b, n_boot=4000)
    d = a - b
    assert p["diff"] == pytest.approx(d.mean(), abs=1e-12)
    assert p["se"] == pytest.approx(d.std() / np.sqrt(len(d)), rel=0.06)     # the bootstrap se of a mean
    assert p["ci"][0] < p["diff"] < p["ci"][1]
    assert p["mde"] == pytest.approx(2.8 * p["se"])
    assert p["only_a"] == int(((a == 1) & (b == 0)).sum()) and p["only_b"] == int(((a == 0) & (b == 1)).sum())
    # the paired se is far smaller than that of the difference of two separate accuracies when the models mostly
    # agree (as two fine-tunes of one base do)
    assert p["se"] < 0.5 * np.sqrt(a.var() + b.var()) / np.sqrt(len(a))


def test_paired_over_seeds_resamples_seeds_too():
    a = np.array([[1, 1, 0, 1], [0, 1, 0, 1]], float)
    b = np.array([[0, 1, 0, 0], [0, 1, 0, 0]], float)
    p = stats.paired(a, b, n_boot=2000)
    assert p["diff"] == pytest.approx(np.mean(a - b)) and p["n_seeds"] == 2 and p["n_docs"] == 4
    assert (p["only_a"], p["only_b"]) == (3, 0)
    with pytest.raises(ValueError, match="same seeds and documents"):
        stats.paired(a, b[:, :3])
    same = stats.paired(a, a)
    assert same["diff"] == 0 and same["se"] == 0 and same["ci"] == (0.0, 0.0)


def test_auc_by_hand():
    assert stats.auc([3, 4], [1, 2]) == 1.0
    assert stats.auc([1, 2], [3, 4]) == 0.0
    assert stats.auc([1, 3], [2, 2]) == 0.5          # one win, one loss
    assert stats.auc([2], [2]) == 0.5                # a tie counts half
    assert stats.auc([1, np.nan, 4], [2]) == 0.5     # NaN ignored


def test_per_document_margin_is_gold_minus_the_best_distractor():
    samples = {"mc": [
        {"doc_id": 1, "filter": "none", "target": 0, "metrics": ["acc"], "acc": 1.0,
         "filtered_resps": [(-1.0, False), (-3.0, False), (-2.5, False)]},
        {"doc_id": 0, "filter": "none", "target": 2, "metrics": ["acc"], "acc": 0.0,
         "filtered_resps": [(-1.0, True), (-0.5, False), (-2.0, False)]},
    ], "gen": [
        {"doc_id": 0, "filter": "answer", "target": "59", "metrics": ["exact_match"], "exact_match": 1.0,
         "filtered_resps": ["59"]},
        {"doc_id": 0, "filter": "other", "target": "59", "metrics": ["exact_match"], "exact_match": 0.0,
         "filtered_resps": ["5"]},
    ]}
    out = per_document(samples)
    assert out["mc"] == [{"doc_id": 0, "acc": 0.0, "margin": -1.5}, {"doc_id": 1, "acc": 1.0, "margin": 1.5}]
    assert out["gen"] == [{"doc_id": 0, "exact_match": 1.0}]                 # the first filter only
    json.dumps(out)


@pytest.mark.slow   # a harness run end to end (~25 s); the harness's parts are tested in the default suite
def test_the_arithmetic_experiment_end_to_end_on_the_tiny_model(tmp_path):
    """The controlled experiment at a tiny size: the pool has exactly the injected noise, the oracle trains on every
    token but the noise, lm-eval scores every test problem, and the paired table is written."""
    from benchmarks import arithmetic
    out = tmp_path / "res"
    arithmetic.main(["--model", "tiny", "--seeds", "1", "--pool", "30", "--warmup", "12", "--dev", "6", "--test",
                     "10", "--epochs", "1", "--dev-ratios", "--work", str(tmp_path / "w"), "--out", str(out),
                     "--arms", "full", "oracle", "fixed (influence)", "xtf", "random at xtf's ratio"])
    state = json.loads(out.with_suffix(".json").read_text())
    assert state["meta"]["noise"] == {"wrong_sum": 12, "random_words": 3, "clean": 15}
    rows = {r["arm"]: r for r in state["rows"]}
    assert set(rows) == {"full", "oracle", "fixed (influence)", "xtf", "random at xtf's ratio"}
    assert rows["full"]["tokens_trained"] == {g: 1.0 for g in rows["full"]["tokens_trained"]}
    oracle = rows["oracle"]["tokens_trained"]
    assert oracle["false digits"] == oracle["wrong-sum digits that match the truth"] == oracle["random words"] == 0.0
    assert oracle["right-sum digits"] == oracle["other clean tokens"] == 1.0
    assert oracle["right-sum digits, carry"] == oracle["right-sum digits, no carry"] == 1.0
    fixed = rows["fixed (influence)"]["tokens_trained"]   # the right-sum digits are the carry and no-carry ones
    lo, hi = sorted((fixed["right-sum digits, carry"], fixed["right-sum digits, no carry"]))
    assert lo <= fixed["right-sum digits"] <= hi and lo < hi
    assert 0 < rows["fixed (influence)"]["evidence"]["score"]["right, carry"] < 100
    assert rows["random at xtf's ratio"]["kept_ratio"] == pytest.approx(rows["xtf"]["kept_ratio"], abs=0.01)
    for r in rows.values():
        assert [d["doc_id"] for d in r["test"]["documents"]["arith_em_test"]] == list(range(10))
        assert all("margin" in d for d in r["test"]["documents"]["arith_mc_test"])
    assert "evidence" in rows["fixed (influence)"] and "auc right vs wrong" in rows["fixed (influence)"]["evidence"]
    assert "reference_test" in rows["fixed (influence)"]
    assert set(state["paired"]) == {"oracle", "fixed (influence)", "xtf", "random at xtf's ratio"}
    report = out.with_suffix(".md").read_text()
    assert "| oracle | 0." in report and "base (no fine-tuning)" in report
    # --report trains nothing and recomputes the same token analysis from the runs' arrays
    before = {r["arm"]: r["tokens_trained"] for r in state["rows"]}
    for r in state["rows"]:
        r["tokens_trained"] = None
    out.with_suffix(".json").write_text(json.dumps(state))
    arithmetic.main(["--model", "tiny", "--work", str(tmp_path / "w"), "--out", str(out), "--report"])
    again = json.loads(out.with_suffix(".json").read_text())
    assert {r["arm"]: r["tokens_trained"] for r in again["rows"]} == before and len(again["rows"]) == len(rows)
