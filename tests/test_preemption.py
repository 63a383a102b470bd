"""Resuming inside a training stage, and stopping on SIGTERM/SIGINT.

In-process (fast): train.fit interrupted at random steps (an exception, as a crash; a real SIGTERM) and resumed
from its saved state reaches bitwise the weights, and online decisions, of an uninterrupted run, with dropout on.
Through the CLI: SIGKILL at random optimiser steps of the fixed pipeline's final stage and of a self-evolving round
with an online scorer, and a real SIGTERM: exit code 75, one line saying where it stopped, a rerun that resumes.
The kill points are drawn at random each session: a failing assertion names its point and the session's KILL_SEED;
KILL_SEED=<n> pytest ... replays the same draws.
"""
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests import test_distributed as dist
from tests.cli import ROOT, TINY, load_array, run_cli, same_weights, stages
from tests.conftest import random_examples
from tokenclean.config import TrainingConfig
from tokenclean.train import PREEMPTED_EXIT, Checkpoints, Preempted, StopSignals, fit, prepare

KILL = ROOT / "tests" / "scripts" / "kill_run.py"
dist_env, reference = dist.dist_env, dist.reference   # test_distributed's fixtures, for the slow tests
SEED = int(os.environ.get("KILL_SEED", time.time_ns() % 100_000))


@pytest.fixture
def draw(request):
    """This test's random kill points: the same for a given KILL_SEED whatever else runs."""
    return random.Random(f"{SEED}:{request.node.name}")


# ------------------------------------------------------------------------------------------------ train.fit in-process
N_STEPS, EVERY = 7, 2


class Crash(Exception):
    pass


def with_dropout(lm, p=0.2):
    """The tiny Llama with attention dropout: a resumed run matches only if the random streams are restored."""
    for m in lm.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = p
    return lm


def selector(tgt, scope="step"):
    from tokenclean.scorers.online import OnlineSelector
    cached = tgt.like(np.random.default_rng(0).random(len(tgt.values)).astype(np.float32))
    return OnlineSelector(lambda c, cur: c - cur, cached, tgt, "global", 0.5, scope=scope)


def train_once(tiny_lm, accelerator, state_dir=None, on_step=None, online=False, micro=4):
    """Up to N_STEPS steps of a fresh tiny model with dropout (same seed every call): (model, selector)."""
    ids, tgt = random_examples(4 * N_STEPS, seed=5)
    cfg = TrainingConfig(lr=1e-2, batch_size=4, micro_batch_size=micro, warmup_ratio=0.2,
                         mixed_precision="no")
    lm = with_dropout(tiny_lm(seed=1))
    p = prepare(accelerator, lm, len(ids), cfg, seed=3)
    sel = selector(tgt) if online else None
    ck = Checkpoints(state_dir, every=EVERY, keep=2) if state_dir else None
    fit(accelerator, p, ids, tgt, cfg, pad_id=0, on_step=on_step, online=sel, checkpoints=ck)
    return lm, sel


def assert_same(a, b, sel_a, sel_b, why):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), (name, why)
    if sel_a is not None:
        for k in ("scores", "keep", "kept_times"):
            np.testing.assert_array_equal(getattr(sel_a, k), getattr(sel_b, k), err_msg=f"{k}: {why}")
        assert (sel_a.trained, sel_a.prepasses) == (sel_b.trained, sel_b.prepasses), why


def at_step(n, action):
    def on_step(i, metrics):
        if i + 1 == n:
            action()
    return on_step


def crash():
    raise Crash


class CrashOnPublish:
    """train's `os`, except that publishing the state of step n crashes, as a kill in the middle of saving would."""

    def __init__(self, n):
        self.n = n

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, src, dst):
        if str(dst).endswith(f"/step_{self.n:06d}"):
            raise Crash
        return os.replace(src, dst)


@pytest.mark.parametrize("online, micro, when", [(False, 4, "after step"), (True, 4, "after step"),
                                                 (True, 2, "after step"), (True, 2, "while saving")],
                         ids=["plain", "online", "prepass", "prepass-mid-save"])
