"""ssToken (tokenclean/scorers/sstoken.py): gamma norm(l_base - l_current) + (1 - gamma) last-layer attention to the
prompt, the top keep_ratio of each sample, attention alone in the warm-up."""
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
from tokenclean.losses import TokenLoss, collate
from tokenclean.ragged import Ragged
from tokenclean.scorers.sstoken import LastLayerAttention, SsTokenSelector, batch_attention, prompt_attention
from tokenclean.train import fit, plan_steps, prepare

CLI = [*TINY, "data.limit=120", "scorer=sstoken", "selection=sample"]
dist_env = dist.dist_env   # test_distributed's fixture: the launched processes' environment


def r16(x):
    return np.round(np.asarray(x, np.float64) * 65536) / 65536


def test_score_and_decision_by_hand():
    target, base = hand_batch()   # example 0: response 1..3, base losses 1, 2, 3; example 1: 2..3, base 0.5, 1
    sel = SsTokenSelector(base, target, keep_ratio=0.67, gamma=0.5, warmup=0.0, batch_size=2)
    sel._attention = np.array([0.25, 0.75, 0.5, 0.9, 0.1])
    current = np.array([0.5, 2.5, 1.0, 1.5, 0.0])
    sel._warm = {0: False, 1: False}
    pos, s, keep = sel.rank([0, 1], current)
    assert pos.tolist() == [1, 2, 3, 6, 7]
    # example 0: REL = 0.5, -0.5, 2.0 -> min-max 0.4, 0, 1 -> halves of 0.4 + 0.25, 0 + 0.75, 1 + 0.5
    # example 1: REL = -1, 1 -> 0, 1 -> halves of 0 + 0.9, 1 + 0.1; keep floor(3 x 0.67) = 2, floor(2 x 0.67) = 1
    assert s.tolist() == r16([0.325, 0.375, 0.75, 0.45, 0.55]).tolist()
    assert keep.tolist() == [False, True, True, False, True]
    # example 1 in the warm-up: attention alone (0.9, 0.1), so its first token is kept instead
    sel._warm = {0: False, 1: True}
    _, s, keep = sel.rank([0, 1], current)
    assert s.tolist() == r16([0.325, 0.375, 0.75, 0.9, 0.1]).tolist()
    assert keep.tolist() == [False, True, True, True, False]
    # gamma = 1: REL alone (the reference's normalisation, 1e-8 in the denominator, rounded to 2^-16)
    sel.gamma = 1.0
    sel._warm = {0: False, 1: False}
    assert sel.rank([0, 1], current)[1].tolist() == r16([0.4, 0.0, 1.0, 0.0, 1.0]).tolist()


