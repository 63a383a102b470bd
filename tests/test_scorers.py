"""Scorers on hand-made inputs and on a tiny model: exact outputs, so that every assertion can fail."""
import math

import numpy as np
import pytest
import torch

from tests.conftest import random_examples
from tokenclean.config import ConfigError, TrainingConfig, XTFConfig
from tokenclean.losses import TokenLoss, collate
from tokenclean.ragged import Ragged
from tokenclean.scorers import xtf
from tokenclean.scorers.online import OnlineSelector
from tokenclean.scorers.rho import excess_loss
from tokenclean.scorers.self_online import learned_since_base
from tokenclean.train import fit, micro_batches, plan_steps, prepare

NAN = float("nan")


def ragged(rows, dtype=np.float32):
    return Ragged.from_list([np.asarray(r, dtype) for r in rows], dtype)


# ----------------------------------------------------------------------------------------------------------------
# XTF rules on known scores


def test_iqr_rule_is_strictly_below_q1_minus_iqr():
    # sorted [7.75, 10, 11, 12, 13, 14]: Q1 = 10 + 0.25 = 10.25, Q3 = 12 + 0.75 = 12.75, IQR 2.5 -> bound 7.75
    v = np.array([10, 11, 7.75, 12, 13, 14])
    assert xtf.iqr_low(v).tolist() == [False] * 6            # exactly on the bound: kept
    v2 = np.array([10, 11, 7.7, 12, 13, 14])
    assert xtf.iqr_low(v2).tolist() == [False, False, True, False, False, False]
    assert xtf.iqr_low(v2, k=2.0).tolist() == [False] * 6    # bound 10.25 - 5 = 5.25
    assert xtf.iqr_low(np.array([])).tolist() == []


def test_knowledge_novelty_threshold():
    p = np.array([NAN, 0.96, 0.94, 0.5], np.float64)              # p_base of the label; position 0 has none
    losses = ragged([-np.log(p)])
    kn = xtf.knowledge_novelty(losses)
    np.testing.assert_allclose(kn.values[1:], [0.04, 0.06, 0.5], rtol=1e-5)
    assert math.isnan(kn.values[0])
    target = ragged([[0, 1, 1, 1]], bool)
    flat = target.like(np.zeros(4, np.float32))
    out = xtf.rules(kn, flat, flat, target, XTFConfig(rules=["kn"]))
    assert out["kn_noise"].values.tolist() == [False, True, False, False]    # KN 0.04 < 0.05
    assert out["keep"].values.tolist() == [False, False, True, True]


