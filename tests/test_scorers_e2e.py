"""Every scorer end to end through the real `tokenclean` command on the tiny model: files written, kept counts exact."""
import json
import math

import numpy as np
import pytest

from tests.cli import load_array, run_cli, stages

TINY = ["model=tiny", "tracking=none", "data.limit=64", "data.eval_size=8", "data.max_length=48"]


def planned_steps(run_dir, n, stage):
    from omegaconf import OmegaConf

    from tokenclean.config import TrainingConfig
    from tokenclean.pipelines.job import stage_seed
    from tokenclean.train import plan_steps
    conf = OmegaConf.load(run_dir / "config.yaml")
    tcfg = TrainingConfig(**OmegaConf.to_container(conf.training))
    return plan_steps(n, tcfg, stage_seed(conf.seed, stage))


def per_step_kept(run_dir, target, ratio, stage="final", scores=None, keep=None):
    """floor(ratio * response tokens of each optimiser step), summed: what online global selection must keep.
    With scores and keep: also checks that inside every step the kept tokens are the top-scored ones."""
    per_ex = np.add.reduceat(target.values.astype(np.int64), target.offsets[:-1])
    steps = planned_steps(run_dir, len(target), stage)
    for s in steps if scores is not None else []:
        sc = np.concatenate([scores[i][target[i]] for i in s])
        kp = np.concatenate([keep[i][target[i]] for i in s])
        assert kp.sum() == int(math.floor(len(sc) * ratio + 1e-9))
        if 0 < kp.sum() < len(sc):
            assert sc[kp].min() >= sc[~kp].max()
    return sum(int(math.floor(per_ex[s].sum() * ratio + 1e-9)) for s in steps)


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("scorer", ["rho", "self_online"])
def test_online_scorers_in_the_fixed_pipeline(tmp_path, scorer):
    run = tmp_path / scorer
    run_cli([*TINY, f"scorer={scorer}"], run)
    st = stages(run)
    assert list(st) == (["base_losses", "reference", "select", "final"] if scorer == "rho"
                        else ["select", "base_losses", "final"])
    assert st["select"]["online"] is True
    keep, scores = load_array(run / "keep"), load_array(run / "scores")
    base = load_array(run / "losses/base")
    target = base.like(~np.isnan(base.values))
    assert keep.same_layout(target) and not (keep.values & ~target.values).any()
    assert not np.isnan(scores.values[target.values]).any()
    n_kept = int(keep.values.sum())
    assert n_kept == per_step_kept(run, target, 0.6, "final", scores, keep) == st["final"]["online_kept_total"]
    s = summary(run)
    assert s["tokens_kept"] == n_kept and s["tokens_target"] == int(target.values.sum())
    assert s["kept_ratio"] == pytest.approx(n_kept / target.values.sum())
    if scorer == "rho":
        assert (run / "reference").is_dir() and s["eval_loss_reference"] is not None
    else:
        assert not (run / "reference").exists() and "eval_loss_reference" not in s
    assert (run / "final" / "model.safetensors").exists()


def test_xtf_in_the_fixed_pipeline(tmp_path):
    run = tmp_path / "xtf"
    run_cli([*TINY, "scorer=xtf", "scorer.xtf.kn_threshold=0.999"], run)   # the tiny model: p_base ~ 1e-3
    st = stages(run)
    assert "reference" not in st and not (run / "reference").exists()
    arr = {k: load_array(run / f"xtf/{k}") for k in ("kn", "ri", "tr", "kn_noise", "ri_noise", "tr_noise", "keep")}
    keep = load_array(run / "keep")
    base = load_array(run / "losses/base")
    target = base.like(~np.isnan(base.values))
    t = target.values
    assert np.array_equal(keep.values, arr["keep"].values)
    union = arr["kn_noise"].values | arr["ri_noise"].values | arr["tr_noise"].values
    assert np.array_equal(keep.values, t & ~union)
    # KN is 1 - p_base from the stored base losses; this random model gives p_base ~ 1/1024 to every token, so the
    # threshold 0.999 (set above) marks the tokens with p_base > 0.001: some, not all
    np.testing.assert_allclose(arr["kn"].values[t], 1 - np.exp(-base.values[t].astype(np.float64)), rtol=1e-5)
    assert np.array_equal(arr["kn_noise"].values[t], arr["kn"].values[t] < 0.999)
    assert 0 < arr["kn_noise"].values.sum() < t.sum() and arr["tr_noise"].values.any()
    for k in ("kn", "ri", "tr"):
        assert not np.isnan(arr[k].values[t]).any() and np.isnan(arr[k].values[~t]).all()
    s = summary(run)
    assert s["tokens_kept"] == int(keep.values.sum()) == st["select"]["tokens_kept"]
    assert st["select"]["xtf_tr_noise"] == int(arr["tr_noise"].values.sum())


