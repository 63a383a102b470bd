"""Incomplete inputs fail early and clearly: before anything trains, one line naming what is missing and where.

In-process: models.check_model_dir (what assets.resolve_model runs on every model directory) on copies of the tiny
model with one thing broken, a tokenizer with no token to pad with (both raise ConfigError, which the CLI prints as
one line), a data folder that holds no dataset (data.read_records: DataError, printed alike). Through the real CLI:
exit 2, one line, no traceback, no run started, for a model without weights.
"""
import json
import shutil

import pytest

from tests.cli import TINY, run_cli
from tokenclean.config import ConfigError
from tokenclean.rundir import DamagedError


@pytest.fixture(scope="module")
def tiny_dir():
    from tokenclean.assets import resolve_model
    return resolve_model("builtin:tiny")


@pytest.fixture
def model(tiny_dir, tmp_path):
    """A copy of the tiny model to break."""
    shutil.copytree(tiny_dir, tmp_path / "model")
    return tmp_path / "model"


def shard(model):
    """The tiny model's weights as a two-shard checkpoint (an index naming both files), the second shard missing."""
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


def without_pad_or_eos(model):
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["pad_token"], config["eos_token"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))


BREAK = {
    "no weights": (lambda m: (m / "model.safetensors").unlink(), "no weights in {m} (looked for model.safetensors, "),
    "no tokenizer": (lambda m: (m / "tokenizer.json").unlink(), "no tokenizer in {m} (looked for tokenizer.json, "),
    "no config": (lambda m: (m / "config.json").unlink(), "no config.json in {m}"),
    "unreadable config": (lambda m: (m / "config.json").write_text('{"model_type": '),
                          "{m}/config.json is unreadable (Expecting value"),
    "truncated weights": (lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:-9]),
                          "{m}/model.safetensors is truncated or damaged ("),
    "missing shard": (shard, "{m}/model-00002-of-00002.safetensors is missing"),
}


@pytest.mark.parametrize("broken", BREAK)
def test_an_incomplete_model_directory_is_named(model, broken):
    from tokenclean.models import check_model_dir
    assert check_model_dir(str(model)) == str(model)
    damage, message = BREAK[broken]
    damage(model)
    with pytest.raises(ConfigError) as e:
        check_model_dir(str(model))
    assert str(e.value).startswith(f"model.name_or_path='{model}': {message.format(m=model)}")
    assert "point model.name_or_path at a complete Hugging Face model directory" in str(e.value)


def test_a_damaged_built_in_model_says_how_to_rebuild_it(model):
    from tokenclean.models import check_model_dir
    (model / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=f"model.name_or_path='builtin:tiny': no weights in {model} .*; delete "
                                          f"{model} and it is rebuilt on the next run"):
        check_model_dir(str(model), "builtin:tiny")


def test_a_checkpoint_is_checked_against_its_checksums(model):
    from tokenclean.models import check_model_dir
    from tokenclean.rundir import write_checksums
    write_checksums(model)
    check_model_dir(str(model))
    config = model / "config.json"
    config.write_text(config.read_text().replace("silu", "gelu"))   # same size, other content
    with pytest.raises(DamagedError, match=f"{config} is damaged \\(its content changed since it was written\\)"):
        check_model_dir(str(model))


def test_a_tokenizer_without_pad_or_eos_is_refused(model):
    from tokenclean.models import load_tokenizer
    assert load_tokenizer(str(model)).pad_token == "<|im_end|>"
    without_pad_or_eos(model)
    with pytest.raises(ConfigError, match=f"the tokenizer in {model} has neither a pad token nor an eos token"):
        load_tokenizer(str(model))


def test_a_data_folder_without_a_dataset_is_named(tmp_path):
    """read_records (tokenclean/data/records.py) runs before any model loads; its DataError is one line from the CLI."""
    from tokenclean.data import DataError, read_records
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(DataError, match=f"{folder}: folder is not a datasets.save_to_disk folder \\(no state.json"):
        read_records(str(folder))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    with pytest.raises(DataError, match=f"{folder}: cannot read the dataset folder \\(FileNotFoundError: .*"
                                        "data-00000-of-00001.arrow"):
        read_records(str(folder))


def test_the_cli_stops_before_training_with_one_line(model, tmp_path):
    (model / "model.safetensors").unlink()
    proc = run_cli([*TINY, f"model.name_or_path={model}"], tmp_path / "run", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("tokenclean:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"tokenclean: error: model.name_or_path='{model}': no weights in {model} (looked for ")
    assert not (tmp_path / "run" / "manifest.json").exists()      # no run started
