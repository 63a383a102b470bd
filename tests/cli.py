"""Helpers for tests that run the real `tokenclean` command in a subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model=tiny", "tracking=none", "data.limit=240", "data.eval_size=24"]


def run_cli(args, run_dir=None, env=None, script=None, timeout=600, check=True):
    cmd = [sys.executable, str(script)] if script else [sys.executable, "-m", "tokenclean"]
    if run_dir is not None:
        args = [*args, f"hydra.run.dir={run_dir}"]
    full_env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(cmd + list(args), cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def load_array(path):
    from tokenclean.ragged import Ragged
    return Ragged.load(path, mmap=False)


def stages(run_dir):
    return json.loads((Path(run_dir) / "manifest.json").read_text())["stages"]


def weights(model_dir):
    from safetensors.numpy import load_file
    return load_file(str(Path(model_dir) / "model.safetensors"))


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def killed_then_resumed(args, run_dir, kill_at: str = "train:final:3", resumes_after: int = 2) -> None:
    """The CLI run killed (SIGKILL) at `kill_at` (tests/scripts/kill_run.py), then run again: it resumes from the
    state saved after step `resumes_after` (args save every 2 steps) and finishes."""
    killed = run_cli(args, run_dir, script=ROOT / "tests/scripts/kill_run.py", env={"KILL_AT": kill_at}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    stage = kill_at.split(":")[1]
    assert f"resuming {stage} after step {resumes_after}" in run_cli(args, run_dir).stderr
