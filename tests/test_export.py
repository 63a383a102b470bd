"""Score only, then export (tokenclean/export.py): `pipeline.train_final=false` runs of the tiny model, exported in
every format and read back the way each consumer reads it (datasets, TRL's parquet loader, ms-swift's documented
pre-tokenized messages, the span view checked against the tokenizer)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.cli import ROOT, run_cli, same_weights, stages
from tokenclean.export import export

SCORE_ONLY = ["model=tiny", "tracking=none", "data.limit=120", "pipeline.train_final=false", "cache=false"]


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "hard"
    out = run_cli(SCORE_ONLY, run_dir=run).stdout
    return run, out


@pytest.fixture(scope="module")
def soft(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "soft"
    run_cli([*SCORE_ONLY, "selection.method=soft"], run_dir=run)
    return run


def tokenizer():
    from tokenclean.assets import resolve_model
    from tokenclean.models import load_tokenizer
    return load_tokenizer(resolve_model("builtin:tiny"))


def cleaned(run):
    import pyarrow.parquet as pq
    return pq.read_table(run / "cleaned.parquet").to_pylist()


def test_a_score_only_run_stops_after_selection_and_a_later_run_trains_the_same_final_model(hard, tmp_path):
    run, out = hard
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_trained"] is False and summary["checkpoint"] is None
    assert "score only (pipeline.train_final=false)" in out and "(cleaned)" not in out
    assert set(stages(run)) == {"base_losses", "reference", "select"} and not (run / "final").exists()
    assert (run / "report.html").is_file() and summary["tokens_kept"] == sum(
        sum(x != -100 for x in r["labels"]) for r in cleaned(run))
    # the same command with train_final=true resumes it: the final stage alone runs, and trains what an
    # uninterrupted run trains
    done = {k: v["seconds"] for k, v in stages(run).items()}
    resumed = tmp_path / "resumed"
    subprocess.run(["cp", "-r", str(run), str(resumed)], check=True)
    run_cli([*SCORE_ONLY[:-2], "cache=false"], run_dir=resumed)
    assert {k: v["seconds"] for k, v in stages(resumed).items() if k != "final"} == done
    whole = tmp_path / "whole"
    run_cli([*SCORE_ONLY[:-2], "cache=false"], run_dir=whole)
    assert same_weights(resumed / "final", whole / "final")
    assert cleaned(resumed) == cleaned(whole) == cleaned(run)


@pytest.mark.parametrize("args, key", [
    (["pipeline=self_evolving"], "pipeline.train_final=False: self-evolving rounds train"),
    (["scorer=rho"], "pipeline.train_final=False: scorer=rho chooses tokens while the final model trains"),
])
def test_score_only_is_refused_in_one_line_where_nothing_can_be_exported_before_training(args, key, tmp_path):
    p = run_cli([*SCORE_ONLY, *args], run_dir=tmp_path / "r", check=False)
    assert p.returncode == 2 and key in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def export_cli(run, fmt, out):
    p = subprocess.run([sys.executable, "-m", "tokenclean.export", str(run), "--format", fmt, "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_hf_and_trl_exports_load_as_the_cleaned_dataset_with_a_card(hard, tmp_path):
    from datasets import load_dataset, load_from_disk

    run, _ = hard
    rows = cleaned(run)
    export_cli(run, "hf", tmp_path / "hf")
    export_cli(run, "trl", tmp_path / "trl")
    assert load_from_disk(str(tmp_path / "hf")).to_list() == rows
    parquet = load_dataset("parquet", data_files=str(tmp_path / "trl" / "train.parquet"), split="train",
                           keep_in_memory=True)
    assert parquet.to_list() == rows
    card = (tmp_path / "hf" / "README.md").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    for needed in ("| scorer | influence |", "method=global, keep_ratio=0.6", manifest["data_fingerprint"],
                   manifest["inputs"]["model"]["fingerprint"], "| final model trained | False |",
                   "tokenclean model=tiny tracking=none data.limit=120 pipeline.train_final=false"):
        assert needed in card, needed
    assert (tmp_path / "trl" / "config.yaml").read_text() == (run / "config.yaml").read_text()


def test_spans_give_the_decoded_text_and_exactly_the_dropped_tokens_characters(hard, soft, tmp_path):
    tok = tokenizer()

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    for run in (hard[0], soft):
        export(run, "spans", tmp_path / run.name)      # in this process (the CLI: the hf and trl tests)
        views = [json.loads(line) for line in (tmp_path / run.name / "spans.jsonl").read_text().splitlines()]
        rows = cleaned(run)
        assert len(views) == len(rows) > 0
        n_dropped = 0
        for view, row in zip(views, rows):
            ids, labels = row["input_ids"], np.asarray(row["labels"])
            response = np.asarray(row["response_mask"], bool)
            assert view["text"] == decode(ids) and view["record_index"] == row["record_index"]
            assert view["kept_tokens"] == int((labels != -100).sum())
            dropped = response & (labels == -100)
            n_dropped += int(dropped.sum())
            # each dropped span's characters are the decoded dropped tokens (runs of them), in order
            edges = np.diff(np.concatenate([[0], dropped.astype(int), [0]]))
            token_runs = zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))
            assert [view["text"][a:b] for a, b in view["dropped"]] == [decode(ids[a:b]) for a, b in token_runs]
            if run == soft:
                w = np.asarray(row["weights"])
                assert len(view["weighted"]) == int((response & (w > 0) & (w < 1)).sum())
        assert (n_dropped > 0) == (run != soft)     # soft weights never reach 0 here: nothing dropped


def test_swift_records_follow_ms_swift_pre_tokenized_messages_schema(hard, soft, tmp_path):
    """ms-swift (swift/loss_scale/base.py): messages alternate user / assistant after an optional system message;
    an assistant content may be {"token_ids": [...], "loss_scale": [...]}, one float per token."""
    from tokenclean.data import read_records

    tok = tokenizer()
    records, _ = read_records("builtin:chatterbot", limit=120)
    for run in (hard[0], soft):
        info = export(run, "swift", tmp_path / run.name)
        assert info["turns_written_whole"] == 0     # every turn's content tokens matched its rendering
        lines = (tmp_path / run.name / "train.jsonl").read_text().splitlines()
        rows = cleaned(run)
        assert len(lines) == len(rows)
        for line, row in zip(lines, rows):
            messages = json.loads(line)["messages"]
            source = records[row["record_index"]]["messages"]
            body = messages[1:] if messages[0]["role"] == "system" else messages
            assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2)
            assert [m["role"] for m in messages] == [m["role"] for m in source]
            labels, weights = np.asarray(row["labels"]), row.get("weights")
            turn = next(m["content"] for m in messages if m["role"] == "assistant")
            assert isinstance(turn, dict) and len(turn["token_ids"]) == len(turn["loss_scale"]) > 0
            assert tok.decode(turn["token_ids"]) == next(m["content"] for m in source if m["role"] == "assistant")
            start = int(np.flatnonzero(row["response_mask"])[0])
            n = len(turn["token_ids"])
            assert turn["token_ids"] == row["input_ids"][start:start + n]
            want = (np.asarray(weights[start:start + n]) if weights is not None
                    else (labels[start:start + n] != -100).astype(float))
            assert np.allclose(turn["loss_scale"], want, atol=1e-6)


def test_export_errors_are_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "tokenclean.export", str(tmp_path), "--format", "hf", "--out",
                        str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "not a finished tokenclean run" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
