"""Forgetting (tokenclean/scorers/forgetting.py): influence offline, kept tokens learned, dropped ones unlearned with
weight -lambda(step), the step's loss normalised by its kept count across micro-batches and ranks."""
import copy
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests import test_distributed as dist
from tests.cli import TINY, killed_then_resumed, load_array, run_cli, same_weights, stages
from tests.conftest import random_examples
from tests.test_config import typed
from tests.test_scorers_e2e import planned_steps
from tokenclean import scorers
from tokenclean.config import ConfigError, TrainingConfig
from tokenclean.losses import TokenLoss, collate
from tokenclean.ragged import Ragged
from tokenclean.scorers.forgetting import ForgettingWeights, lambda_at
from tokenclean.train import fit, plan_steps, prepare

CLI = [*TINY, "data.limit=120", "scorer=forgetting", "selection.keep_ratio=0.7"]
dist_env = dist.dist_env   # test_distributed's fixture: the launched processes' environment


def test_lambda_and_the_weights_of_a_step_by_hand():
    assert lambda_at(0, 4, 0.25, 1e-5) == 0.0
    assert lambda_at(2, 4, 0.25, 1e-5) == pytest.approx(0.124995, abs=1e-12)
    # example 0: response 1..3 (kept 1, 3), example 1: response 2..3 (kept 3); 3 kept, 2 dropped
    target = Ragged.from_list([[0, 1, 1, 1], [0, 0, 1, 1]], bool)
    keep = Ragged.from_list([[0, 1, 0, 1], [0, 0, 0, 1]], bool)
    hook = ForgettingWeights(keep, target, n_steps=4, t_max=0.25, t_min=1e-5)
    hook.load_state({"weights": hook.weights, "lambdas": np.zeros(2), "step_i": 1})   # as if 2 steps were done
    rows, n_kept = hook.begin_step(None, None, np.array([1, 0]), [], 1, 8, None, 0)
    assert n_kept == 3
    neg = np.float32(-0.124995 * 3 / 2)                  # -lambda(2) * n_kept / n_dropped
    assert rows[0].tolist() == [0, 1, neg, 1] and rows[1].tolist() == [0, 0, neg, 1]
    assert hook.weights_ragged().values.tolist() == [0, 1, neg, 1, 0, 0, neg, 1]
    kept_norm = ForgettingWeights(keep, target, 4, 0.25, 1e-5, "kept")
    kept_norm.load_state({"weights": kept_norm.weights, "lambdas": np.zeros(2), "step_i": 1})
    assert kept_norm.begin_step(None, None, np.array([0]), [], 1, 8, None, 0)[0][0].tolist() == \
        [0, 1, np.float32(-0.124995), 1]
    assert hook.summary() == {"forgetting_tokens_unlearned": 2, "forgetting_lambda_last": 0.124995}


def test_validation_names_the_override():
    for overrides, message in [
        (["scorer.forgetting.t_max=0", "scorer.forgetting.t_min=0.1"],
         "scorer.forgetting.t_max=0.0: must be >= scorer.forgetting.t_min (0.1)"),
        (["scorer.forgetting.t_min=-1"], "scorer.forgetting.t_min=-1.0: must be >= 0"),
        (["selection=soft"], "selection.method='soft': scorer=forgetting splits the tokens"),
    ]:
        with pytest.raises(ConfigError) as e:
            scorers.validate(typed("model=tiny", "scorer=forgetting", *overrides))
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


def train_two_steps(tiny_lm, accelerator, micro, keep, ids, tgt):
    cfg = TrainingConfig(lr=1e-2, batch_size=4, micro_batch_size=micro, max_steps=2, warmup_ratio=0.0,
                         max_grad_norm=1e9, schedule="constant", mixed_precision="no")
    lm, metrics, after_first = tiny_lm(seed=3), [], {}
    hook = ForgettingWeights(keep, tgt, n_steps=2, t_max=0.5, t_min=0.0)

    def on_step(i, m):
        metrics.append(m)
        if i == 0:
            after_first.update(copy.deepcopy(lm.state_dict()))
    fit(accelerator, prepare(accelerator, lm, len(ids), cfg, 0), ids, tgt, cfg, 0, on_step=on_step, online=hook)
    return lm, hook, metrics, after_first, plan_steps(len(ids), cfg, 0)


