"""Config composition, validation and the SLURM bridge, without running a job."""
import os
import stat
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import tokenclean.__main__  # noqa: F401  registers the schema and the model_tag resolver
from tests.cli import ROOT
from tokenclean.config import ConfigError, validate
from tokenclean.dist import slurm_to_torch_env


def typed(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def test_default_config_is_the_builtin_job():
    cfg = typed()
    validate(cfg)
    assert cfg.model.name_or_path == "builtin:smollm2-135m-instruct"
    assert cfg.data.train == "builtin:chatterbot" and cfg.pipeline.name == "fixed"
    assert cfg.selection.method == "global" and cfg.selection.keep_ratio == 0.6
    assert cfg.name == "fixed-influence-global-smollm2-135m-instruct"
    assert typed("model=tiny", "selection=random").name == "fixed-influence-random-tiny"


def test_model_preset_sets_what_suits_it_and_overrides_win():
    cfg = typed("model=tiny")
    assert cfg.training.mixed_precision == "no" and cfg.training.lr == 2e-3
    assert typed("model=tiny", "training.lr=1e-3").training.lr == 1e-3


@pytest.mark.parametrize("override, message", [
    ("selection.keep_ratio=0", "selection.keep_ratio=0.0: must be in (0, 1]"),
    ("training.micro_batch_size=16", "training.batch_size=8: must be >= training.micro_batch_size (16)"),
    ("pipeline=self_evolving", None),
    ("pipeline.chunks=1", None),            # fixed pipeline ignores chunks
])
def test_validation_names_the_override(override, message):
    cfg = typed("model=tiny", override)
    if message is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value) == message


def test_self_evolving_needs_two_chunks():
    with pytest.raises(ConfigError, match="pipeline.chunks=1: self-evolving cleaning needs at least 2 chunks"):
        validate(typed("model=tiny", "pipeline=self_evolving", "pipeline.chunks=1"))


def test_slurm_launcher_config_composes():
    out = subprocess.run([sys.executable, "-m", "tokenclean", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                          "--cfg", "hydra"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    launcher = OmegaConf.create(out)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["tasks_per_node"] == 8 and launcher["partition"] == "gpu"


def test_slurm_tasks_become_torch_ranks(tmp_path, monkeypatch):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\necho node017\necho node018\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")      # recorded, so the teardown removes what the bridge sets
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[017-018]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    slurm_to_torch_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("9", "16", "1")
    assert os.environ["LOCAL_WORLD_SIZE"] == "8"
    assert os.environ["MASTER_ADDR"] == "node017" and os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)


def leaf_fields(cls, prefix=""):
    from dataclasses import fields, is_dataclass
    from typing import get_type_hints
    for f in fields(cls):
        hint = get_type_hints(cls)[f.name]
        if is_dataclass(hint):
            yield from leaf_fields(hint, prefix + f.name + ".")
        else:
            yield prefix + f.name, f.metadata.get("help", "")


def test_every_field_is_documented_where_help_reads_it():
    from tokenclean.config import Config
    undocumented = [key for key, text in leaf_fields(Config) if len(text.split()) < 3]
    assert not undocumented, f"give these fields a help text (config.doc): {undocumented}"


def test_help_lists_every_field_with_the_composed_value_and_its_help():
    """`tokenclean --help` with overrides: each field as `key = value` (the overrides applied), its choices and its
    help text; `$` in a help text survives Hydra's string.Template."""
    from tokenclean.config import Config
    proc = subprocess.run([sys.executable, "-m", "tokenclean", "model=tiny", "selection.keep_ratio=0.3", "--help"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for key, _ in leaf_fields(Config):
        assert f"\n  {key} = " in out, key
    assert "\n  selection.keep_ratio = 0.3\n" in out and "\n  model.name_or_path = builtin:tiny\n" in out
    assert "\n  selection.method = global   (global | sample | threshold | random | all | soft)\n" in out
    assert "share of response tokens kept" in out and "($TOKENCLEAN_CACHE/scores" in out
    assert "\n  name = fixed-influence-global-tiny\n" in out   # interpolations resolved