def test_fit_resumes_after_a_crash_with_the_same_weights(tiny_lm, accelerator, tmp_path, monkeypatch, online,
                                                         micro, when, draw):
    ref, ref_sel = train_once(tiny_lm, accelerator, online=online, micro=micro)    # never saves, never resumes
    if when == "after step":
        kill = draw.randint(EVERY + 1, N_STEPS)
        last = (kill - 1) // EVERY * EVERY   # the crash comes before that step's own save
        with pytest.raises(Crash):
            train_once(tiny_lm, accelerator, tmp_path, at_step(kill, crash), online=online, micro=micro)
    else:
        kill = draw.randrange(EVERY, N_STEPS + 1, EVERY)
        last = kill - EVERY
        with monkeypatch.context() as m, pytest.raises(Crash):
            m.setattr("tokenclean.train.os", CrashOnPublish(kill))
            train_once(tiny_lm, accelerator, tmp_path, online=online, micro=micro)
        assert (tmp_path / f".step_{kill:06d}.tmp" / "trainer.json").is_file()   # written, never published
    saved = sorted(p.name for p in tmp_path.glob("step_*"))
    assert saved == [f"step_{s:06d}" for s in range(EVERY, last + 1, EVERY)][-2:], (kill, SEED, saved)
    steps_run = []
    resumed, sel = train_once(tiny_lm, accelerator, tmp_path, lambda i, m: steps_run.append(i), online=online,
                              micro=micro)
    assert steps_run == list(range(last, N_STEPS)), (kill, SEED)           # it resumed, it did not start over
    assert_same(ref, resumed, ref_sel, sel, f"crashed {when} {kill}, KILL_SEED={SEED}")
    assert not list(tmp_path.glob(".*"))                                   # a stale temporary is replaced


def test_a_resume_that_forgets_the_random_streams_differs(tiny_lm, accelerator, tmp_path, monkeypatch):
    """The check above can fail: with dropout, restoring all but the random streams ends elsewhere."""
    ref, _ = train_once(tiny_lm, accelerator)
    with pytest.raises(Crash):
        train_once(tiny_lm, accelerator, tmp_path, at_step(EVERY + 1, crash))
    monkeypatch.setattr("tokenclean.train.set_rng_state", lambda state: None)
    resumed, _ = train_once(tiny_lm, accelerator, tmp_path)
    assert not all(torch.equal(x, y) for x, y in zip(ref.parameters(), resumed.parameters()))


def test_sigterm_stops_at_the_step_boundary_saves_and_resumes(tiny_lm, accelerator, tmp_path, capfd, draw):
    ref, ref_sel = train_once(tiny_lm, accelerator, online=True)
    stop = draw.randint(1, N_STEPS - 1)   # the last boundary too: a resume then has no step left
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as e:
        train_once(tiny_lm, accelerator, tmp_path, at_step(stop, lambda: os.kill(os.getpid(), signal.SIGTERM)),
                   online=True)
    assert e.value.code == PREEMPTED_EXIT == 75
    assert signal.getsignal(signal.SIGTERM) is before                       # the handler is put back
    err = capfd.readouterr().err
    # sent from on_step, after this step's all-reduce read the flag: the ranks agree to stop after the next step
    assert f"stopped by SIGTERM after step {stop + 1} of {N_STEPS} of train" in err, err
    assert "Run the same command again to resume" in err
    assert (tmp_path / f"step_{stop + 1:06d}").is_dir()                      # saved at the boundary, off schedule
    assert len(list(tmp_path.iterdir())) <= 2 and not list(tmp_path.glob(".*"))   # keep=2, no temporary left
    resumed, sel = train_once(tiny_lm, accelerator, tmp_path, online=True)
    assert_same(ref, resumed, ref_sel, sel, f"stopped after step {stop + 1}, KILL_SEED={SEED}")


