"""EKSFT (tokenclean/scorers/eksft.py): per step, the top share of response tokens by KL(current || reference) and
by entropy leave the cross-entropy and carry an entropy bonus and a KL regulariser."""
import json
import math

import numpy as np
import pytest
import torch

from tests import test_distributed as dist
from tests.cli import TINY, killed_then_resumed, load_array, run_cli, same_weights, stages
from tests.conftest import random_examples
from tests.test_config import typed
from tests.test_scorers import hand_batch
from tests.test_scorers_e2e import planned_steps
from tokenclean import scorers
from tokenclean.config import ConfigError, TrainingConfig
from tokenclean.losses import TokenLoss, _head_terms, collate
from tokenclean.scorers.eksft import EKSFTHook, decide
from tokenclean.train import fit, plan_steps, prepare

CLI = [*TINY, "data.limit=120", "scorer=eksft"]
dist_env = dist.dist_env   # test_distributed's fixture: the launched processes' environment
LOG_V = math.log(64)       # the tiny models' vocabulary

# five response tokens (hand_batch: example 0 positions 1-3, example 1 positions 2-3), dyadic so that rounding to
# 2^-16 changes nothing
KL = np.array([0.5, 0.125, 0.25, 0.0625, 0.1875])
H = np.array([1.0, 2.0, 0.5, 1.5, 0.25])
P2 = np.array([0.25, 0.125, 0.5, 0.25, 0.5])      # sum_v p_v^2


def eksft_cfg(*overrides):
    return typed("model=tiny", "scorer=eksft", "scorer.eksft.top_k_ratio=0.4", *overrides)


def test_kl_entropy_and_collision_of_one_position_by_hand():
    # p = softmax(0, ln 3) = (1/4, 3/4), q = softmax(0, 0) = (1/2, 1/2), the target is token 1
    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    out = _head_terms(head, torch.tensor([[0.0, math.log(3)]]), torch.tensor([1]), None, torch.zeros(1, 2))
    ce, h, kl, p2 = out[:, 0].tolist()
    assert ce == pytest.approx(-math.log(0.75), abs=1e-6)
    assert h == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    assert kl == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    assert p2 == pytest.approx(10 / 16, abs=1e-6)


def test_which_tokens_leave_the_ce_and_their_weights_by_hand():
    counts = np.array([3, 2])
    # floor(5 x 0.4) = 2 per criterion: KL flags tokens 0 and 2 (0.5, 0.25), entropy tokens 1 and 3 (2.0, 1.5)
    d = decide(KL, H, P2, counts, eksft_cfg(), "global", 64)
    assert d.flag_kl.tolist() == [True, False, True, False, False]
    assert d.flag_entropy.tolist() == [False, True, False, True, False]
    assert d.keep.tolist() == [False, False, False, False, True]        # union: only token 4 keeps its CE
    # mean H / log V over the entropy-flagged = 1.75 / ln 64 = 0.42 < 0.5: lambda_H x 1.05; the reference code's KL
    # term R = sum p^2 + KL + H: (0.25 + 0.5 + 1) and (0.5 + 0.25 + 0.5), mean 1.5 <= 2: lambda_KL x 0.95
    lam_h, lam_k, mean_h, mean_k = d.lambdas
    assert lam_h == pytest.approx(0.0525) and lam_k == pytest.approx(0.0475)
    assert mean_h == pytest.approx(1.75 / LOG_V) and mean_k == pytest.approx(1.5)
    np.testing.assert_allclose(d.w_h, [0, -0.0525 / (2 * LOG_V), 0, -0.0525 / (2 * LOG_V), 0])
    np.testing.assert_allclose(d.w_k, [0.0475 / 2, 0, 0.0475 / 2, 0, 0])
    for criterion, keep in [("kl", [0, 1, 0, 1, 1]), ("entropy", [1, 0, 1, 0, 1]), ("intersection", [1] * 5)]:
        d = decide(KL, H, P2, counts, eksft_cfg(f"scorer.eksft.criterion={criterion}"), "global", 64)
        assert d.keep.tolist() == [bool(k) for k in keep], criterion
        # the regularisers' weights carry the kept count c: their means are over the flagged, the CE's over c
        np.testing.assert_allclose(d.w_k, np.array([1, 0, 1, 0, 0]) * 0.0475 * sum(keep) / 2)
    # per example (selection=sample): floor(3 x 0.4) = 1 of example 0, floor(2 x 0.4) = 0 of example 1
    d = decide(KL, H, P2, counts, eksft_cfg("selection=sample"), "sample", 64)
    assert d.flag_kl.tolist() == [True, False, False, False, False]
    assert d.flag_entropy.tolist() == [False, True, False, False, False]
    # the smallest KL instead: 0.0625 and 0.125; kl_form=kl: R = KL, mean (0.5 + 0.25) / 2
    d = decide(KL, H, P2, counts, eksft_cfg("scorer.eksft.largest_kl=false"), "global", 64)
    assert d.flag_kl.tolist() == [False, True, False, True, False]
    d = decide(KL, H, P2, counts, eksft_cfg("scorer.eksft.kl_form=kl", "scorer.eksft.adapt=0"), "global", 64)
    assert d.lambdas == (0.05, 0.05, pytest.approx(1.75 / LOG_V), pytest.approx(0.375))


