"""Per-token soft weights (selection=soft): the mapping on hand-made scores, training that minimises
sum(w * loss) / sum(w) exactly under accumulation, and the real CLI with every scorer in both pipelines (the
weights stored, recomputable from the stored scores, and carried by cleaned.parquet)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.cli import load_array, run_cli
from tests.conftest import random_examples
from tests.test_scorers_e2e import planned_steps
from tokenclean.config import TrainingConfig
from tokenclean.ragged import Ragged
from tokenclean.selection import keep_mask, select
from tokenclean.soft_weights import soft_weights
from tokenclean.train import train

TINY = ["model=tiny", "tracking=none", "data.limit=64", "data.eval_size=8", "data.max_length=48", "selection=soft"]


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# -- the mapping ---------------------------------------------------------------------------------------------------
def test_weights_by_hand():
    s = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    w = soft_weights(s, keep_ratio=0.6, temperature=0.5)
    # the cut: floor(5 * 0.6) = 3 kept -> tau = 2 (the 3rd largest); sigma = std(0..4) = sqrt(2)
    expected = [sigmoid((x - 2.0) / (0.5 * math.sqrt(2.0))) for x in s]
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    assert w[2] == 0.5 and w[4] == pytest.approx(sigmoid(2 / (0.5 * math.sqrt(2))), rel=1e-6)
    # a ratio that keeps less than one token still puts the cut on the best one; no candidates, no weights
    assert soft_weights(s, keep_ratio=0.1, temperature=0.5)[4] == 0.5
    assert soft_weights(np.zeros(0), 0.6, 0.5).shape == (0,)


def test_scale_and_shift_free_and_the_hard_mask_as_temperature_goes_to_zero():
    rng = np.random.default_rng(0)
    s = rng.normal(size=1000)
    np.testing.assert_allclose(soft_weights(7 * s + 3, 0.3, 0.5), soft_weights(s, 0.3, 0.5), atol=1e-6)
    w = soft_weights(s, 0.3, 1e-7)
    target = Ragged.from_list([np.ones(600, bool), np.ones(400, bool)], bool)
    hard = keep_mask(target.like(s.astype(np.float32)), target, "global", 0.3).values
    assert hard.sum() == 300
    np.testing.assert_array_equal(w >= 0.5, hard)
    assert np.all((w < 1e-6) | (w > 1 - 1e-6) | (w == 0.5))


def test_select_weighs_response_tokens_only_and_refuses_a_missing_score():
    target = Ragged.from_list([np.array([0, 1, 1, 1], bool), np.array([0, 0, 1, 1, 1], bool)], bool)
    raw = np.array([np.nan, 0.1, 0.9, 0.5, np.nan, np.nan, 0.2, 0.7, 0.3], np.float32)
    w = select(target.like(raw), target, "soft", keep_ratio=0.5, temperature=0.5)
    assert w.values.dtype == np.float32 and w.same_layout(target)
    is_t = target.values
    assert not w.values[~is_t].any()
    np.testing.assert_array_equal(w.values[is_t], soft_weights(raw[is_t].astype(np.float64), 0.5, 0.5))
    raw[7] = np.nan
    with pytest.raises(ValueError, match="example 1 has a response token without a score"):
        select(target.like(raw), target, "soft", keep_ratio=0.5)


# -- training ------------------------------------------------------------------------------------------------------
def weights_for(tgt: Ragged, seed=0) -> Ragged:
    """Weights in [0, 1] on the response, exact zeros on part of it and on all of examples 1 and 2."""
    rng = np.random.default_rng(seed)
    w = np.where(tgt.values, rng.random(len(tgt.values)), 0.0).astype(np.float32)
    w[rng.random(len(w)) < 0.2] = 0.0
    ex = tgt.example_ids()
    w[(ex == 1) | (ex == 2)] = 0.0
    return tgt.like(w)


def fit(tiny_lm, accelerator, keep, ids, micro, steps=2):
    lm = tiny_lm(seed=3)
    cfg = TrainingConfig(lr=1e-2, batch_size=8, micro_batch_size=micro, max_steps=steps, warmup_ratio=0.0,
                         max_grad_norm=1e9, schedule="constant", mixed_precision="no")
    metrics = []
    train(accelerator, lm, ids, keep, cfg, seed=0, pad_id=0, on_step=lambda s, m: metrics.append(m))
    return lm, metrics


def test_weighted_loss_is_exact_under_accumulation(tiny_lm, accelerator):
    ids, tgt = random_examples(8, seed=7)
    w = weights_for(tgt)
    lm8, m8 = fit(tiny_lm, accelerator, w, ids, micro=8)
    lm2, m2 = fit(tiny_lm, accelerator, w, ids, micro=2)
    for a, b in zip(lm8.parameters(), lm2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # by hand, one example at a time with full logits: sum_j w_j l_j / sum_j w_j over the step
    ref = tiny_lm(seed=3).train()
    total, weight = 0.0, 0.0
    for i in range(8):
        x = torch.from_numpy(np.asarray(ids[i], np.int64))[None]
        ce = F.cross_entropy(ref(input_ids=x).logits[0, :-1], x[0, 1:], reduction="none")
        wi = torch.from_numpy(w[i][1:].copy())
        total, weight = total + (ce * wi).sum(), weight + wi.sum()
    (total / weight).backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in ref.parameters())).item()
    for m in (m8, m2):
        assert m[0]["train/grad_norm"] == pytest.approx(norm, rel=1e-4)
        assert m[0]["train/loss"] == pytest.approx((total / weight).item(), rel=1e-5)
        assert m[0]["train/kept_tokens"] == pytest.approx(float(w.values.sum(dtype=np.float64)), rel=1e-6)


def test_zero_one_weights_train_as_the_hard_mask(tiny_lm, accelerator):
    ids, tgt = random_examples(8, seed=7)
    hard = tgt.like(weights_for(tgt).values > 0.5)
    lm_hard, m_hard = fit(tiny_lm, accelerator, hard, ids, micro=2)
    lm_soft, m_soft = fit(tiny_lm, accelerator, hard.like(hard.values.astype(np.float32)), ids, micro=2)
    for a, b in zip(lm_hard.parameters(), lm_soft.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert [m["train/loss"] for m in m_soft] == pytest.approx([m["train/loss"] for m in m_hard], rel=1e-6)


# -- the CLI: every scorer, both pipelines -------------------------------------------------------------------------
def cleaned(run):
    import pyarrow.parquet as pq
    return pq.read_table(run / "cleaned.parquet").to_pydict()


def check_cleaned(run, weights: np.ndarray):
    """cleaned.parquet: a weights column equal to the stored weights, labels -100 wherever the weight is 0."""
    t = cleaned(run)
    assert list(t) == ["input_ids", "attention_mask", "labels", "weights", "response_mask", "record_index"]
    w = np.concatenate([np.asarray(r, np.float32) for r in t["weights"]])
    ids = np.concatenate([np.asarray(r) for r in t["input_ids"]])
    labels = np.concatenate([np.asarray(r) for r in t["labels"]])
    np.testing.assert_array_equal(w, weights)
    np.testing.assert_array_equal(labels, np.where(w > 0, ids, -100))


def check_offline(keep, scores, target):
    assert keep.values.dtype == np.float32 and keep.same_layout(target)
    assert not keep.values[~target.values].any() and (keep.values >= 0).all() and (keep.values <= 1).all()
    # the stored weights are exactly the mapping of the stored scores
    np.testing.assert_array_equal(keep.values, select(scores, target, "soft", 0.6, temperature=0.5).values)
    assert 0.3 < keep.values.sum() / target.values.sum() < 0.9


def check_online(run, keep, scores, target, stage):
    """Each optimiser step's weights are the mapping of that step's scores (online: ranked per step)."""
    for step in planned_steps(run, len(target), stage):
        sc = np.concatenate([scores[i][target[i]] for i in step]).astype(np.float64)
        np.testing.assert_allclose(np.concatenate([keep[i][target[i]] for i in step]),
                                   soft_weights(sc, 0.6, 0.5), rtol=1e-6, atol=1e-7)


# online soft weights in the fixed pipeline run by default in test_distributed.py (self_online, 1 and 2 processes)
@pytest.mark.parametrize("scorer", ["influence", "xtf", *(pytest.param(s, marks=pytest.mark.slow)
                                                          for s in ("rho", "entropy", "self_online"))])
def test_fixed_pipeline(tmp_path, scorer):
    run = tmp_path / scorer
    run_cli([*TINY, f"scorer={scorer}"], run)
    keep, target = load_array(run / "keep"), load_array(run / "losses/base")
    target = target.like(~np.isnan(target.values))
    scores = load_array(run / "scores")
    if scorer in ("influence", "entropy"):
        check_offline(keep, scores, target)
    elif scorer == "xtf":   # the share of XTF's rules that call each token clean
        marks = sum(load_array(run / f"xtf/{r}_noise").values.astype(np.float32) for r in ("kn", "ri", "tr"))
        np.testing.assert_array_equal(keep.values, np.where(target.values, 1 - marks / 3, 0).astype(np.float32))
    else:
        check_online(run, keep, scores, target, "final")
    check_cleaned(run, keep.values)
    s = json.loads((run / "summary.json").read_text())
    if scorer not in ("rho", "self_online"):
        assert s["weight_sum"] == pytest.approx(float(keep.values.sum(dtype=np.float64)), rel=1e-9)
    else:   # online: the weights each token trained with, summed over every trained occurrence (one epoch: once)
        assert s["weight_sum"] == pytest.approx(float(keep.values.sum(dtype=np.float64)), rel=1e-6)
    assert s["kept_ratio"] == pytest.approx(s["weight_sum"] / s["tokens_target"], rel=1e-9)
    assert s["tokens_kept"] == int(np.count_nonzero(keep.values))


@pytest.mark.parametrize("scorer", ["influence", pytest.param("entropy", marks=pytest.mark.slow),
                                    pytest.param("self_online", marks=pytest.mark.slow)])   # DDP test: self_online
def test_self_evolving_pipeline(tmp_path, scorer):
    run = tmp_path / scorer
    run_cli([*TINY, f"scorer={scorer}", "pipeline=self_evolving", "pipeline.chunks=3"], run)
    s = json.loads((run / "summary.json").read_text())
    chunks = json.loads((run / "chunks.json").read_text())
    weights = []
    for t in range(3):
        if t == 0:   # round 0 trains on every response token: weight 1
            assert s["rounds"][0]["kept_ratio"] == 1.0 and "weight_sum" not in s["rounds"][0]
            weights.append(None)
            continue
        keep, scores = load_array(run / f"round_{t}/keep"), load_array(run / f"round_{t}/scores")
        base = load_array(run / f"round_{t}/base_losses")
        target = base.like(~np.isnan(base.values))
        assert len(keep) == len(chunks[t])
        if scorer == "self_online":
            check_online(run, keep, scores, target, f"round_{t}")
        else:
            check_offline(keep, scores, target)
        assert s["rounds"][t]["weight_sum"] == pytest.approx(float(keep.values.sum(dtype=np.float64)), rel=1e-6)
        weights.append(keep.values)
    n0 = s["rounds"][0]["tokens_target"]
    t = cleaned(run)
    first = np.concatenate([np.asarray(r, np.float32) for r in t["weights"][:len(chunks[0])]])
    assert first.sum() == n0 and set(np.unique(first)) <= {0.0, 1.0}
    check_cleaned(run, np.concatenate([first, *weights[1:]]))
    assert s["weight_sum"] == pytest.approx(n0 + sum(r["weight_sum"] for r in s["rounds"][1:]), rel=1e-9)
    assert s["kept_ratio"] == pytest.approx(s["weight_sum"] / s["tokens_target"], rel=1e-9)