def test_multi_otsu_noise_is_the_second_lowest_class():
    tr = np.array([0.0, 0.02, 0.01, 0.5, 0.52, 0.49, 1.0, 0.98, 0.99])
    assert xtf.otsu_classes(tr, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    target = ragged([[0] + [1] * 9], bool)
    tr_r = target.like(np.concatenate([[NAN], tr]).astype(np.float32))
    zeros = target.like(np.full(10, 0.5, np.float32))
    out = xtf.rules(zeros, zeros, tr_r, target, XTFConfig(rules=["tr"]))
    assert np.flatnonzero(out["tr_noise"].values).tolist() == [4, 5, 6]       # the 0.5 cluster
    out0 = xtf.rules(zeros, zeros, tr_r, target, XTFConfig(rules=["tr"], tr_noise_classes=[0]))
    assert np.flatnonzero(out0["tr_noise"].values).tolist() == [1, 2, 3]
    # fewer distinct values than classes: nothing marked
    assert xtf.otsu_classes(np.array([1.0, 1.0, 2.0]), 3) is None


def test_union_of_the_three_rules_and_rule_subsets():
    # one sample, 8 response tokens; token 2 fails KN, token 5 fails RI (far below the others), token 7 fails TR
    target = ragged([[0] + [1] * 8], bool)
    kn = target.like(np.array([NAN, .5, .01, .5, .5, .5, .5, .5, .5], np.float32))
    ri = target.like(np.array([NAN, 1, 1.1, 0.9, 1, -5, 1.05, 0.95, 1], np.float32))
    tr = target.like(np.array([NAN, 0, 0, 0, 0, 0, 0.9, 0.5, 1], np.float32))
    out = xtf.rules(kn, ri, tr, target, XTFConfig())
    assert np.flatnonzero(out["kn_noise"].values).tolist() == [2]
    assert np.flatnonzero(out["ri_noise"].values).tolist() == [5]
    assert np.flatnonzero(out["tr_noise"].values).tolist() == [7]
    assert np.flatnonzero(~out["keep"].values & target.values).tolist() == [2, 5, 7]
    only_ri = xtf.rules(kn, ri, tr, target, XTFConfig(rules=["ri"]))
    assert np.flatnonzero(~only_ri["keep"].values & target.values).tolist() == [5]
    assert not out["keep"].values[0]                                  # never keeps a prompt token


def test_task_relevance_by_hand():
    E = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    ids = ragged([[2, 0, 0, 1]], np.int32)
    target = ragged([[0, 1, 1, 1]], bool)
    # centre = mean of E[0], E[0], E[1] = (2/3, 1/3); cosine distance 1 - 2/sqrt5 (id 0) and 1 - 1/sqrt5 (id 1)
    tr = xtf.task_relevance(ids, target, E)
    np.testing.assert_allclose(tr.values[1:], [1.0, 1.0, 0.0], atol=1e-6)
    assert math.isnan(tr.values[0])
    # l2 to an explicit centre (0, 0): distances 1, 1, 1 -> no spread -> every TR is 1
    tr2 = xtf.task_relevance(ids, target, E, center=np.zeros(2), distance="l2")
    np.testing.assert_allclose(tr2.values[1:], [1.0, 1.0, 1.0])
    # per-sample scope normalises each sample alone
    ids3 = ragged([[2, 0, 1], [2, 2, 0]], np.int32)
    t3 = ragged([[0, 1, 1], [0, 1, 1]], bool)
    tr3 = xtf.task_relevance(ids3, t3, E, center=np.array([1.0, 0.0]), distance="l2", scope="sample")
    # sample 0: d(id0)=0, d(id1)=sqrt2 -> TR 1, 0; sample 1: d(id2)=sqrt(4+16)=4.47, d(id0)=0 -> TR 0, 1
    np.testing.assert_allclose(tr3.values[[1, 2, 4, 5]], [1, 0, 0, 1], atol=1e-6)


def test_attention_received_matches_output_attentions(tiny_lm, accelerator):
    lm = tiny_lm(seed=1)
    lm.set_attn_implementation("eager")
    ids = ragged([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]], np.int32)     # different lengths: right padding
    target = ragged([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1]], bool)
    got = xtf.attention_received(accelerator, lm, ids, target, batch_size=2, pad_id=0)
    got_sum = xtf.attention_received(accelerator, lm, ids, target, 2, 0, layers=[-1], heads=[0, 2], reduce="sum")
    for e in range(2):
        x = torch.as_tensor(ids[e], dtype=torch.long)[None]
        with torch.no_grad():
            att = lm(input_ids=x, output_attentions=True).attentions      # each [1, H, L, L]
        n = x.shape[1]
        a = torch.stack(att).mean((0, 2))[0]                             # all layers, all heads: [Lq, Lk]
        want = (a.sum(0) / torch.arange(n, 0, -1)).numpy()              # mean over the n - j queries q >= j
        t = target[e].astype(bool)
        np.testing.assert_allclose(got[e][t], want[t], rtol=1e-5)
        assert np.isnan(got[e][~t]).all()
        a2 = att[-1][0, [0, 2]].mean(0)
        np.testing.assert_allclose(got_sum[e][t], a2.sum(0).numpy()[t], rtol=1e-5)


def test_attention_received_needs_eager(tiny_lm, accelerator):
    lm = tiny_lm(seed=1)
    lm.set_attn_implementation("sdpa")
    ids, target = ragged([[5, 6, 7]], np.int32), ragged([[0, 1, 1]], bool)
    with pytest.raises(ConfigError, match="model.attn_implementation=eager"):
        xtf.attention_received(accelerator, lm, ids, target, 1, 0)


# ----------------------------------------------------------------------------------------------------------------
# online per-batch ranking


def hand_batch():
    # example 0: target positions 1, 2, 3; example 1: positions 2, 3 (position 1 is a prompt token)
    target = ragged([[0, 1, 1, 1], [0, 0, 1, 1]], bool)
    cached = target.like(np.array([NAN, 1.0, 2.0, 3.0, NAN, NAN, 0.5, 1.0], np.float32))
    return target, cached


def test_online_rho_ranks_excess_loss_in_the_batch():
    target, ref = hand_batch()
    sel = OnlineSelector(excess_loss, ref, target, "global", keep_ratio=0.5)
    current = np.array([3.0, 2.5, 3.5, 2.5, 1.0])          # order: ex0 pos1..3, ex1 pos2..3
    pos, s, keep = sel.rank([0, 1], current)
    assert pos.tolist() == [1, 2, 3, 6, 7]
    np.testing.assert_allclose(s, [2.0, 0.5, 0.5, 2.0, 0.0])   # l_cur - l_ref
    # floor(5 * 0.5) = 2 kept: the two 2.0s; ties broken towards the earlier example/position
    assert keep.tolist() == [True, False, False, True, False]
    # the same batch in the other order: ties still go to the earlier one *in the batch*
    pos_b, _, keep_b = sel.rank([1, 0], np.array([2.5, 1.0, 3.0, 2.5, 3.5]))
    assert pos_b[keep_b].tolist() == [6, 1]
    # ratio 0.6: floor(3.0) = 3: the third is the first 0.5 (position 2)
    sel6 = OnlineSelector(excess_loss, ref, target, "global", keep_ratio=0.6)
    assert sel6.rank([0, 1], current)[2].tolist() == [True, True, False, True, False]


