"""The two pipelines, each one plain function over a Job: fixed.run and self_evolving.run."""
from __future__ import annotations

from pathlib import Path

from tokenclean.config import Config, PipelineName


def run(cfg: Config, run_dir: Path, config_dict: dict, command: list[str] | None = None):
    """setup -> the pipeline -> finish. Returns (the job, its summary). `command`: the command line that started
    it, for summary.json (and the dataset card an export writes)."""
    from tokenclean.rundir import lock_early
    # first of all, before the imports below (torch, transformers, peft: seconds) and before any data is read: a
    # second run on this directory is refused at once
    lock_early(run_dir)
    from tokenclean.pipelines import fixed, self_evolving
    from tokenclean.pipelines.job import finish, setup
    job = setup(cfg, run_dir, config_dict)
    summary, parts = (fixed if cfg.pipeline.name == PipelineName.fixed else self_evolving).run(job)
    summary.command = command
    return job, finish(job, summary, parts)
