"""tokenclean from Python (a notebook, a script around another trainer): the same config, checks and pipeline as
the `tokenclean` command.

    from tokenclean.api import clean
    cleaned = clean([{"messages": [...]}, ...], model="/models/llama", overrides=["selection.keep_ratio=0.7"])
    cleaned[0]["labels"]          # -100 on the prompt and on the dropped tokens

`clean` scores and selects (pipeline.train_final=false unless train=True) and returns the cleaned dataset as a
`datasets.Dataset`, the columns of cleaned.parquet (tokenclean/report.py). Errors a user can fix are raised as
`tokenclean.config.UserError` with the command's one-line message.
"""
from __future__ import annotations

from pathlib import Path


def compose(overrides=()) -> tuple:
    """The config `tokenclean <overrides>` runs with, composed from conf/ and checked as the command checks it
    (config.validate, the scorer's checks, unknown keys): (the typed Config, the resolved dict)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    import tokenclean.__main__ as cli  # registers the schema and the model_tag resolver
    with initialize_config_dir(config_dir=cli.conf_dir(), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
    return cli.typed_config(cfg), OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def model_overrides(model: str) -> list[str]:
    """A local checkpoint directory (model=local), or a preset of conf/model/ (tiny, smollm2)."""
    if Path(model).is_dir():
        return ["model=local", f"model.name_or_path={Path(model).resolve()}"]
    return [f"model={model}"]


def write_records(records, path: Path) -> str:
    """`records` as a data.train source: a path is used as is; a `datasets.Dataset` is saved beside the run
    directory (save_to_disk); a list of dicts is written there as JSON lines."""
    import json

    from tokenclean.io import atomic_write

    if isinstance(records, (str, Path)):
        return str(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(records, list):
        file = path.with_name(f"{path.name}.jsonl")
        atomic_write(file, lambda f: f.writelines((json.dumps(r, ensure_ascii=False) + "\n").encode()
                                                  for r in records))
        return str(file)
    records.save_to_disk(str(path))   # a datasets.Dataset
    return str(path)


def clean(records, model: str, overrides=(), run_dir: str | Path | None = None, train: bool = False):
    """Score and select the response tokens of `records` (a list of records as the command reads them, a data
    file or directory, or a `datasets.Dataset`) with `model` (a local HF directory, or a preset: tiny, smollm2)
    and `overrides` (the command's key=value). Returns the cleaned `datasets.Dataset`; the run directory
    (default runs/<name>, as the command's) holds everything else and resumes like the command's. train=True also
    fine-tunes the final model there (final/)."""
    from tokenclean import pipelines, rundir
    from tokenclean.export import cleaned_dataset

    head = [*model_overrides(model), "tracking=none", f"pipeline.train_final={train}"]
    typed, _ = compose([*head, *overrides])      # the run's name, and every check before any file is written
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / typed.name
    source = write_records(records, run_dir.parent / f"{run_dir.name}-records")
    typed, config_dict = compose([*head, f"data.train={source}", *overrides])
    try:
        pipelines.run(typed, run_dir, config_dict, ["tokenclean.api.clean", *head, f"data.train={source}",
                                                    *overrides])
    finally:
        rundir.end_run()
    return cleaned_dataset(run_dir)