def test_the_step_loss_is_signed_and_exact_under_accumulation(tiny_lm, accelerator):
    ids, tgt = random_examples(8, seed=7)
    rng = np.random.default_rng(1)
    keep = tgt.like(tgt.values & (rng.random(len(tgt.values)) < 0.6))
    lm4, hook4, m4, first, steps = train_two_steps(tiny_lm, accelerator, 4, keep, ids, tgt)
    lm1, _, m1, _, _ = train_two_steps(tiny_lm, accelerator, 1, keep, ids, tgt)
    # step 2 (lambda = 0.5 * 1 / 2) by hand from the weights after step 1:
    # (sum_kept l - lambda * n_kept / n_dropped * sum_dropped l) / n_kept
    ref = tiny_lm(seed=3)
    ref.load_state_dict(first)
    step = steps[1]
    batch = collate(ids, tgt, step, pad_id=0)
    losses = TokenLoss(ref).train()(**batch)
    kept = torch.from_numpy(np.concatenate([keep[i][1:][tgt[i][1:]] for i in step]))
    n_kept, n_dropped = int(kept.sum()), int((~kept).sum())
    assert n_kept > 0 and n_dropped > 0
    loss = (losses[kept].sum() - 0.25 * n_kept / n_dropped * losses[~kept].sum()) / n_kept
    loss.backward()
    norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in ref.parameters()))
    assert m4[1]["train/loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert m4[1]["train/kept_tokens"] == n_kept
    assert m4[1]["train/grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert m1[1]["train/grad_norm"] == pytest.approx(norm, rel=1e-4)   # 4 micro-batches of 1: the same update
    for a, b in zip(lm4.parameters(), lm1.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert hook4.lambdas == [0.0, 0.25]


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("forgetting") / "fixed"
    run_cli(CLI, run)
    return run


def test_fixed_pipeline_weights_every_dropped_token_by_its_step(fixed_run):
    st = stages(fixed_run)
    assert list(st) == ["base_losses", "reference", "select", "final"]
    keep, base, ref = (load_array(fixed_run / r) for r in ("keep", "losses/base", "losses/reference"))
    target = base.like(~np.isnan(base.values))
    is_t = target.values
    # the decision is influence's: the top floor(0.7 n) of l_base - l_ref
    n = int(is_t.sum())
    assert int(keep.values.sum()) == math.floor(0.7 * n + 1e-9)
    infl = (base.values - ref.values)[is_t]
    assert infl[keep.values[is_t]].min() >= infl[~keep.values[is_t]].max()
    # each token's weight from its step s of S: 1 kept, -lambda(s) n_kept(s) / n_dropped(s) dropped
    w = load_array(fixed_run / "train_weights")
    steps = planned_steps(fixed_run, len(target), "final")
    want = np.zeros(len(is_t), np.float32)
    for s, step in enumerate(steps):
        lam = (0.25 - 1e-5) * s / len(steps)
        k = sum(int(keep[i].sum()) for i in step)
        d = sum(int(target[i].sum()) for i in step) - k
        for i in step:
            lo, hi = target.offsets[i], target.offsets[i + 1]
            want[lo:hi] = np.where(keep[i], 1, np.where(target[i], np.float32(-lam * k / d), 0))
    np.testing.assert_array_equal(w.values, want)
    assert st["final"]["forgetting_tokens_unlearned"] == int(((want < 0) & is_t).sum()) > 0
    # cleaned.parquet: labels on every token of nonzero weight, the signed weights beside them
    table = pq.read_table(fixed_run / "cleaned.parquet").to_pydict()
    flat_w = np.concatenate([np.asarray(r, np.float32) for r in table["weights"]])
    flat_labels = np.concatenate([np.asarray(r) for r in table["labels"]])
    np.testing.assert_array_equal(flat_w, want)
    assert ((flat_labels != -100) == (want != 0)).all()
    summary = json.loads((fixed_run / "summary.json").read_text())
    assert summary["tokens_kept"] == int(keep.values.sum())


def test_a_run_killed_mid_training_resumes_to_the_same_end(fixed_run, tmp_path):
    resumed, args = tmp_path / "resumed", [*CLI, "training.save_every=2"]
    killed_then_resumed(args, resumed)
    np.testing.assert_array_equal(load_array(resumed / "train_weights").values,
                                  load_array(fixed_run / "train_weights").values)
    assert same_weights(resumed / "final", fixed_run / "final")


def test_ddp_two_processes_equal_one(dist_env, tmp_path):
    """The step's counts (n_kept, n_dropped) are the whole step's, over both ranks and their micro-batches: 2
    processes x 2 micro-batches give the weights and the update of 1 process."""
    env = dist_env
    job = [*CLI, "data.eval_size=16", "training.micro_batch_size=2", "training.max_steps=4"]   # kept short
    one, two = tmp_path / "one", tmp_path / "two"
    dist.run_ok(env, tmp_path, [*job, f"hydra.run.dir={one}"], config="single.yaml")
    dist.run_ok(env, tmp_path, [*job, f"hydra.run.dir={two}"], config="ddp.yaml",
                launcher_args=["--num_processes", "2"])
    np.testing.assert_array_equal(np.load(two / "keep.values.npy"), np.load(one / "keep.values.npy"))
    w_one, w_two = (np.load(d / "train_weights.values.npy") for d in (one, two))
    assert (w_one < 0).any()
    np.testing.assert_array_equal(w_two, w_one)
    dist.assert_same_update(one, two)


def test_self_evolving_rounds_unlearn_what_they_drop(tmp_path):
    run = tmp_path / "se"
    run_cli([*CLI, "pipeline=self_evolving", "pipeline.chunks=2"], run)
    assert not (run / "round_0/train_weights.json").exists()       # round 0 trains every token: nothing to unlearn
    keep, w = load_array(run / "round_1/keep"), load_array(run / "round_1/train_weights")
    is_t = ~np.isnan(load_array(run / "round_1/base_losses").values)
    assert (w.values[keep.values] == 1).all()
    dropped = is_t & ~keep.values
    assert dropped.any() and (w.values[dropped] <= 0).all() and (w.values[dropped] < 0).any()
    assert (w.values[~is_t] == 0).all()
    # cleaned.parquet: round 0's examples (every response token, weight 1), then round 1's signed weights
    rows = pq.read_table(run / "cleaned.parquet")["weights"].to_pylist()
    n1 = len(keep)
    np.testing.assert_array_equal(np.concatenate([np.asarray(r, np.float32) for r in rows[-n1:]]), w.values)
    first = np.concatenate([np.asarray(r, np.float32) for r in rows[:-n1]])
    assert set(np.unique(first).tolist()) == {0.0, 1.0}