def test_self_online_in_self_evolving_rounds(tmp_path):
    run = tmp_path / "se"
    run_cli([*TINY, "scorer=self_online", "pipeline=self_evolving", "pipeline.chunks=2"], run)
    st = stages(run)
    assert "round_1.select" not in st            # no reference pass: selection happened while round 1 trained
    assert not (run / "round_1" / "reference_losses.json").exists()
    keep, scores = load_array(run / "round_1/keep"), load_array(run / "round_1/scores")
    base = load_array(run / "round_1/base_losses")
    target = base.like(~np.isnan(base.values))
    assert st["round_1"]["tokens_kept"] == int(keep.values.sum()) == per_step_kept(run, target, 0.6, "round_1",
                                                                                  scores, keep)
    assert not np.isnan(scores.values[target.values]).any()


@pytest.mark.slow   # the same run as test_cli's influence run with selection=sample, whose rule test_selection pins
def test_offline_rho_is_influence_ranked_within_samples(tmp_path):
    # the reference code's offline "rho" baseline: influence scores ranked within each sample
    run2 = tmp_path / "rho_offline"
    run_cli([*TINY, "scorer=influence", "selection=sample"], run2)
    scores2, keep2 = load_array(run2 / "scores"), load_array(run2 / "keep")
    for i in range(len(keep2)):
        t = ~np.isnan(scores2[i])
        k = int(math.floor(t.sum() * 0.6 + 1e-9))
        assert keep2[i].sum() == k
        if 0 < k < t.sum():
            assert scores2[i][keep2[i]].min() >= scores2[i][t & ~keep2[i]].max()


def test_scorer_config_errors_name_the_override(tmp_path):
    proc = run_cli(["model=tiny", "tracking=none", "scorer=xtf", "pipeline=self_evolving"], tmp_path / "r",
                   check=False)
    assert proc.returncode == 2 and "pipeline.name='self_evolving'" in proc.stderr
    proc = run_cli(["model=tiny", "tracking=none", "scorer=rho", "scorer.online_scope=micro", "selection=threshold"],
                   tmp_path / "r2", check=False)
    assert proc.returncode == 2 and "scorer.online_scope='micro'" in proc.stderr


@pytest.mark.slow   # two processes (gloo): about a minute on 2 CPU cores
def test_online_step_scope_is_world_size_invariant(tmp_path):
    """rho with online_scope=step on 1 process (the step is its one forward) and on 2 (a no-grad pre-pass per step,
    ranks combined by an all-reduce): the same kept tokens and, up to float summation order, the same weights."""
    import shutil
    import sys
    from pathlib import Path

    from tests.cli import weights
    args = [*TINY, "scorer=rho", "training.max_grad_norm=0"]
    run_cli(args, tmp_path / "one")
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    run_cli(["--nproc_per_node", "2", "-m", "tokenclean", *args], tmp_path / "two", script=torchrun)
    assert stages(tmp_path / "one")["final"]["online_prepasses"] == 0
    assert stages(tmp_path / "two")["final"]["online_prepasses"] > 0
    k1, k2 = load_array(tmp_path / "one/keep"), load_array(tmp_path / "two/keep")
    assert np.array_equal(k1.values, k2.values) and k1.values.any()
    w1, w2 = weights(tmp_path / "one/final"), weights(tmp_path / "two/final")
    assert max(float(np.abs(w1[k] - w2[k]).max()) for k in w1) < 1e-4