class _Reference:
    def causal_lm(self):
        return self

    def get_output_embeddings(self):
        return torch.nn.Linear(4, 64)


def test_the_step_loss_of_hand_terms():
    """weigh folds the three means into one sum over the kept count: with CE 1..5, the union keeps token 4 alone,
    so the loss is 5 - lambda_H' mean_H(H / log V) + lambda_KL' mean_KL(R)."""
    target, _ = hand_batch()
    hook = EKSFTHook(eksft_cfg(), target, _Reference())
    hook._plan = "single"
    terms = {k: torch.tensor(v, dtype=torch.float32) for k, v in (("kl", KL), ("entropy", H), ("collision", P2))}
    out, n_kept = hook.weigh([0, 1], torch.tensor([1.0, 2, 3, 4, 5]), None, terms)
    assert n_kept == 1
    assert float(out.sum()) / n_kept == pytest.approx(5 - 0.0525 * 1.75 / LOG_V + 0.0475 * 1.5, rel=1e-6)
    assert hook.keep[[1, 2, 3, 6, 7]].tolist() == [False, False, False, False, True]
    assert hook.kl[[1, 2, 3, 6, 7]].tolist() == KL.tolist() and hook.summary()["online_kept_total"] == 1


def test_validation_names_the_override():
    for overrides, message in [
        (["scorer.eksft.top_k_ratio=1.5"], "scorer.eksft.top_k_ratio=1.5: a share of the tokens: in [0, 1]"),
        (["scorer.eksft.lambda_kl=-1"], "scorer.eksft.lambda_kl=-1.0: must be >= 0"),
        (["scorer.eksft.adapt=1"], "scorer.eksft.adapt=1.0: the per-step factor"),
        (["selection=threshold", "selection.threshold=0"], "selection.method='threshold': scorer=eksft flags"),
        (["scorer.online_scope=micro"], "scorer.online_scope='micro': scorer=eksft (its own rule) needs "
                                        "online_scope=step"),
    ]:
        with pytest.raises(ConfigError) as e:
            scorers.validate(typed("model=tiny", "scorer=eksft", *overrides))
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def hand_step(tiny_lm, ids, tgt, step):
    """One step by hand from both models' full logits: the flags (top floor(0.2 n) by rounded KL and entropy, ties
    to the earlier token), the loss and its gradient norm."""
    lm, ref = tiny_lm(seed=3).train(), tiny_lm(seed=5)
    batch = collate(ids, tgt, step, pad_id=0)
    mask = batch["mask"].clone()
    mask[:, 0] = False
    rows, cols = mask.nonzero(as_tuple=True)
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()[rows, cols - 1]
    with torch.no_grad():
        logq = torch.log_softmax(ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                 .logits.float()[rows, cols - 1], -1)
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    ce = -logp[torch.arange(len(rows)), batch["input_ids"][rows, cols]]
    h, kl, p2 = -(p * logp).sum(-1), (p * (logp - logq)).sum(-1), (p * p).sum(-1)
    n, k = len(rows), math.floor(0.2 * len(rows))

    def top(x):
        r = np.round(x.detach().double().numpy() * 65536)
        f = np.zeros(n, bool)
        f[np.argsort(-r, kind="stable")[:k]] = True
        return torch.from_numpy(f)
    f_kl, f_h = top(kl), top(h)
    keep = ~(f_kl | f_h)
    reg = p2 + kl + h
    mean_h, mean_k = (h[f_h] / LOG_V).mean(), reg[f_kl].mean()
    lam_h = 0.05 * (1.05 if float(mean_h.detach()) < 0.5 else 0.95)
    lam_k = 0.05 * (1.05 if float(mean_k.detach()) > 2.0 else 0.95)
    loss = ce[keep].mean() - lam_h * mean_h + lam_k * mean_k
    loss.backward()
    norm = math.sqrt(sum(float((q.grad ** 2).sum()) for q in lm.parameters()))
    return float(loss.detach()), norm, int(keep.sum()), f_kl.numpy(), f_h.numpy()


