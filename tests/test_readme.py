"""The README's "Train with your own trainer" example runs as written (its shell block, then its Python block, in a
fresh directory)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.cli import ROOT


def section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_train_with_your_own_trainer_runs_as_written(tmp_path):
    body = section("Train with your own trainer")
    (shell,), (python,) = re.findall(r"```bash\n(.*?)```", body, re.S), re.findall(r"```python\n(.*?)```", body, re.S)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    for line in shell.splitlines():
        command = line.split("#")[0].strip().replace("python ", f"{sys.executable} ", 1)
        p = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, (command, p.stderr[-3000:])
    p = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "runs" / "trl" / "final" / "model.safetensors").is_file()
    assert "'train_loss'" in p.stdout or "train_loss" in p.stdout
