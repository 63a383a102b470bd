"""Surviving the cluster: one run per directory, damaged files caught, full disks, unwritable paths and Ctrl-C.

In-process (fast): the lock's rules, arrays/manifest/checkpoints checked against what was recorded when written,
atomic writes that fail leaving nothing. Through the real CLI, one run directory taken through a chain of events:
refused while a live process holds it; its holder SIGKILLed, the lock taken over, then Ctrl-C in the final stage;
a full disk while writing the final checkpoint; the same command resumes and finishes. Then bits flipped in the
finished run's keep mask: refused with the path and the way out, cleaned.parquet left as it was.
Faults are injected by tests/scripts/fault.py (a full disk = ENOSPC from fsync; we run as root, where chmod does
not stop writes, so an unwritable directory is simulated there too).
"""
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from tests.cli import ROOT, TINY, run_cli, stages
from tokenclean import io, rundir
from tokenclean.ragged import Ragged
from tokenclean.rundir import DamagedError, LockedError, RunDir, RunLock

FAULT = ROOT / "tests" / "scripts" / "fault.py"
FAST = [*TINY, "data.limit=60", "data.eval_size=8", "training.max_steps=1", "cache=false"]


def hold_lock(run_dir):
    """Another process holding the run directory's lock, through the API; returns it once it holds the lock."""
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from tokenclean.rundir import RunLock; "
                             "RunLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(run_dir)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def one_line_error(proc, code):
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("tokenclean: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------------ the lock
def test_a_live_holder_is_refused_a_dead_one_taken_over(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(LockedError, match=f"in use by another run \\(pid {holder.pid} on host "
                                              f"{socket.gethostname()}, started "):
            RunLock.acquire(tmp_path)
    finally:
        kill(holder)
    lock = RunLock.acquire(tmp_path)     # SIGKILLed: its pid is gone
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("holder, age, taken", [
    ({"host": "elsewhere", "pid": 1}, 5, False),                      # another host, heartbeat fresh
    ({"host": "elsewhere", "pid": 1}, rundir.LOCK_STALE_S + 60, True),  # another host, no heartbeat for too long
    ("", 5, False),                                                   # being written (empty): judged by its age
    ("", rundir.LOCK_STALE_S + 60, True),
    ({"pid": os.getppid(), "pid_start": rundir._process_start(os.getppid())}, 5, False),   # this host, alive
    ({"pid": os.getppid(), "pid_start": "1"}, 5, True),                 # this host, the pid is another process now
])
def test_when_a_lock_is_stale(tmp_path, holder, age, taken):
    if isinstance(holder, dict):
        holder = json.dumps({"host": socket.gethostname(), "started": "then", **holder})
    (tmp_path / ".lock").write_text(holder)
    os.utime(tmp_path / ".lock", (time.time() - age,) * 2)
    if taken:
        RunLock.acquire(tmp_path).release()
    else:
        with pytest.raises(LockedError, match="in use by another run"):
            RunLock.acquire(tmp_path)
        assert (tmp_path / ".lock").read_text() == holder


# ------------------------------------------------------------------------------------------- damaged files, in-process
def test_a_damaged_array_is_refused_with_its_path(tmp_path):
    r = Ragged.from_list([[1.0, 2.0], [3.0]] * 100, np.float32)
    r.save(tmp_path / "a", {"data_fingerprint": "d"})
    values = tmp_path / "a.values.npy"
    data = bytearray(values.read_bytes())
    data[-5] ^= 0x10
    values.write_bytes(data)
    with pytest.raises(DamagedError, match=f"{values} is damaged \\(its content changed.*resume=false"):
        Ragged.load(tmp_path / "a")
    values.write_bytes(data[:100])
    with pytest.raises(DamagedError, match=f"{values} is damaged \\(100 bytes, {len(data)} when written\\)"):
        Ragged.load(tmp_path / "a")
    (tmp_path / "a.json").write_text('{"files": ')
    with pytest.raises(DamagedError, match="a.json is damaged \\(not valid JSON"):
        Ragged.load(tmp_path / "a")


VERIFY = lambda path: Ragged.verify(path, hashes=False)   # as the pipelines' Job passes it


def open_run(path, accelerator, resume=True, config=None):
    rundir.end_run()     # RunDir keeps this process's lock: a second one here would not take it again
    return RunDir(path, accelerator, config or {"seed": 1}, "data-fp", resume, verify_array=VERIFY)


def test_the_run_directory_is_checked_when_opened(tmp_path, accelerator):
    run = open_run(tmp_path, accelerator)
    with run.stage("select"):
        run.save_array(Ragged.from_list([[True, False]], bool), "keep", {})
    assert stages(tmp_path)["select"]["arrays"] == ["keep"]
    (tmp_path / ".keep.values.npy.tmp999999").write_bytes(b"half")   # left by a killed run
    run = open_run(tmp_path, accelerator)
    assert run.done("select") and not (tmp_path / ".keep.values.npy.tmp999999").exists()

    (tmp_path / "keep.values.npy").unlink()                          # an array of a completed stage deleted
    with pytest.raises(DamagedError, match=f"{tmp_path / 'keep.values.npy'} is missing"):
        open_run(tmp_path, accelerator)

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["stages"]["select"]["seconds"] = 1e9                   # an altered manifest entry
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DamagedError, match="manifest.json is damaged \\(its checksum does not match"):
        open_run(tmp_path, accelerator)
    run = open_run(tmp_path, accelerator, resume=False)             # the way out
    assert run.stages == {} and sorted(p.name for p in tmp_path.iterdir()) == [".lock", "config.yaml",
                                                                                "manifest.json"]
    rundir.end_run()
    assert not (tmp_path / ".lock").exists()


def test_a_failed_write_leaves_nothing_and_names_the_path(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "summary.json"
    io.atomic_write_text(target, "old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        io.atomic_write_text(target, "new")
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(target))
    assert target.read_text() == "old" and [p.name for p in target.parent.iterdir()] == ["summary.json"]


def test_an_unwritable_run_directory_is_one_line(tmp_path):
    """chmod stops a normal user; root writes anyway, so there the refusal is simulated (tests/scripts/fault.py)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o555)
    try:
        simulate = os.access(run_dir, os.W_OK)
        proc = run_cli(FAST, run_dir, script=FAULT if simulate else None,
                       env={"FAULT": f"eacces:{run_dir}/"} if simulate else None, check=False)
    finally:
        run_dir.chmod(0o755)
    line = one_line_error(proc, 1)
    assert line == (f"tokenclean: error: {run_dir / '.lock'}: Permission denied; check its permissions (the run "
                    "directory must be writable: else choose another, hydra.run.dir=...). Then run the same command "
                    "again.")
    assert list(run_dir.iterdir()) == []


# ------------------------------------------------------------------------------------- through the CLI, one directory
@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One run directory through: a live holder (refused), that holder SIGKILLed (taken over) and Ctrl-C in the
    final stage, a full disk writing the final checkpoint, and the same command that resumes and finishes."""
    run_dir = tmp_path_factory.mktemp("chain") / "run"
    out = {}
    holder = hold_lock(run_dir)
    try:
        out["holder"] = holder.pid
        out["refused"] = run_cli(FAST, run_dir, check=False)
        out["lock_while_held"] = (run_dir / ".lock").read_text()
    finally:
        kill(holder)
    out["interrupted"] = run_cli(FAST, run_dir, script=FAULT, env={"FAULT": "interrupt:final"}, check=False)
    out["lock_after_interrupt"] = (run_dir / ".lock").exists()
    out["disk_full"] = run_cli(FAST, run_dir, script=FAULT, env={"FAULT": "enospc:/.final.tmp"}, check=False)
    out["left_after_disk_full"] = sorted(p.name for p in run_dir.rglob("*") if "tmp" in p.name or p.name == "final")
    out["resumed"] = run_cli(FAST, run_dir)
    return run_dir, out


def test_a_second_run_on_a_live_directory_refuses_naming_the_holder(chain):
    run_dir, out = chain
    line = one_line_error(out["refused"], 2)
    assert f"{run_dir} is in use by another run (pid {out['holder']} on host {socket.gethostname()}" in line
    assert json.loads(out["lock_while_held"])["pid"] == out["holder"]     # the refused run left the lock alone


def test_the_lock_is_taken_before_any_data_is_read_or_model_resolved(tmp_path):
    """A pool of 200k records whose last line is malformed: a run that read the pool first would fail on that
    record; this one is refused on the lock alone (the config is validated first, as it must be). The time the
    refusal takes, beside the time reading such a pool takes, is in results/reliability.md."""
    pool = tmp_path / "pool.jsonl"
    line = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    pool.write_text((line + "\n") * 200_000 + "{not json\n")
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        proc = run_cli(["model=tiny", "tracking=none", "data=file", f"data.train={pool}", "data.warmup_fraction=0.2",
                        "cache=false"], run_dir, check=False, env={"PYTHONPROFILEIMPORTTIME": "1"})
    finally:
        kill(holder)
    line = one_line_error(proc, 2)
    assert line.startswith(f"tokenclean: error: {run_dir} is in use by another run (pid {holder.pid} "), line
    log = [ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:")]
    assert not any("data:" in ln or "tokenize" in ln for ln in log)
    # nor torch, transformers or peft imported (seconds of the refusal's time): Python's import log says so
    imported = {ln.rsplit("|", 1)[1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    assert "hydra" in imported and not imported & {"torch", "transformers", "peft"}


def test_a_dead_holders_lock_is_taken_over_and_ctrl_c_says_how_to_resume(chain):
    run_dir, out = chain
    assert f"taking over the lock of a dead run (pid {out['holder']} " in out["interrupted"].stderr
    line = one_line_error(out["interrupted"], 130)
    assert line == (f"tokenclean: interrupted. The run in {run_dir} stopped in stage 'final'; the same command "
                    "resumes it (completed stages kept: base_losses, reference, select).")
    assert not out["lock_after_interrupt"]     # released on the way out


def test_a_full_disk_names_the_checkpoint_and_its_size_and_leaves_nothing(chain):
    run_dir, out = chain
    line = one_line_error(out["disk_full"], 1)
    assert line.startswith(f"tokenclean: error: {run_dir / 'final'}: No space left on device (the checkpoint needs "
                           "about 1 MiB, ")
    assert "free some space there. The run in" in line and "stopped in stage 'final'" in line
    assert out["left_after_disk_full"] == []


def test_the_same_command_then_resumes_and_finishes(chain):
    run_dir, out = chain
    assert "resuming" in out["resumed"].stderr and "completed stages base_losses, reference, select" in \
        out["resumed"].stderr
    assert list(stages(run_dir)) == ["base_losses", "reference", "select", "final"]
    assert (run_dir / "final" / "checksums.json").exists() and not (run_dir / ".lock").exists()


def test_flipped_bits_in_a_finished_runs_mask_are_refused(chain, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(chain[0], run_dir)
    parquet = (run_dir / "cleaned.parquet").read_bytes()
    keep = run_dir / "keep.values.npy"
    data = bytearray(keep.read_bytes())
    data[-3] ^= 0x01
    keep.write_bytes(data)
    line = one_line_error(run_cli(FAST, run_dir, check=False), 2)
    assert line == (f"tokenclean: error: {keep} is damaged (its content changed since it was written); restore it, "
                    "or start the run over with resume=false (which clears the run directory)")
    assert (run_dir / "cleaned.parquet").read_bytes() == parquet


@pytest.mark.parametrize("damage, message", [
    ("reference/model.safetensors", "reference/model.safetensors is missing"),
    ("losses/base.values.npy", "losses/base.values.npy is damaged ("),
])
def test_a_finished_run_with_a_damaged_file_is_refused_when_opened(chain, tmp_path, accelerator, damage, message):
    """The rerun's open, in-process: the config and data fingerprint it would see are the run's own."""
    run_dir = tmp_path / "run"
    shutil.copytree(chain[0], run_dir)
    if damage.endswith(".safetensors"):
        (run_dir / damage).unlink()
    else:
        (run_dir / damage).write_bytes((run_dir / damage).read_bytes()[:-8])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    data_fp = json.loads((run_dir / "manifest.json").read_text())["data_fingerprint"]
    rundir.end_run()
    with pytest.raises(DamagedError, match=re.escape(message)):
        RunDir(run_dir, accelerator, config, data_fp, resume=True, verify_array=VERIFY)
    rundir.end_run()


@pytest.mark.parametrize("env, takes", [({"RANK": "1", "SLURM_PROCID": "0"}, False),   # torchrun's rank wins
                                        ({"SLURM_PROCID": "1"}, False),   # srun, before slurm_to_torch_env
                                        ({"SLURM_PROCID": "0"}, True), ({}, True)])
def test_only_rank_0_takes_the_lock_early(tmp_path, monkeypatch, env, takes):
    from tokenclean.rundir import end_run, lock_early
    for key in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        lock_early(tmp_path / "run")
        assert (tmp_path / "run" / ".lock").exists() == takes
    finally:
        end_run()
    assert not (tmp_path / "run" / ".lock").exists()