def test_second_sigint_interrupts_at_once():
    before = signal.getsignal(signal.SIGINT)   # default_int_handler; SIG_IGN in a shell's background job
    with StopSignals(verbose=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        os.kill(os.getpid(), signal.SIGTERM)                                  # ignored: a stop is on its way
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        stop.received = None                                                  # else re-delivered on exit
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------------------------------------------ the CLI, end to end
FIXED = [*TINY, "data.limit=120", "selection=random", "training.batch_size=4", "training.micro_batch_size=4",
         "training.save_every=2"]
SELF_ONLINE = [*TINY, "data.limit=120", "pipeline=self_evolving", "pipeline.chunks=2", "scorer=self_online",
               "training.batch_size=4", "training.micro_batch_size=4", "training.save_every=2",
               "training.keep_checkpoints=1"]


def n_steps(run_dir, stage):
    return stages(run_dir)[stage]["steps"]


def resumed_at(stderr, stage):
    m = re.search(rf"resuming {stage} after step (\d+) of (\d+)", stderr)
    return int(m.group(1)) if m else 0


@pytest.fixture(scope="module")
def fixed_ref(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fixed") / "run"
    run_cli(FIXED, run_dir)
    assert not list(run_dir.glob("*.state"))                                  # removed once training is done
    return run_dir


def test_fixed_final_stage_resumes_after_sigkill(tmp_path, fixed_ref, draw):
    n = n_steps(fixed_ref, "final")
    kill = draw.randint(3, n)
    run_dir = tmp_path / "run"
    killed = run_cli(FIXED, run_dir, script=KILL, env={"KILL_AT": f"train:final:{kill}"}, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "final" not in stages(run_dir)
    resumed = run_cli(FIXED, run_dir)
    assert resumed_at(resumed.stderr, "final") == (kill - 1) // 2 * 2, (kill, SEED, resumed.stderr[-3000:])
    np.testing.assert_array_equal(load_array(run_dir / "keep").values, load_array(fixed_ref / "keep").values)
    assert same_weights(run_dir / "final", fixed_ref / "final"), f"killed after step {kill}, KILL_SEED={SEED}"
    assert n_steps(run_dir, "final") == n and not list(run_dir.glob("*.state"))


def test_sigterm_exits_75_and_the_rerun_resumes(tmp_path, fixed_ref, draw):
    """A real SIGTERM to the CLI, sent once training has saved a state (polled on disk): exit 75 and one line.
    The run pauses 0.2 s after each step of the final stage (KILL_AT=slow), so the signal lands mid-training."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "KILL_AT": "slow:final:0.2"}
    proc = subprocess.Popen([sys.executable, str(KILL), *FIXED, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not list(run_dir.glob("final.state/step_*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(draw.random() / 2)                                             # anywhere in a step
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    lines = [ln for ln in err.splitlines() if "tokenclean: stopped by SIGTERM after step" in ln]
    assert len(lines) == 1 and "Run the same command again to resume" in lines[0], err[-3000:]
    assert "Traceback" not in err and "final" not in stages(run_dir)
    stopped = int(lines[0].split("after step ")[1].split()[0])
    assert (run_dir / "final.state" / f"step_{stopped:06d}").is_dir()
    resumed = run_cli(FIXED, run_dir)
    assert resumed_at(resumed.stderr, "final") == stopped
    assert same_weights(run_dir / "final", fixed_ref / "final"), f"stopped after step {stopped}"


@pytest.fixture(scope="module")
def online_ref(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("online") / "run"
    run_cli(SELF_ONLINE, run_dir)
    return run_dir


def test_self_evolving_online_round_resumes_after_sigkill(tmp_path, online_ref, draw):
    stage = "round_1"                                                         # chosen online while it trains
    n = n_steps(online_ref, stage)
    kill = draw.randint(3, n)
    run_dir = tmp_path / "run"
    killed = run_cli(SELF_ONLINE, run_dir, script=KILL, env={"KILL_AT": f"train:{stage}:{kill}"}, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert stage not in stages(run_dir)
    resumed = run_cli(SELF_ONLINE, run_dir)
    why = f"killed after step {kill} of {stage}, KILL_SEED={SEED}"
    assert resumed_at(resumed.stderr, stage) == (kill - 1) // 2 * 2, (why, resumed.stderr[-3000:])
    for name in ("keep", "scores"):
        np.testing.assert_array_equal(load_array(run_dir / f"round_1/{name}").values,
                                      load_array(online_ref / f"round_1/{name}").values, err_msg=why)
    assert same_weights(run_dir / "round_1/model", online_ref / "round_1/model"), why
    assert stages(run_dir)[stage]["online_kept_total"] == stages(online_ref)[stage]["online_kept_total"], why
    assert not list(run_dir.rglob("*.state")) and not list(run_dir.rglob("*.tmp*"))

# ------------------------------------------------------------------------------------- slow: several processes, SLURM
@pytest.mark.slow
def test_zero3_two_processes_resume_after_sigkill(dist_env, reference, tmp_path, draw):
    """ZeRO-3 on 2 processes (weights really sharded), both ranks SIGKILLed mid-round: the rerun resumes from the
    DeepSpeed state and ends where one uninterrupted process does (test_distributed's tolerance)."""
    run, kill = tmp_path / "run", draw.randint(3, stages(reference)["round_1"]["steps"])
    args = [*dist.JOB, "training.save_every=2", f"hydra.run.dir={run}"]
    zero3 = dict(config="zero3_json.yaml", launcher_args=["--num_processes", "2", "--deepspeed_config_file",
                                                          str(dist.LAUNCH / "deepspeed" / "zero3.json")])
    rc, out, _ = dist.launch(dist_env, tmp_path, args, script=str(KILL),
                             extra_env={"KILL_AT": f"train:round_1:{kill}"}, **zero3)
    assert rc != 0 and "round_1" not in stages(run), out[-3000:]
    assert list((run / "round_1.state").glob("step_*/deepspeed"))
    rc, out, seconds = dist.launch(dist_env, tmp_path, args, **zero3)
    print(f"\nZeRO-3 resumed after step {kill} of round_1: {seconds:.1f} s")
    assert rc == 0, out[-3000:]
    assert resumed_at(out, "round_1") == (kill - 1) // 2 * 2, out[-3000:]
    dist.assert_same_run(reference, run)


def fake_slurm(tmp_path, dist_env):
    """srun/scancel/scontrol stand-ins: srun runs its command here as the job step (its own process group),
    scancel --signal sends the signal to that whole group as slurmstepd would, scontrol records a requeue."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "srun").write_text(f"#!/bin/bash\nwhile [[ \"$1\" == --* ]]; do shift; done\necho $$ > {fake}/step\n"
                               "SLURM_NODEID=0 exec setsid \"$@\"\n")
    (fake / "scancel").write_text(f"#!/bin/bash\nkill -${{1#--signal=}} -- -$(cat {fake}/step)\n")
    (fake / "scontrol").write_text(f"#!/bin/bash\nif [[ $1 == requeue ]]; then echo \"$@\" >> {fake}/requeued; "
                                   "else echo 127.0.0.1; fi\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    return fake, {**dist_env, "PATH": f"{fake}:{dist_env['PATH']}", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1",
                  "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(tmp_path), "GPUS_PER_NODE": "2",
                  "MAIN_PORT": str(dist._free_port()), "ACCELERATE": dist.ACCELERATE,
                  "ACCELERATE_CONFIG": str(dist.LAUNCH / "ddp.yaml"), "STOP_GRACE": "300"}


@pytest.mark.slow
def test_slurm_time_limit_stops_requeues_and_resumes(dist_env, fixed_ref, tmp_path, draw):
    """launch/slurm.sh with DDP on 2 processes: SLURM's USR1 to the batch shell -> SIGTERM to every process of the
    step (torchrun included) -> the ranks stop together and save -> the shell requeues; the requeued job resumes
    and ends where one uninterrupted process does."""
    fake, env = fake_slurm(tmp_path, dist_env)
    cmd = ["bash", str(dist.LAUNCH / "slurm.sh"), *FIXED, "name=slurm"]
    run = tmp_path / "runs" / "slurm"
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not list(run.glob("final.state/step_*")) and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)
    out = job.communicate(timeout=600)[0]
    assert job.returncode != 0, out[-3000:]
    assert "tokenclean: stopped by SIGTERM after step" in out and "Traceback (most recent call last)" not in \
        out.split("tokenclean: stopped by")[0], out[-3000:]
    assert (fake / "requeued").read_text().split() == ["requeue", "7"], out[-3000:]
    assert "final" not in stages(run) and list(run.glob("final.state/step_*"))
    stopped = int(out.split("stopped by SIGTERM after step ")[1].split()[0])
    p = subprocess.run(cmd, cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": "1"}, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:]
    assert resumed_at(p.stdout, "final") == stopped
    assert len((fake / "requeued").read_text().splitlines()) == 1          # finished: not requeued again
    from safetensors.torch import load_file
    got, want = (load_file(d / "final" / "model.safetensors") for d in (run, fixed_ref))
    for k, w in want.items():
        assert (got[k] - w).norm() <= dist.RTOL_FRO * w.norm() and (got[k] - w).abs().max() <= dist.ATOL_MAX, k