@pytest.mark.parametrize("micro", [8, 2], ids=["its-own-forward", "prepass"])
def test_one_step_by_hand(tiny_lm, accelerator, micro):
    ids, tgt = random_examples(8, seed=7)
    cfg = TrainingConfig(lr=1e-2, batch_size=8, micro_batch_size=micro, max_steps=1, warmup_ratio=0.0,
                         max_grad_norm=1e9, schedule="constant", mixed_precision="no", loss_chunk_size=16)
    step = plan_steps(8, cfg, 0)[0]
    want_loss, want_norm, want_kept, f_kl, f_h = hand_step(tiny_lm, ids, tgt, step)
    reference = TokenLoss(tiny_lm(seed=5), chunk_size=16).requires_grad_(False)
    hook = EKSFTHook(typed("model=tiny", "scorer=eksft"), tgt, reference)
    metrics = []
    fit(accelerator, prepare(accelerator, tiny_lm(seed=3), 8, cfg, 0), ids, tgt, cfg, 0,
        on_step=lambda i, m: metrics.append(m), online=hook)
    assert metrics[0]["train/kept_tokens"] == want_kept
    assert metrics[0]["train/loss"] == pytest.approx(want_loss, rel=1e-5)
    assert metrics[0]["train/grad_norm"] == pytest.approx(want_norm, rel=1e-4)
    pos = np.concatenate([tgt.offsets[i] + np.flatnonzero(tgt[i][1:]) + 1 for i in step])
    assert hook.flag_kl[pos].tolist() == f_kl.tolist() and hook.flag_entropy[pos].tolist() == f_h.tolist()
    assert hook.prepasses == (micro < 8)


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eksft") / "fixed"
    run_cli(CLI, run)
    return run


def test_fixed_pipeline_through_the_cli(fixed_run):
    st = stages(fixed_run)
    assert list(st) == ["base_losses", "reference", "select", "final"]
    keep, f_kl, f_h, kl = (load_array(fixed_run / r) for r in ("keep", "eksft/flag_kl", "eksft/flag_entropy",
                                                                 "eksft/kl"))
    is_t = ~np.isnan(kl.values)
    target = kl.like(is_t)
    # every step flags floor(0.2 n_step) tokens by each criterion; the union leaves the CE
    steps = planned_steps(fixed_run, len(target), "final")
    assert len(steps) == st["final"]["steps"]
    for step in steps:
        n = sum(int(target[i].sum()) for i in step)
        assert sum(int(f_kl[i].sum()) for i in step) == math.floor(0.2 * n + 1e-9)
        assert sum(int(f_h[i].sum()) for i in step) == math.floor(0.2 * n + 1e-9)
    assert (keep.values == (is_t & ~(f_kl.values | f_h.values))).all()
    # the flagged ones are the largest KL of their step (the recorded scores are -KL)
    scores = load_array(fixed_run / "scores")
    np.testing.assert_array_equal(scores.values[is_t], -kl.values[is_t])
    summary = json.loads((fixed_run / "summary.json").read_text())
    n_kept = int(keep.values.sum())
    assert summary["tokens_kept"] == n_kept == st["final"]["online_kept_total"]
    assert 0.6 * is_t.sum() <= n_kept < 0.8 * is_t.sum()       # 20% + 20% minus their overlap removed
    assert st["final"]["eksft_flagged_kl"] == int(f_kl.values.sum())


def test_a_run_killed_mid_training_resumes_to_the_same_end(fixed_run, tmp_path):
    resumed, args = tmp_path / "resumed", [*CLI, "training.save_every=2"]
    killed_then_resumed(args, resumed)
    for rel in ("keep", "scores", "eksft/kl", "eksft/entropy", "eksft/flag_kl"):
        np.testing.assert_array_equal(load_array(resumed / rel).values, load_array(fixed_run / rel).values)
    assert stages(resumed)["final"]["eksft_lambda_kl_last"] == stages(fixed_run)["final"]["eksft_lambda_kl_last"]
    assert same_weights(resumed / "final", fixed_run / "final")


def test_ddp_two_processes_equal_one(dist_env, tmp_path):
    """Both runs rank the step's tokens after a pre-pass (2 micro-batches per step): 2 processes flag, keep and
    train as 1 does."""
    job = [*CLI, "data.eval_size=16", "training.micro_batch_size=2", "training.max_steps=4"]
    one, two = tmp_path / "one", tmp_path / "two"
    dist.run_ok(dist_env, tmp_path, [*job, f"hydra.run.dir={one}"], config="single.yaml")
    dist.run_ok(dist_env, tmp_path, [*job, f"hydra.run.dir={two}"], config="ddp.yaml",
                launcher_args=["--num_processes", "2"])
    for rel in ("keep", "eksft/flag_kl", "eksft/flag_entropy"):
        np.testing.assert_array_equal(np.load(two / f"{rel}.values.npy"), np.load(one / f"{rel}.values.npy"))
    assert not np.load(one / "keep.values.npy").all()
    dist.assert_same_update(one, two)


def test_self_evolving_rounds_take_theta_t_as_their_reference(tmp_path):
    """Round 1's reference is the model it starts from (round 0's): at its first step the KL is 0 everywhere."""
    run = tmp_path / "se"
    run_cli([*CLI, "pipeline=self_evolving", "pipeline.chunks=2"], run)
    st = stages(run)
    assert "round_1.select" not in st and not (run / "round_0/eksft").exists()
    kl, keep = load_array(run / "round_1/eksft/kl"), load_array(run / "round_1/keep")
    is_t = ~np.isnan(kl.values)
    first = planned_steps(run, len(kl), "round_1")[0]
    assert all((kl[i][~np.isnan(kl[i])] == 0).all() for i in first)
    assert (kl.values[is_t] > 0).any()                       # later steps have moved away from theta_1
    assert st["round_1"]["tokens_kept"] == int(keep.values.sum()) < is_t.sum()
