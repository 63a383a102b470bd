"""tokenclean.api.clean: the notebook entry, on the tiny model, against the command on the same data."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from tests.cli import run_cli
from tokenclean.api import clean
from tokenclean.config import UserError
from tokenclean.data import read_records

OVERRIDES = ["data.eval_size=16", "cache=false"]


def test_clean_returns_the_commands_cleaned_dataset_for_records_given_as_a_list(tmp_path):
    records, _ = read_records("builtin:chatterbot", limit=80)
    data = clean(records, "tiny", OVERRIDES, run_dir=tmp_path / "api")
    assert len(data) == 80 - 16 - 13   # less the held-out 16 and the carved warm-up set (20% of the rest)
    assert {"input_ids", "labels", "response_mask", "record_index"} <= set(data.column_names)
    assert not (tmp_path / "api" / "final").exists()          # score only unless train=True
    source = tmp_path / "api-records.jsonl"
    assert source.is_file()
    run_cli(["model=tiny", "tracking=none", f"data.train={source}", "pipeline.train_final=false", *OVERRIDES],
            run_dir=tmp_path / "cli")
    assert data.to_list() == pq.read_table(tmp_path / "cli" / "cleaned.parquet").to_pylist()
    kept = sum(x != -100 for row in data["labels"] for x in row)
    assert 0 < kept < sum(sum(row) for row in data["response_mask"])


def test_clean_raises_the_commands_one_line_error_before_anything_runs(tmp_path):
    with pytest.raises(UserError, match=r"selection.keep_ratio=1.5: must be in \(0, 1\]"):
        clean([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}], "tiny",
              ["selection.keep_ratio=1.5"], run_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad-records.jsonl").exists()
