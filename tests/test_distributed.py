"""Real multi-process runs: 2 processes over gloo on this CPU, started with the real CLI
(`accelerate launch --config_file launch/<config>.yaml -m tokenclean ...`), each checked against the same run on one
process: identical keep masks every round, the same weights after every round, the same held-out losses.

The job is a whole self-evolving run (3 rounds) of the tiny model on a pool of 109 chatterbot examples
(data.limit=200 less 64 held out and a 27-example warm-up split), with training.micro_batch_size=2 (gradient
accumulation; in the uneven last step of a round one rank gets an empty micro-batch) and training.loss_chunk_size=64
(several LM-head chunks per forward, unevenly many on the two ranks).

Tolerance. Everything is fp32 on CPU. Two processes compute the same sums in another order (per-rank partial sums,
then an all-reduce), so the weights differ by rounding, which AdamW amplifies only for weights whose gradient is
near zero (it divides by |g|). Measured over 3 rounds: per-tensor relative Frobenius difference <= 1e-5, largest
element difference <= 4e-5 (lr 2e-3). We allow 1e-4 relative and 1e-3 absolute (half of one AdamW step): a real bug
(a dropped or repeated micro-batch, a wrong loss normalisation, an extra optimiser step) moves weights by O(lr);
DeepSpeed stepping on every micro-batch, for instance, gave 0.17 relative and 1.4e-2 absolute. Keep masks must be
equal exactly (the scores differ by <= 5e-6 and no two scores sit that close to the threshold in this data).

Timing on 2 busy cores: see results/distributed.md. The first DeepSpeed start on a new machine compiles its shm
comm op (~40 s, cached in ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.common import ACCELERATE, free_port, launch_command, launch_environment

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
ROUNDS = 3
JOB = ["model=tiny", "tracking=none", "pipeline=self_evolving", f"pipeline.chunks={ROUNDS}", "data.limit=200",
       "training.micro_batch_size=2", "training.loss_chunk_size=64"]
RTOL_FRO, ATOL_MAX = 1e-4, 1e-3


@pytest.fixture(scope="session")
def dist_env(tmp_path_factory):
    """Environment for the launched processes: the tiny model built once per session into a private cache."""
    cache = tmp_path_factory.mktemp("tokenclean-cache")
    env = launch_environment(cache)     # no launcher variables inherited; a hang fails in 2 min
    subprocess.run([sys.executable, "-c", "from tokenclean.assets import resolve_model; resolve_model('builtin:tiny')"],
                   env=env, check=True, timeout=300, cwd=ROOT)
    assert (cache / "tiny-llama-v1" / "model.safetensors").is_file()
    return env


def launch(env, cwd: Path, args: list[str], config: str | None = None, launcher_args=(), script=None,
           timeout: int = 600, extra_env=None):
    """`accelerate launch [--config_file launch/<config>] [launcher_args] -m tokenclean <args>`; returns
    (returncode, output, seconds)."""
    cmd = launch_command(config, launcher_args, script)
    t0 = time.perf_counter()
    p = subprocess.run(cmd + args, cwd=cwd, env={**env, **(extra_env or {})}, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return p.returncode, p.stdout, time.perf_counter() - t0


def run_ok(env, cwd, args, **kw) -> float:
    rc, out, seconds = launch(env, cwd, args, **kw)
    assert rc == 0, f"exit {rc}:\n{_tail(out)}"
    return seconds


def _tail(out: str, n: int = 60) -> str:
    lines = [ln for ln in out.splitlines() if "it/s]" not in ln and "step/s" not in ln and "batch/s" not in ln]
    return "\n".join(lines[-n:])


def _weights(run: Path, t: int) -> dict:
    from safetensors.torch import load_file
    return load_file(run / f"round_{t}" / "model" / "model.safetensors")


def assert_same_update(one: Path, two: Path) -> None:
    """The final models of the runs at `one` (1 process) and `two` (N processes) are equal within the tolerance
    above (the same sums taken in another order)."""
    from safetensors.torch import load_file
    a, b = (load_file(d / "final" / "model.safetensors") for d in (one, two))
    assert a.keys() == b.keys()
    for k in a:
        diff = (b[k] - a[k]).abs()
        assert diff.norm() <= RTOL_FRO * a[k].norm(), (k, (diff.norm() / a[k].norm()).item())
        assert diff.max() <= ATOL_MAX, (k, diff.max().item())


def assert_same_run(ref: Path, run: Path) -> None:
    """The run at `run` (N processes) equals the one at `ref` (1 process)."""
    s_ref, s_run = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    assert len(s_run["rounds"]) == ROUNDS
    for r_ref, r_run in zip(s_ref["rounds"], s_run["rounds"]):
        assert (r_run["tokens_target"], r_run["tokens_kept"]) == (r_ref["tokens_target"], r_ref["tokens_kept"])
        assert r_run["eval_loss"] == pytest.approx(r_ref["eval_loss"], rel=1e-5)
    assert s_run["eval_loss_before"] == pytest.approx(s_ref["eval_loss_before"], rel=1e-5)
    for t in range(1, ROUNDS):
        keep_ref = np.load(ref / f"round_{t}" / "keep.values.npy")
        keep_run = np.load(run / f"round_{t}" / "keep.values.npy")
        target = np.load(ref / f"round_{t}" / "base_losses.values.npy")
        assert 0 < keep_ref.sum() < np.count_nonzero(~np.isnan(target))   # the round really dropped tokens
        np.testing.assert_array_equal(keep_run, keep_ref, err_msg=f"round {t} keep mask")
        np.testing.assert_allclose(np.load(run / f"round_{t}" / "scores.values.npy"),
                                   np.load(ref / f"round_{t}" / "scores.values.npy"), atol=1e-4, rtol=0)
    for t in range(ROUNDS):
        w_ref, w_run = _weights(ref, t), _weights(run, t)
        assert w_run.keys() == w_ref.keys()
        for k in w_ref:
            diff = (w_run[k] - w_ref[k]).abs()
            assert diff.norm() <= RTOL_FRO * w_ref[k].norm(), (t, k, (diff.norm() / w_ref[k].norm()).item())
            assert diff.max() <= ATOL_MAX, (t, k, diff.max().item())
    # every stage done once, the final link in place; no temporary directory left behind by any rank
    m_ref, m_run = (json.loads((d / "manifest.json").read_text()) for d in (ref, run))
    assert m_run["stages"].keys() == m_ref["stages"].keys()
    assert (run / "final").resolve() == (run / f"round_{ROUNDS - 1}" / "model").resolve()
    assert not list(run.rglob("*.tmp*"))
    # metrics.jsonl is rank 0's alone: one eval record per round (two ranks writing would double them)
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in r]
    assert sorted(r.get("stage") for r in evals) == sorted(["base"] + [f"round_{t}" for t in range(ROUNDS)])


@pytest.fixture(scope="module")
def reference(dist_env, tmp_path_factory):
    """The job on one process (accelerate launch with launch/single.yaml)."""
    cwd = tmp_path_factory.mktemp("one")
    seconds = run_ok(dist_env, cwd, [*JOB, f"hydra.run.dir={cwd / 'run'}"], config="single.yaml")
    print(f"\n1 process: {seconds:.1f} s")
    return cwd / "run"


def test_ddp_two_processes_equal_one(dist_env, reference, tmp_path):
    # no hydra.run.dir: both ranks must agree on the default runs/<name> under the working directory
    seconds = run_ok(dist_env, tmp_path, [*JOB, "name=ddp2"], config="ddp.yaml", launcher_args=["--num_processes", "2"])
    print(f"\nDDP 2 processes: {seconds:.1f} s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]            # no outputs/, multirun/, wandb/
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp2"]
    run = tmp_path / "runs" / "ddp2"
    assert (run / "config.yaml").is_file()
    assert_same_run(reference, run)


@pytest.mark.slow   # ZeRO-3 and DDP below run by default; ZeRO-2 adds 60 s
def test_zero2_two_processes_equal_one(dist_env, reference, tmp_path):
    seconds = run_ok(dist_env, tmp_path, [*JOB, f"hydra.run.dir={tmp_path / 'run'}"], config="zero2.yaml",
                     launcher_args=["--num_processes", "2"])
    print(f"\nZeRO-2 2 processes: {seconds:.1f} s")
    assert_same_run(reference, tmp_path / "run")


def test_zero3_two_processes_equal_one_and_checkpoints_reload(dist_env, reference, tmp_path):
    # launch/deepspeed/zero3.json fills the persistence threshold with 10 x hidden_size = 640 elements, so every
    # weight matrix of the tiny model is really sharded (with accelerate's yaml default of 1e5 none would be)
    seconds = run_ok(dist_env, tmp_path, [*JOB, f"hydra.run.dir={tmp_path / 'run'}"], config="zero3_json.yaml",
                     launcher_args=["--num_processes", "2",
                                    "--deepspeed_config_file", str(LAUNCH / "deepspeed" / "zero3.json")])
    print(f"\nZeRO-3 2 processes: {seconds:.1f} s")
    run = tmp_path / "run"
    assert_same_run(reference, run)

    # the checkpoints ZeRO-3 wrote are whole, plain HF models
    from transformers import AutoModelForCausalLM
    for t in range(ROUNDS):
        f = run / f"round_{t}" / "model" / "model.safetensors"
        assert f.stat().st_size >= 0.99 * (reference / f"round_{t}" / "model" / "model.safetensors").stat().st_size
    got, info = AutoModelForCausalLM.from_pretrained(run / "final", output_loading_info=True)
    want = AutoModelForCausalLM.from_pretrained(reference / "final")
    assert not any(info.values()), info                     # no missing, unexpected or mismatched tensors
    sd_got, sd_want = got.state_dict(), want.state_dict()
    assert sd_got.keys() == sd_want.keys()
    for k, w in sd_want.items():
        assert sd_got[k].shape == w.shape and w.numel() > 0
        assert (sd_got[k] - w).norm() <= RTOL_FRO * w.norm(), k
    # and computes the same losses
    ids = torch.tensor([[1, 5, 17, 42, 99, 300, 7, 2]])
    torch.testing.assert_close(got(ids).logits, want(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scorer", [pytest.param("entropy", marks=pytest.mark.slow), "self_online"])
def test_soft_weights_ddp_two_processes_equal_one(dist_env, tmp_path, scorer):
    """selection=soft: training minimises sum(w l) / sum(w) over the whole step, all ranks and micro-batches, so 2
    processes x 2 micro-batches make the same update as 1 process (entropy: weights fixed before training; the
    online self_online: each step's weights from a pre-pass whose losses the ranks add up)."""
    job = ["model=tiny", "tracking=none", "data.limit=120", "data.eval_size=16", "training.micro_batch_size=2",
           "selection=soft", f"scorer={scorer}"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_ok(dist_env, tmp_path, [*job, f"hydra.run.dir={one}"], config="single.yaml")
    run_ok(dist_env, tmp_path, [*job, f"hydra.run.dir={two}"], config="ddp.yaml",
           launcher_args=["--num_processes", "2"])
    w_one, w_two = (np.load(d / "keep.values.npy") for d in (one, two))
    assert w_one.dtype == np.float32 and 0 < w_one.sum() < np.count_nonzero(w_one)   # real fractional weights
    # online scores are rounded to 2^-16 nats (scorers/online.py), so a score whose two runs' losses straddle a
    # rounding boundary moves by one step, its weight by <= 2^-16 / (4 temperature sigma) ~ 2e-5 here; a real bug
    # (a step's weights from another step's losses, the first step's noise ranked) moves weights by 1e-2 to 0.5
    np.testing.assert_allclose(w_two, w_one, rtol=0, atol=1e-4)
    assert_same_update(one, two)
    s_one, s_two = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s_two["weight_sum"] == pytest.approx(s_one["weight_sum"], rel=1e-5)
    assert s_two["eval_loss_after"] == pytest.approx(s_one["eval_loss_after"], rel=1e-5)


def test_score_only_two_processes_equal_one(dist_env, tmp_path):
    """pipeline.train_final=false: the reference (trained on both ranks), then scoring with each rank scoring its
    share of the pool and selection: the same scores, keep mask and cleaned.parquet as one process, no final/."""
    import pyarrow.parquet as pq
    job = ["model=tiny", "tracking=none", "data.limit=120", "data.eval_size=16", "training.micro_batch_size=2",
           "pipeline.train_final=false", "cache=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_ok(dist_env, tmp_path, [*job, f"hydra.run.dir={one}"], config="single.yaml")
    run_ok(dist_env, tmp_path, [*job, f"hydra.run.dir={two}"], config="ddp.yaml",
           launcher_args=["--num_processes", "2"])
    keep_one, keep_two = (np.load(d / "keep.values.npy") for d in (one, two))
    assert 0 < keep_one.sum() < len(keep_one)
    np.testing.assert_array_equal(keep_two, keep_one)
    np.testing.assert_allclose(np.load(two / "scores.values.npy"), np.load(one / "scores.values.npy"),
                               atol=1e-4, rtol=0)
    assert pq.read_table(two / "cleaned.parquet").equals(pq.read_table(one / "cleaned.parquet"))
    assert not (one / "final").exists() and not (two / "final").exists()
    assert json.loads((two / "summary.json").read_text())["final_trained"] is False


# ----------------------------------------------------------------------------------------------------------- failure
FAIL_SCRIPT = str(ROOT / "tests" / "dist" / "fail_rank.py")


def test_a_failing_rank_fails_the_whole_run_at_once(dist_env, tmp_path):
    """Rank 1 raises as it starts round 1 while rank 0 trains: the launcher must exit non-zero with rank 1's error,
    long before the collective timeout (set to 600 s here, so that it cannot be what ended the run)."""
    rc, out, seconds = launch(dist_env, tmp_path, ["raise", "round_1", *JOB, f"hydra.run.dir={tmp_path / 'run'}"],
                              launcher_args=["--multi_gpu", "--num_processes", "2"], script=FAIL_SCRIPT,
                              timeout=240, extra_env={"TOKENCLEAN_TIMEOUT": "600"})
    print(f"\nfailing rank: exit {rc} after {seconds:.1f} s")
    assert rc != 0
    assert "RuntimeError: injected failure on rank 1 at round_1" in out, _tail(out)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert "round_0" in manifest["stages"] and "round_1" not in manifest["stages"]
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow   # waits out a timeout; a failing rank (below) runs by default
def test_a_stalled_rank_fails_the_run_after_tokenclean_timeout(dist_env, tmp_path):
    """Rank 1 stops answering (sleeps) as round 0's training starts: rank 0 waits in a collective for
    TOKENCLEAN_TIMEOUT seconds, then fails with a timeout error, and the launcher takes rank 1 down with it."""
    rc, out, seconds = launch(dist_env, tmp_path, ["stall", "round_0", *JOB, f"hydra.run.dir={tmp_path / 'run'}"],
                              launcher_args=["--multi_gpu", "--num_processes", "2"], script=FAIL_SCRIPT,
                              timeout=240, extra_env={"TOKENCLEAN_TIMEOUT": "15"})
    print(f"\nstalled rank: exit {rc} after {seconds:.1f} s")
    assert rc != 0
    assert "rank 1: injected stall at round_0" in out
    assert re.search(r"Timed out waiting 15000ms", out), _tail(out)
    assert not (tmp_path / "run" / "summary.json").exists()


# ------------------------------------------------------------------------------------------- slow: other launch files
@pytest.mark.slow
def test_slurm_script_two_nodes_multinode_yaml(dist_env, reference, tmp_path):
    """launch/slurm.sh with launch/multinode.yaml (ZeRO-3, accelerate's yaml fields), as SLURM would run it on 2 nodes
    of 1 process each: stand-ins for srun/scontrol start both "nodes" on this machine, each with its own
    SLURM_NODEID, so the two accelerate launchers meet through the real multi-machine rendezvous."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(
        "#!/bin/bash\nwhile [[ \"$1\" == --* ]]; do shift; done\npids=()\n"
        "for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i \"$@\" & pids+=($!); done\n"
        "rc=0; for p in \"${pids[@]}\"; do wait \"$p\" || rc=$?; done; exit $rc\n")
    (fake / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {**dist_env, "PATH": f"{fake}:{dist_env['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]",
           "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(tmp_path), "GPUS_PER_NODE": "1",
           "MAIN_PORT": str(free_port()), "ACCELERATE": ACCELERATE,
           "ACCELERATE_CONFIG": str(LAUNCH / "multinode.yaml")}
    t0 = time.perf_counter()
    p = subprocess.run(["bash", str(LAUNCH / "slurm.sh"), *JOB, "name=slurm"], cwd=tmp_path, env=env, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    print(f"\nslurm.sh, 2 nodes x 1 process, ZeRO-3: {time.perf_counter() - t0:.1f} s")
    assert p.returncode == 0, _tail(p.stdout)
    assert "2 nodes x 1 processes" in p.stdout
    assert_same_run(reference, tmp_path / "runs" / "slurm")


@pytest.mark.slow
def test_zero3_offload_two_processes_equal_one(dist_env, reference, tmp_path):
    """launch/zero3_offload.yaml: accelerate swaps our AdamW for DeepSpeed's CPU Adam (compiled on first use, 1-3
    min, cached); the learning-rate schedule still drives it (they share the parameter groups)."""
    seconds = run_ok(dist_env, tmp_path, [*JOB, f"hydra.run.dir={tmp_path / 'run'}"], config="zero3_offload.yaml",
                     launcher_args=["--num_processes", "2"])
    print(f"\nZeRO-3 offload 2 processes: {seconds:.1f} s")
    assert_same_run(reference, tmp_path / "run")


@pytest.mark.slow
def test_lora_under_zero3_yaml_equals_one_process(dist_env, tmp_path):
    """LoRA with launch/zero3.yaml: every round's checkpoint merges the adapter on a whole copy of the model built on
    rank 0 alone (outside zero.Init). LoRA dropout is 0: dropout masks come from each rank's own random stream, so
    with dropout the runs differ by design, not by a bug."""
    job = [*JOB, "model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0"]
    one = run_ok(dist_env, tmp_path, [*job, f"hydra.run.dir={tmp_path / 'one'}"], config="single.yaml")
    two = run_ok(dist_env, tmp_path, [*job, f"hydra.run.dir={tmp_path / 'two'}"], config="zero3.yaml",
                 launcher_args=["--num_processes", "2"])
    print(f"\nLoRA: 1 process {one:.1f} s, ZeRO-3 2 processes {two:.1f} s")
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert not [k for k in _weights(tmp_path / "two", ROUNDS - 1) if "lora" in k]   # merged: a plain model