def test_online_self_evolving_is_base_minus_current_and_sample_scope():
    target, base = hand_batch()
    sel = OnlineSelector(learned_since_base, base, target, "sample", keep_ratio=0.5)
    current = np.array([0.0, 2.5, 1.0, 0.0, 0.5])
    pos, s, keep = sel.rank([0, 1], current)
    np.testing.assert_allclose(s, [1.0, -0.5, 2.0, 0.5, 0.5])  # l_base - l_cur
    # per sample: floor(3 * .5) = 1 of example 0 (position 3), floor(2 * .5) = 1 of example 1 (tie: position 6)
    assert pos[keep].tolist() == [3, 6]
    thr = OnlineSelector(learned_since_base, base, target, "threshold", threshold=0.75)
    assert thr.rank([0, 1], current)[2].tolist() == [True, False, True, False, False]


def test_online_scores_within_float_rounding_are_ties():
    """self_online's first step: current == base up to float32 rounding (another pass, another batch shape). The
    noise must not be ranked: the soft rule weighs every token 1/2 and the hard rule keeps by position, the same
    however the step was split."""
    target, base = hand_batch()
    exact = np.asarray(base.values, np.float64)[np.asarray(target.values, bool)]
    noisy = exact + np.array([4.8e-7, -4.8e-7, 9.5e-7, 0.0, -9.5e-7])       # float32 rounding of another pass
    soft = OnlineSelector(learned_since_base, base, target, "soft", keep_ratio=0.6)
    _, s, w = soft.rank([0, 1], noisy)
    assert s.tolist() == [0.0] * 5 and w.tolist() == [0.5] * 5
    hard = OnlineSelector(learned_since_base, base, target, "global", keep_ratio=0.6)
    assert hard.rank([0, 1], noisy)[2].tolist() == [True, True, True, False, False]
    # real differences survive the rounding (to 2^-16 nats)
    assert soft.rank([0, 1], exact - np.array([0.0, 0.0, 0.0, 1e-3, 0.0]))[1][3] == pytest.approx(1e-3, abs=2 ** -17)


def test_online_kept_count_is_known_before_any_forward():
    target, ref = hand_batch()
    g = OnlineSelector(excess_loss, ref, target, "global", keep_ratio=0.5)
    s = OnlineSelector(excess_loss, ref, target, "sample", keep_ratio=0.5)
    assert g.kept_count([0, 1]) == 2 and s.kept_count([0, 1]) == 2
    assert g.kept_count([0]) == 1 and s.kept_count([1]) == 1
    assert OnlineSelector(excess_loss, ref, target, "sample", keep_ratio=0.6).kept_count([0, 1]) == 2   # 1 + 1
    assert OnlineSelector(excess_loss, ref, target, "global", keep_ratio=0.6).kept_count([0, 1]) == 3


# ----------------------------------------------------------------------------------------------------------------
# online selection inside train.fit: exact normalisation, scope


def online_run(tiny_lm, accelerator, micro, scope, kind="rho", steps=2, ratio=0.5):
    ids, tgt = random_examples(8, seed=7)
    cached = tgt.like(np.where(tgt.values, np.random.default_rng(3).random(len(tgt.values)) * 4, np.nan)
                      .astype(np.float32))
    lm = tiny_lm(seed=3)
    cfg = TrainingConfig(lr=1e-2, batch_size=8, micro_batch_size=micro, max_steps=steps, warmup_ratio=0.0,
                         max_grad_norm=1e9, schedule="constant", mixed_precision="no")
    score = excess_loss if kind == "rho" else learned_since_base
    sel = OnlineSelector(score, cached, tgt, "global", ratio, None, scope)
    metrics = []
    p = prepare(accelerator, lm, len(ids), cfg, 0)
    fit(accelerator, p, ids, tgt, cfg, 0, on_step=lambda s, m: metrics.append(m), online=sel)
    return lm, sel, metrics, (ids, tgt, cached, cfg)


