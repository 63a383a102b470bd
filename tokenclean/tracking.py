"""Metrics to `metrics.jsonl` in the run directory (always) and to wandb (tracking.backend=wandb), rank 0 only.

One wandb run per pipeline run, in a group per experiment (a sweep's points share it), resumed with the same id
after a crash. Two x-axes: `train/step` (optimiser steps counted across all stages and rounds, so the curves of
successive rounds follow each other instead of overlapping) and `round` for the per-round metrics (`round/*`),
which is the chart that shows whether rounds help. Offline unless an API key is set: no network is needed.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, run_dir: Path, cfg, config_dict: dict, run_id: str, enabled: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.wandb = None
        if not enabled or cfg.tracking.backend != "wandb":
            return
        import wandb
        mode = (cfg.tracking.mode or os.environ.get("WANDB_MODE")
                or ("online" if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb() else "offline"))
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb.init(project=cfg.tracking.project, entity=cfg.tracking.entity,
                                group=cfg.tracking.group or cfg.name, job_type=cfg.pipeline.name,
                                name=Path(run_dir).name, id=run_id, resume="allow", mode=mode,
                                dir=str(run_dir), config=config_dict)
        self.wandb.define_metric("train/step")
        self.wandb.define_metric("train/*", step_metric="train/step")
        self.wandb.define_metric("eval/*", step_metric="train/step")
        self.wandb.define_metric("round")
        self.wandb.define_metric("round/*", step_metric="round")
        log.info("wandb %s run %s (group %s)", mode, run_id, cfg.tracking.group or cfg.name)

    def log(self, metrics: dict, **keys) -> None:
        """One record: `keys` say where it belongs (stage, round, step); `metrics` are the numbers."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **keys, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in {**keys, **metrics}.items() if isinstance(v, (int, float))})

    def histogram(self, name: str, values: np.ndarray, round: int) -> None:
        if self.wandb is not None and len(values):
            import wandb
            self.wandb.log({name: wandb.Histogram(np.asarray(values, dtype=np.float64)), "round": round})

    def finish(self, summary: dict) -> None:
        if self.wandb is not None:
            for k, v in summary.items():
                if isinstance(v, (int, float, str)):
                    self.wandb.summary[k] = v
            self.wandb.finish()


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