def test_a_history_model_replaces_the_cached_base_losses():
    target, base = hand_batch()
    sel = SsTokenSelector(base, target, 0.67, 1.0, 0.0, 2, history="ema")
    sel.history, sel._history_losses = object(), np.array([3.0, 2.0, 1.0, 1.0, 1.0])   # as its forward returned
    sel._attention, sel._warm = np.zeros(5), {0: False, 1: False}
    # REL = history - current = 2, 1, 0 and 0, 0: min-max 1, 0.5, 0 and a constant (0, 0)
    assert sel.rank([0, 1], np.array([1.0, 1.0, 1.0, 1.0, 1.0]))[1].tolist() == [1.0, 0.5, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("history", ["ema", "snapshot"])
def test_the_history_copy_is_the_ema_or_the_snapshot_of_the_weights(tiny_lm, accelerator, history):
    """Three steps: the EMA (decay 0.5) is h0 = the initial weights, h1 = (h0 + w1) / 2, h2 = (h1 + w2) / 2 at the
    start of step 3 (w_s: after s steps), the snapshot (every 2) is w2; at step 1 the history is the model itself,
    so REL is 0 and each score is (1 - gamma) A: half the attention term."""
    ids, tgt = random_examples(12, seed=7)
    cfg = TrainingConfig(lr=1e-2, batch_size=4, micro_batch_size=4, max_steps=3, warmup_ratio=0.0,
                         max_grad_norm=1e9, schedule="constant", mixed_precision="no")
    lm = tiny_lm(seed=3)
    names = [n for n, p in lm.named_parameters()]
    w = [{n: p.detach().clone() for n, p in lm.named_parameters()}]
    sel = SsTokenSelector(tgt.like(np.zeros(len(tgt.values), np.float32)), tgt, 0.6, 0.5, 0.0, 4, history,
                          snapshot_every=2, ema_decay=0.5)
    first = {}

    def on_step(i, m):
        w.append({n: p.detach().clone() for n, p in lm.named_parameters()})
        if i == 0:
            first.update(scores=sel.scores.copy(), attention=sel._attention.copy())
    p = prepare(accelerator, lm, len(ids), cfg, 0)
    fit(accelerator, p, ids, tgt, cfg, 0, on_step=on_step, online=sel)
    got = dict(zip(names, (h for h in sel.history.parameters())))
    for n in names:
        if history == "ema":
            want = w[0][n].clone().mul_(0.5).add_(w[1][n], alpha=0.5).mul_(0.5).add_(w[2][n], alpha=0.5)
        else:
            want = w[2][n]
        assert torch.equal(got[n], want), n
    step0 = p.steps[0]
    pos = np.concatenate([tgt.offsets[i] + np.flatnonzero(tgt[i]) for i in step0])
    np.testing.assert_array_equal(first["scores"][pos], r16(0.5 * first["attention"]).astype(np.float32))


def test_warmup_is_a_share_of_each_epochs_examples():
    target = Ragged.from_list([[0, 1]] * 10, bool)
    sel = SsTokenSelector(None, target, 0.6, 0.5, warmup=0.5, batch_size=4)   # 3 steps per epoch, 5 warm examples
    step = np.array([7, 2, 5, 0])
    assert list(sel.warm(0, step).values()) == [True] * 4          # epoch positions 0..3
    assert list(sel.warm(1, step).values()) == [True, False, False, False]   # 4..7: only 4 < 5
    assert list(sel.warm(2, step[:2]).values()) == [False, False]  # 8, 9
    assert list(sel.warm(3, step).values()) == [True] * 4          # the next epoch starts over


def test_validation_names_the_override():
    for overrides, message in [
        (["selection=sample", "scorer.sstoken.gamma=1.5"], "scorer.sstoken.gamma=1.5: the weight of norm(REL)"),
        (["selection=sample", "scorer.sstoken.warmup=-0.1"], "scorer.sstoken.warmup=-0.1: a share of each epoch"),
        (["selection=sample", "scorer.sstoken.snapshot_every=0"], "scorer.sstoken.snapshot_every=0: a step count"),
        (["selection=sample", "scorer.sstoken.ema_decay=1"], "scorer.sstoken.ema_decay=1.0: the EMA's decay"),
        ([], "selection.method='global': scorer=sstoken keeps the top selection.keep_ratio of each sample"),
        (["selection.keep_ratio=1.5", "selection=sample"], "selection.keep_ratio=1.5"),
    ]:
        with pytest.raises(ConfigError) as e:
            cfg = typed("model=tiny", "scorer=sstoken", *overrides)
            from tokenclean.config import validate
            validate(cfg)
            scorers.validate(cfg)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    scorers.validate(typed("model=tiny", "scorer=sstoken", "selection=sample"))


def test_the_attention_term_is_eager_attentions_last_layer(tiny_lm):
    """The term from the recorded q/k of an sdpa forward over a packed batch equals the reference code's
    attn[prompt_len:, :prompt_len].sum(-1) of eager attention's output_attentions[-1].mean(heads), per example; the
    recording changes no loss."""
    ids, tgt = random_examples(5, seed=3, min_len=6, max_len=14)
    idx = np.array([0, 1, 2, 3, 4])
    lm = tiny_lm(seed=5)
    assert lm.config._attn_implementation == "sdpa"
    batch = collate(ids, tgt, idx, packed=True, width=24)   # several examples to a row
    assert batch["input_ids"].shape[0] < len(idx)
    model = TokenLoss(lm)
    with torch.no_grad():
        plain = model(**batch)
        rec = LastLayerAttention(model)
        recorded = model(**batch)
        got = batch_attention(rec, tgt, idx)
        rec.remove()
    assert torch.equal(plain, recorded) and lm.model.layers[-1].self_attn.config is lm.config
    eager = tiny_lm(seed=5)
    eager.set_attn_implementation("eager")
    want = []
    with torch.no_grad():
        for i in idx:
            x = torch.as_tensor(np.asarray(ids[int(i)]), dtype=torch.long)[None]
            attn = eager(input_ids=x, output_attentions=True).attentions[-1].mean(1)[0]
            prompt_len = int((~np.asarray(tgt[int(i)])).sum())
            want.append(attn[prompt_len:, :prompt_len].sum(-1).numpy())
    want = np.concatenate(want)
    assert len(got) == len(want) == int(tgt.values.sum())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert 0 < want.min() and want.max() < 1


@pytest.mark.parametrize("micro", [8, 2], ids=["one-forward", "accumulated"])
def test_one_step_trains_the_tokens_chosen_by_hand(tiny_lm, accelerator, micro):
    """One optimiser step from full logits and eager attention, by hand: each sample's scores (gamma 0.5; the first
    half of the step's examples in the warm-up, attention alone), its top floor(0.6 n), and the gradient of the kept
    tokens' mean cross-entropy; split into 4 micro-batches the step chooses and trains the same."""
    ids, tgt = random_examples(8, seed=7)
    base = tgt.like(np.where(tgt.values, np.random.default_rng(2).uniform(3, 5, len(tgt.values)), np.nan)
                    .astype(np.float32))
    cfg = TrainingConfig(lr=1e-2, batch_size=8, micro_batch_size=micro, max_steps=1, warmup_ratio=0.0,
                         max_grad_norm=1e9, schedule="constant", mixed_precision="no")
    step = plan_steps(8, cfg, 0)[0]
    lm, eager = tiny_lm(seed=3).train(), tiny_lm(seed=3)
    eager.set_attn_implementation("eager")
    total, kept_all, scores_all = 0, [], []
    losses = []
    for k, i in enumerate(step):
        x = torch.as_tensor(np.asarray(ids[int(i)]), dtype=torch.long)[None]
        t = np.asarray(tgt[int(i)])
        cols = np.flatnonzero(t)
        ce = F.cross_entropy(lm(input_ids=x).logits[0, cols - 1], x[0, cols], reduction="none")
        with torch.no_grad():
            attn = eager(input_ids=x, output_attentions=True).attentions[-1].mean(1)[0]
        a = attn[cols][:, ~torch.from_numpy(t)].sum(-1).double().numpy()
        rel = r16(np.asarray(base[int(i)], np.float64)[cols] - ce.detach().double().numpy())
        g = 0.0 if k < 4 else 0.5                       # warm-up: epoch positions 0..3 of 8 (warmup=0.5)
        score = r16(g * (rel - rel.min()) / (rel.max() - rel.min() + 1e-8) + (1 - g) * a)
        keep = np.zeros(len(cols), bool)
        keep[np.argsort(-score, kind="stable")[:math.floor(0.6 * len(cols) + 1e-9)]] = True
        losses.append(ce[torch.from_numpy(keep)])
        kept_all.append(keep)
        scores_all.append(score)
        total += int(keep.sum())
    loss = torch.cat(losses).sum() / total
    loss.backward()
    norm = math.sqrt(sum(float((q.grad ** 2).sum()) for q in lm.parameters()))
    sel, metrics = SsTokenSelector(base, tgt, 0.6, 0.5, 0.5, 8), []
    fit(accelerator, prepare(accelerator, tiny_lm(seed=3), len(ids), cfg, 0), ids, tgt, cfg, 0,
        on_step=lambda s_, m: metrics.append(m), online=sel)
    pos = np.concatenate([tgt.offsets[i] + np.flatnonzero(tgt[i]) for i in step])
    assert sel.keep[pos].tolist() == np.concatenate(kept_all).tolist()
    np.testing.assert_allclose(sel.scores[pos], np.concatenate(scores_all), rtol=0, atol=2 ** -16)
    assert metrics[0]["train/kept_tokens"] == total and sel.warmup_samples == 4 and sel.prepasses == 0
    assert metrics[0]["train/loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert metrics[0]["train/grad_norm"] == pytest.approx(norm, rel=1e-4)


def test_prompt_attention_by_hand():
    """One head, one row of two examples ([p, r] and [p, r, r]): q = k = 0 makes every allowed key equally likely,
    so position j of an example gets (prompt keys before it) / (keys before it), and no key of the other example."""
    q = torch.zeros(1, 1, 5, 2)
    pos = torch.tensor([[0, 1, 0, 1, 2]])
    prompt = torch.tensor([[True, False, True, False, False]])
    got = prompt_attention(q, q, pos, prompt, scaling=1.0)
    assert got.tolist() == [[1.0, 0.5, 1.0, 0.5, float(np.float32(1 / 3))]]
    # a sliding window of 2 keys: position 4 sees positions 3 and 4 only, neither a prompt
    assert prompt_attention(q, q, pos, prompt, 1.0, window=2).tolist()[0][4] == 0.0


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("sstoken") / "fixed"
    run_cli(CLI, run)
    return run


def test_fixed_pipeline_through_the_cli(fixed_run):
    st = stages(fixed_run)
    assert list(st) == ["select", "base_losses", "final"]     # the base's losses, then training with them
    assert st["select"]["online"] is True and st["final"]["online_prepasses"] == 0
    keep, scores, target = (load_array(fixed_run / r) for r in ("keep", "scores", "losses/base"))
    is_t = ~np.isnan(target.values)
    n = target.like(is_t).row_sums()
    # each sample keeps floor(0.6 n) of its response tokens, the highest-scored ones
    assert keep.row_sums().tolist() == np.floor(0.6 * n + 1e-9).astype(int).tolist()
    for e in range(len(keep)):
        k, s = np.asarray(keep[e]), np.asarray(scores[e])
        if k.any() and (~k & is_t[keep.offsets[e]:keep.offsets[e + 1]]).any():
            assert s[k].min() >= s[~k & ~np.isnan(s)].max()
    assert ((scores.values[is_t] >= 0) & (scores.values[is_t] <= 1)).all()
    summary = json.loads((fixed_run / "summary.json").read_text())
    assert summary["tokens_kept"] == int(keep.values.sum()) == st["final"]["online_kept_total"]
    steps = planned_steps(fixed_run, len(keep), "final")
    assert len(steps) == st["final"]["steps"]
    # the warm-up: the examples at epoch positions p < 0.2 n (one epoch)
    assert st["final"]["sstoken_warmup_samples"] == sum(p < 0.2 * len(keep) for p in range(len(keep))) > 0


def test_eager_attention_chooses_the_same_tokens(fixed_run, tmp_path):
    """model.attn_implementation=eager (the reference code's output_attentions path) and the default sdpa with the
    recorded last layer: the same decisions, scores within a few 2^-16 rounding steps (the two kernels round
    differently, ~1e-7, and training carries that on: 3 of 3116 scores move by 2 steps)."""
    run = tmp_path / "eager"
    run_cli([*CLI, "model.attn_implementation=eager"], run)
    np.testing.assert_array_equal(load_array(run / "keep").values, load_array(fixed_run / "keep").values)
    np.testing.assert_allclose(load_array(run / "scores").values, load_array(fixed_run / "scores").values,
                               rtol=0, atol=2 ** -14)


def test_a_run_killed_mid_training_resumes_to_the_same_end(fixed_run, tmp_path):
    resumed, args = tmp_path / "resumed", [*CLI, "training.save_every=2"]
    killed_then_resumed(args, resumed)
    for rel in ("keep", "scores"):
        np.testing.assert_array_equal(load_array(resumed / rel).values, load_array(fixed_run / rel).values)
    assert stages(resumed)["final"]["sstoken_warmup_samples"] == stages(fixed_run)["final"]["sstoken_warmup_samples"]
    assert same_weights(resumed / "final", fixed_run / "final")


@pytest.mark.slow   # 28 s; the base history's resume runs by default
def test_an_ema_history_resumes_to_the_same_end(tmp_path):
    """The history copy is part of the resume state: killed after step 3 (saved after 2), the rerun ends as the
    uninterrupted run does."""
    args = [*CLI, "scorer.sstoken.history=ema", "scorer.sstoken.ema_decay=0.5"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_cli(args, whole)
    killed_then_resumed([*args, "training.save_every=2"], resumed)
    for rel in ("keep", "scores"):
        np.testing.assert_array_equal(load_array(resumed / rel).values, load_array(whole / rel).values)
    assert same_weights(resumed / "final", whole / "final")


def test_self_evolving_rounds_after_the_first_select_with_it(tmp_path):
    run = tmp_path / "se"
    run_cli([*CLI, "pipeline=self_evolving", "pipeline.chunks=2"], run)
    st = stages(run)
    assert st["round_1"]["online_prepasses"] == 0 and "round_1.select" not in st
    keep, target = load_array(run / "round_1/keep"), load_array(run / "round_1/base_losses")
    n = target.like(~np.isnan(target.values)).row_sums()
    assert keep.row_sums().tolist() == np.floor(0.6 * n + 1e-9).astype(int).tolist()
    assert st["round_0"]["tokens_kept"] == st["round_0"]["tokens_target"]


@pytest.mark.parametrize("history", ["base", pytest.param("ema", marks=pytest.mark.slow)])   # ema: 29 s more
def test_ddp_two_processes_equal_one(dist_env, tmp_path, history):
    """Each sample is ranked from its own training forward, so 2 processes x 2 micro-batches choose what 1 process
    chooses, and the step's normaliser (the sum of floor(0.6 n) over its samples) is the same: the same update.
    history=ema: every rank keeps the same EMA copy and runs it on its own micro-batches."""
    job = [*CLI, "data.eval_size=16", "training.micro_batch_size=2", "training.max_steps=4",
           f"scorer.sstoken.history={history}", "scorer.sstoken.ema_decay=0.5"]
    one, two = tmp_path / "one", tmp_path / "two"
    dist.run_ok(dist_env, tmp_path, [*job, f"hydra.run.dir={one}"], config="single.yaml")
    dist.run_ok(dist_env, tmp_path, [*job, f"hydra.run.dir={two}"], config="ddp.yaml",
                launcher_args=["--num_processes", "2"])
    k_one, k_two = (np.load(d / "keep.values.npy") for d in (one, two))
    assert k_one.sum() > 0
    np.testing.assert_array_equal(k_two, k_one)
    np.testing.assert_allclose(np.load(two / "scores.values.npy"), np.load(one / "scores.values.npy"), atol=1e-4,
                               rtol=0)
    dist.assert_same_update(one, two)