def hand_grad_norm(tiny_lm, ids, keep_rows: dict, step):
    """Gradient norm of sum(losses of the kept tokens) / n_kept for a fresh model, one forward over the step."""
    ref = tiny_lm(seed=3)
    mask = Ragged.from_list([keep_rows[int(i)] for i in range(len(ids))], bool)
    batch = collate(ids, mask, step, pad_id=0)
    losses = TokenLoss(ref).train()(**batch)
    n = int(mask.values[np.isin(mask.example_ids(), step)].sum())
    (losses.sum() / n).backward()
    return math.sqrt(sum(float((p.grad ** 2).sum()) for p in ref.parameters())), n, float(losses.detach().mean())


def keep_rows(sel, n):
    return {i: sel.keep[sel.target.offsets[i]:sel.target.offsets[i + 1]].copy() for i in range(n)}


@pytest.mark.parametrize("kind", ["rho", "self_online"])
def test_online_step_scope_is_the_same_with_or_without_the_prepass(tiny_lm, accelerator, kind):
    lm1, s1, m1, (ids, tgt, cached, cfg) = online_run(tiny_lm, accelerator, micro=8, scope="step", kind=kind, steps=1)
    lm4, s4, m4, _ = online_run(tiny_lm, accelerator, micro=2, scope="step", kind=kind, steps=1)
    assert s1.prepasses == 0 and s4.prepasses == 1      # 8 x 1 ranks its own forward; 2 x 4 needs the pre-pass
    assert np.array_equal(s1.keep, s4.keep)
    n_target = int(tgt.values.sum())
    assert m1[0]["train/kept_tokens"] == m4[0]["train/kept_tokens"] == n_target // 2 == int(s1.keep.sum())
    # the kept set is exactly the top half of the step by the score, computed by hand from a fresh forward
    step = plan_steps(8, cfg, 0)[0]
    with torch.no_grad():
        cur = TokenLoss(tiny_lm(seed=3)).eval()(**collate(ids, tgt, step, pad_id=0)).numpy()
    pos = np.concatenate([tgt.offsets[i] + np.flatnonzero(tgt[i]) for i in step])
    s = cur - cached.values[pos] if kind == "rho" else cached.values[pos] - cur
    top = set(pos[np.argsort(-s, kind="stable")[: n_target // 2]].tolist())
    assert set(np.flatnonzero(s1.keep).tolist()) == top
    np.testing.assert_allclose(s1.scores[pos], s, rtol=0, atol=2 ** -17 + 1e-6)   # rounded to 2^-16 nats
    # and the update is the mean over the kept tokens of the step
    norm, n, mean = hand_grad_norm(tiny_lm, ids, keep_rows(s1, 8), step)
    assert n == m1[0]["train/kept_tokens"]
    assert m1[0]["train/grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert m4[0]["train/grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert m1[0]["train/loss"] == pytest.approx(mean, rel=1e-5)
    for a, b in zip(lm1.parameters(), lm4.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_online_micro_scope_ranks_each_micro_batch_and_normalises_by_the_step(tiny_lm, accelerator):
    lm, sel, m, (ids, tgt, cached, cfg) = online_run(tiny_lm, accelerator, micro=3, scope="micro", steps=1, ratio=0.6)
    step = plan_steps(8, cfg, 0)[0]
    micros = micro_batches(step, 0, 1, 3, 3)
    counts = [int(sum(tgt[i].sum() for i in mb)) for mb in micros]
    want = sum(int(math.floor(c * 0.6 + 1e-9)) for c in counts)
    assert m[0]["train/kept_tokens"] == want == int(sel.keep.sum())
    # each micro-batch keeps exactly its own floor(n * 0.6): ranked alone
    for mb, c in zip(micros, counts):
        kept = sum(int(sel.keep[tgt.offsets[i]:tgt.offsets[i + 1]].sum()) for i in mb)
        assert kept == int(math.floor(c * 0.6 + 1e-9))
    norm, n, _ = hand_grad_norm(tiny_lm, ids, keep_rows(sel, 8), step)
    assert n == want
    assert m[0]["train/grad_norm"] == pytest.approx(norm, rel=1e-4)


def test_online_records_every_trained_token_over_epochs(tiny_lm, accelerator):
    _, sel, m, (ids, tgt, _, cfg) = online_run(tiny_lm, accelerator, micro=8, scope="step", steps=None)
    n_target = int(tgt.values.sum())
    summ = sel.summary()
    assert summ["online_tokens_seen"] == summ["online_tokens_trained"] == n_target
    assert summ["online_kept_total"] == sum(x["train/kept_tokens"] for x in m) == int(sel.kept_times.sum())
    assert not np.isnan(sel.scores[tgt.values.astype(bool)]).any()
    assert np.isnan(sel.scores[~tgt.values.astype(bool)]).all()
