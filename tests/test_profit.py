"""ProFit (tokenclean/scorers/profit.py): p = exp(-l_current) per training forward, tokens with p >= tau train."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests import test_distributed as dist
from tests.cli import TINY, killed_then_resumed, load_array, run_cli, same_weights, stages
from tests.conftest import random_examples
from tests.test_config import typed
from tests.test_scorers import hand_batch
from tests.test_scorers_e2e import planned_steps
from tokenclean import scorers
from tokenclean.config import ConfigError, TrainingConfig
from tokenclean.losses import collate
from tokenclean.scorers.online import OnlineSelector
from tokenclean.scorers.profit import probability, rule
from tokenclean.train import fit, plan_steps, prepare

CLI = [*TINY, "data.limit=120", "scorer=profit"]


def profit_selector(target, tau, scope="step"):
    cfg = typed("model=tiny", "scorer=profit", f"scorer.profit.tau={tau}")
    return OnlineSelector(probability, None, target, "global", 0.6, None, scope, rule=rule(cfg))


def test_probability_threshold_by_hand():
    target, _ = hand_batch()     # 5 response tokens: example 0 positions 1-3, example 1 positions 2-3
    p = np.array([0.5, 0.1, 0.05, 0.9, 0.0999])
    pos, s, keep = profit_selector(target, 0.1).rank([0, 1], -np.log(p))
    assert pos.tolist() == [1, 2, 3, 6, 7]
    # scores are p rounded to 2^-16: 0.1 -> 6554 / 65536 (kept: p >= tau), 0.0999 -> 6547 / 65536 (dropped)
    assert s.tolist() == [32768 / 65536, 6554 / 65536, 3277 / 65536, 58982 / 65536, 6547 / 65536]
    assert keep.tolist() == [True, True, False, True, False]
    # no ratio: a higher tau keeps fewer, whatever selection.keep_ratio says
    assert profit_selector(target, 0.6).rank([0, 1], -np.log(p))[2].tolist() == [False, False, False, True, False]


def test_validation_names_the_override():
    for overrides, message in [
        (["scorer.profit.tau=1.5"], "scorer.profit.tau=1.5: a probability: in [0, 1]"),
        (["selection=soft"], "selection.method='soft': scorer=profit decides by its own threshold"),
        (["scorer.online_scope=micro"], "scorer.online_scope='micro': scorer=profit (its own rule) needs "
                                        "online_scope=step"),
    ]:
        with pytest.raises(ConfigError) as e:
            scorers.validate(typed("model=tiny", "scorer=profit", *overrides))
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


def hand_step(tiny_lm, ids, tgt, step, tau):
    """From full logits of a fresh model: each response token's p, the kept ones (p >= tau, p rounded as the
    selector rounds), and the gradient norm of their mean cross-entropy (the house's normaliser)."""
    lm = tiny_lm(seed=3).train()
    batch = collate(ids, tgt, step, pad_id=0)
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["mask"].clone()
    mask[:, 0] = False
    rows, cols = mask.nonzero(as_tuple=True)
    ce = F.cross_entropy(logits[rows, cols - 1], batch["input_ids"][rows, cols], reduction="none")
    p = torch.softmax(logits[rows, cols - 1], -1)[torch.arange(len(rows)), batch["input_ids"][rows, cols]]
    p_rounded = np.round(p.detach().double().numpy() * 65536) / 65536
    kept = torch.from_numpy(p_rounded >= tau)
    (ce[kept].sum() / kept.sum()).backward()
    norm = math.sqrt(sum(float((q.grad ** 2).sum()) for q in lm.parameters()))
    return p_rounded, kept.numpy(), norm, float(ce[kept].detach().mean())


@pytest.mark.parametrize("micro", [8, 2], ids=["its-own-forward", "prepass"])
def test_one_step_trains_the_tokens_at_or_above_tau_by_their_mean(tiny_lm, accelerator, micro):
    ids, tgt = random_examples(8, seed=7)
    cfg = TrainingConfig(lr=1e-2, batch_size=8, micro_batch_size=micro, max_steps=1, warmup_ratio=0.0,
                         max_grad_norm=1e9, schedule="constant", mixed_precision="no")
    step = plan_steps(8, cfg, 0)[0]
    # tau at the median p of the untrained model (about 1/64 everywhere): about half the tokens pass
    p_hand, _, _, _ = hand_step(tiny_lm, ids, tgt, step, 0.0)
    tau = float(np.median(p_hand))
    p_hand, kept_hand, norm, mean = hand_step(tiny_lm, ids, tgt, step, tau)
    assert 0 < kept_hand.sum() < len(kept_hand)
    sel, metrics = profit_selector(tgt, tau), []
    fit(accelerator, prepare(accelerator, tiny_lm(seed=3), len(ids), cfg, 0), ids, tgt, cfg, 0,
        on_step=lambda s, m: metrics.append(m), online=sel)
    pos = np.concatenate([tgt.offsets[i] + np.flatnonzero(tgt[i])[(1 if tgt[i][0] else 0):] for i in step])
    np.testing.assert_allclose(sel.scores[pos], p_hand, rtol=0, atol=2 ** -16)
    assert sel.keep[pos].tolist() == kept_hand.tolist()
    assert metrics[0]["train/kept_tokens"] == int(kept_hand.sum()) == int(sel.keep.sum())
    assert sel.prepasses == (0 if micro == 8 else 1)
    assert metrics[0]["train/grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert metrics[0]["train/loss"] == pytest.approx(mean, rel=1e-5)


# the built-in tiny model is untrained (p about 1/1000 everywhere): tau at about its median p
TAU = 0.001


dist_env = dist.dist_env   # test_distributed's fixture: the launched processes' environment


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("profit") / "fixed"
    run_cli([*CLI, f"scorer.profit.tau={TAU}"], run)
    return run


def check_decisions(keep, scores):
    """The recorded decision is the rule on the recorded probability, token by token; some kept, some not."""
    is_t = ~np.isnan(scores.values)
    assert keep.same_layout(scores) and not (keep.values & ~is_t).any()
    assert (keep.values[is_t] == (scores.values[is_t] >= TAU)).all()
    assert ((scores.values[is_t] >= 0) & (scores.values[is_t] <= 1)).all()
    assert 0 < keep.values.sum() < is_t.sum()
    return int(keep.values.sum()), int(is_t.sum())


def test_fixed_pipeline_through_the_cli(fixed_run):
    st = stages(fixed_run)
    assert list(st) == ["select", "final"]            # no reference, no base pass: it reads the current model only
    assert st["select"]["online"] is True and st["final"]["online_prepasses"] == 0
    n_kept, n_target = check_decisions(load_array(fixed_run / "keep"), load_array(fixed_run / "scores"))
    summary = json.loads((fixed_run / "summary.json").read_text())
    assert summary["tokens_kept"] == n_kept == st["final"]["online_kept_total"]
    assert summary["tokens_target"] == n_target and summary["kept_ratio"] == pytest.approx(n_kept / n_target)
    assert len(planned_steps(fixed_run, len(load_array(fixed_run / "keep")), "final")) == st["final"]["steps"]


def test_a_run_killed_mid_training_resumes_to_the_same_end(fixed_run, tmp_path):
    # killed after step 3 with a state saved every 2 steps, the rerun resumes at step 2 and ends the same
    resumed, args = tmp_path / "resumed", [*CLI, f"scorer.profit.tau={TAU}", "training.save_every=2"]
    killed_then_resumed(args, resumed)
    for rel in ("keep", "scores"):
        np.testing.assert_array_equal(load_array(resumed / rel).values, load_array(fixed_run / rel).values)
    assert same_weights(resumed / "final", fixed_run / "final")


def test_self_evolving_rounds_after_the_first_select_with_it(tmp_path):
    run = tmp_path / "se"
    run_cli([*CLI, f"scorer.profit.tau={TAU}", "pipeline=self_evolving", "pipeline.chunks=2"], run)
    st = stages(run)
    assert st["round_1"]["online_prepasses"] == 0 and "round_1.select" not in st
    n_kept, n_target = check_decisions(load_array(run / "round_1/keep"), load_array(run / "round_1/scores"))
    assert st["round_1"]["tokens_kept"] == n_kept and st["round_0"]["tokens_kept"] == st["round_0"]["tokens_target"]


def test_ddp_two_processes_equal_one(dist_env, tmp_path):
    """Each token's decision is its own probability, and the step's kept count (the loss normaliser) is summed over
    both ranks and their micro-batches (the pre-pass): 2 processes x 2 micro-batches decide and train as 1."""
    job = [*CLI, f"scorer.profit.tau={TAU}", "data.eval_size=16", "training.micro_batch_size=2",
           "training.max_steps=4"]   # kept short
    one, two = tmp_path / "one", tmp_path / "two"
    dist.run_ok(dist_env, tmp_path, [*job, f"hydra.run.dir={one}"], config="single.yaml")
    dist.run_ok(dist_env, tmp_path, [*job, f"hydra.run.dir={two}"], config="ddp.yaml",
                launcher_args=["--num_processes", "2"])
    keep_one, keep_two = (np.load(d / "keep.values.npy") for d in (one, two))
    assert 0 < keep_one.sum() < len(keep_one)
    np.testing.assert_array_equal(keep_two, keep_one)
    dist.assert_same_update(one, two)
