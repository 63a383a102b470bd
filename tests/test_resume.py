"""SIGKILL a run at several points, run the same command again: it resumes and reaches the same masks and weights."""
import json

import numpy as np
import pytest

from tests.cli import ROOT, TINY, load_array, run_cli, same_weights, stages

SELF_EVOLVING = [*TINY, "data.limit=160", "pipeline=self_evolving", "pipeline.chunks=3"]
KILL = ROOT / "tests" / "scripts" / "kill_run.py"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("se") / "run"
    run_cli(SELF_EVOLVING, run_dir)
    return run_dir


def assert_same_result(run_dir, reference):
    assert stages(run_dir).keys() == stages(reference).keys()
    for t in (1, 2):
        np.testing.assert_array_equal(load_array(run_dir / f"round_{t}/keep").values,
                                      load_array(reference / f"round_{t}/keep").values)
    assert same_weights(run_dir / "round_2/model", reference / "round_2/model")
    a, b = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert a["eval_loss_after"] == b["eval_loss_after"]


@pytest.mark.parametrize("kill_at, done_before", [
    # mid-training (slow: tests/test_preemption.py kills mid-training at random steps by default)
    pytest.param("train:round_1:2", ["base_losses", "round_0", "round_1.select"], marks=pytest.mark.slow),
    ("checkpoint:model", ["base_losses"]),                                # round 0's checkpoint written, not published
    # scores' arrays written, meta not
    ("array:round_2/scores", ["base_losses", "round_0", "round_1.select", "round_1"]),
    # the manifest naming round_1 half-written (slow: the array and checkpoint kills above cover atomic publishing)
    pytest.param("manifest:round_1", ["base_losses", "round_0", "round_1.select"], marks=pytest.mark.slow),
])
def test_self_evolving_resumes_after_sigkill(tmp_path, uninterrupted, kill_at, done_before):
    run_dir = tmp_path / "run"
    killed = run_cli(SELF_EVOLVING, run_dir, script=KILL, env={"KILL_AT": kill_at}, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert list(stages(run_dir)) == done_before
    resumed = run_cli(SELF_EVOLVING, run_dir)
    assert "resuming" in resumed.stderr
    assert_same_result(run_dir, uninterrupted)
    assert not list(run_dir.rglob("*.tmp*")) or kill_at.startswith("manifest")


@pytest.mark.slow   # tests/test_preemption.py kills the same stage at random steps by default
def test_fixed_resumes_mid_training(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run_cli(TINY, ref_dir)
    killed = run_cli(TINY, run_dir, script=KILL, env={"KILL_AT": "train:final:3"}, check=False)
    assert killed.returncode == -9
    assert list(stages(run_dir)) == ["base_losses", "reference", "select"]
    run_cli(TINY, run_dir)
    np.testing.assert_array_equal(load_array(run_dir / "keep").values, load_array(ref_dir / "keep").values)
    assert same_weights(run_dir / "final", ref_dir / "final")


def test_a_different_config_refuses_to_resume(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    run_cli([*SELF_EVOLVING, "training.max_steps=1"], run_dir)
    proc = run_cli([*SELF_EVOLVING, "training.max_steps=2"], run_dir, check=False)
    assert proc.returncode != 0
    assert "holds a run made with a different config (training.max_steps: 1 in the run, 2 now)" in proc.stderr
    assert "resume=false" in proc.stderr
    run_cli([*SELF_EVOLVING, "training.max_steps=2", "resume=false"], run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["round_2"]["steps"] == 2


def test_a_changed_data_file_or_model_refuses_to_resume_naming_it_and_what_changed(tmp_path):
    import shutil

    from tokenclean.assets import resolve_model
    model, pool = tmp_path / "model", tmp_path / "pool.jsonl"
    shutil.copytree(resolve_model("builtin:tiny"), model)
    records = [json.dumps({"prompt": f"question {i}?", "completion": f"answer number {i}."}) for i in range(40)]
    pool.write_text("\n".join(records) + "\n")
    args = ["tracking=none", f"model.name_or_path={model}", "data=file", f"data.train={pool}", "data.eval_size=8",
            "data.max_length=32", "selection=random", "training.max_steps=1"]
    run_dir = tmp_path / "run"
    run_cli(args, run_dir)
    expect = {   # the change -> what the refusal says changed
        "\n".join(records + [records[0]]) + "\n": f"data.train ({pool}): 40 records in the run, 41 now",
        "\n".join(records[:-1] + [records[-1].replace("39.", "3999.")]) + "\n":
            f"data.train ({pool}): {pool.stat().st_size:,} bytes in the run, {pool.stat().st_size + 2:,} now",
        "\n".join(records[:-1] + [records[-1].replace("39.", "93.")]) + "\n":
            f"data.train ({pool}): its content changed since the run started (the same size and record count)",
    }
    original = pool.read_text()
    for text, message in expect.items():
        pool.write_text(text)
        proc = run_cli(args, run_dir, check=False)
        assert proc.returncode == 2 and f"holds a run made with different inputs ({message})" in proc.stderr, \
            proc.stderr[-2000:]
    pool.write_text(original)
    config = (model / "config.json").read_text()
    (model / "config.json").write_text(json.dumps({**json.loads(config), "rms_norm_eps": 1e-5}))
    proc = run_cli(args, run_dir, check=False)
    assert f"different inputs (model ({model}): its content changed since the run started)" in proc.stderr
    (model / "config.json").write_text(config)
    resumed = run_cli(args, run_dir)          # the inputs it was made with again: it resumes (nothing left to do)
    assert "resuming" in resumed.stderr
