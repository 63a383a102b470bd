"""A finished run's decisions in the formats other trainers read, written from its files (no model runs again).

  python -m tokenclean.export RUN_DIR --format hf    --out DIR   # datasets.save_to_disk dir + README.md dataset card
  python -m tokenclean.export RUN_DIR --format trl   --out DIR   # train.parquet + README.md, for TRL's SFTTrainer
  python -m tokenclean.export RUN_DIR --format swift --out DIR   # train.jsonl: ms-swift messages, per-token loss_scale
  python -m tokenclean.export RUN_DIR --format spans --out DIR   # spans.jsonl: text + the character spans dropped

Every format holds the run's `cleaned.parquet` (tokenclean/report.py): the token ids, `labels` (-100 on the prompt
and the dropped tokens), `weights` for soft weights, `response_mask` and `record_index`.

  hf     `datasets.load_from_disk(DIR)` gives that dataset; TRL's SFTTrainer trains on it as it is (labels), and
         tokenclean.integrations.trl.WeightedSFTTrainer with the float weights.
  trl    the same table as one parquet file (`load_dataset("parquet", data_files="DIR/train.parquet")`).
  swift  one record per example in ms-swift's messages format; each assistant turn's content is ms-swift's
         pre-tokenized form {"token_ids": [...], "loss_scale": [...]} (one float per token, swift/loss_scale/base.py),
         the turn's tokens as tokenclean tokenized them and their weights (0 = dropped). The other turns are the
         records' own text (read again from data.train); assistant turns tokenclean did not train (context turns,
         turns cut off by data.max_length) carry ms-swift's per-message `"loss": false`. The end-of-turn token
         after each turn is left to ms-swift's template, which adds it (and trains it); a turn whose content tokens
         are not exactly the tokens of its rendering (a merge across the turn's boundary) is written as text, which
         ms-swift trains whole, and counted.
  spans  one JSON record per example: the decoded text, the response's character spans and those of the dropped
         tokens (or, for soft weights, the down-weighted ones with their weights), for tools that mask by character
         span (axolotl's `training_detail`) and for people reviewing the decisions.

Each directory gets a README.md (a dataset card: scorer, selection, keep ratio, base and reference models,
fingerprints, the command) and the run's config.yaml.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from tokenclean.config import UserError
from tokenclean.io import atomic_write, atomic_write_text

FORMATS = ("hf", "trl", "swift", "spans")


class ExportError(UserError):
    """A run directory that cannot be exported (not a finished run, its tokenizer gone)."""


def finished_run(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    if not (run / "cleaned.parquet").is_file() or not (run / "summary.json").is_file():
        raise ExportError(f"{run}: no cleaned.parquet and summary.json there, so not a finished tokenclean run; run "
                          "tokenclean first (pipeline.train_final=false scores and selects without training)")
    return run


def cleaned_dataset(run_dir: str | Path):
    """The run's cleaned.parquet as a `datasets.Dataset` (in memory)."""
    import pyarrow.parquet as pq
    from datasets import Dataset

    return Dataset(pq.read_table(finished_run(run_dir) / "cleaned.parquet"))


def dataset_card(run_dir: Path) -> str:
    """README.md for an export: what was scored and kept, by what, from what, and how to train on it."""
    import yaml

    run = finished_run(run_dir)
    summary = json.loads((run / "summary.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    s, inputs = cfg["selection"], manifest["inputs"]
    scorer = cfg["scorer"]["name"] if s["method"] not in ("random", "all") else "none (a baseline)"
    reference = {"fixed": f"{run / 'reference'} (trained on the warm-up set)" if (run / "reference").is_dir()
                 else "none", "self_evolving": "each round's model (round_<t>/model)"}[summary["pipeline"]]
    data = "\n".join(f"| {k} | `{v['path']}` | {v['records']:,} | {v['fingerprint']} |"
                     for k, v in inputs.items() if k.startswith("data."))
    weights = "soft weights in `weights`" if s["method"] == "soft" else "a keep mask (labels -100 where dropped)"
    command = " ".join(summary.get("command") or ["(not recorded)"])
    return f"""---
tags: [tokenclean, token-selection, sft]
---
# {run.name}: cleaned by tokenclean

Per-token decisions of a tokenclean run: `input_ids`, `labels` (-100 on the prompt and on dropped tokens),
{weights}, `response_mask` (1 on response tokens) and `record_index` (the example's record in data.train).

| | |
|---|---|
| pipeline | {summary['pipeline']} |
| scorer | {scorer} |
| selection | method={s['method']}, keep_ratio={s['keep_ratio']}, threshold={s['threshold']} |
| response tokens kept | {summary['tokens_kept']:,} of {summary['tokens_target']:,} ({summary['kept_ratio']:.1%}) |
| base model | `{inputs['model']['path']}` (fingerprint {inputs['model']['fingerprint']}) |
| tokenizer | fingerprint {inputs['tokenizer']['fingerprint']} |
| reference | {reference} |
| data fingerprint | {manifest['data_fingerprint']} |
| final model trained | {summary.get('final_trained', True)} |

| data | path | records | fingerprint |
|---|---|---|---|
{data}

Command: `{command}` (the whole config: config.yaml beside this file).

Train on it with TRL, float weights included (tokenclean/integrations/trl.py):

```python
from datasets import load_from_disk
from tokenclean.integrations.trl import WeightedSFTTrainer
trainer = WeightedSFTTrainer(model=model, args=sft_config, train_dataset=load_from_disk("<this directory>"),
                             processing_class=tokenizer)
```
"""


def token_spans(tokenizer, ids) -> tuple[str, np.ndarray, np.ndarray]:
    """The decoded text of `ids` and each token's character span [start, end) in it. Incremental decoding (decode a
    token with the one before it and keep the new characters; a token that ends inside a multi-byte character gets
    its text with the next one), so each token costs one short decode and the spans add up to the whole text."""
    text, starts, ends = "", np.zeros(len(ids), np.int64), np.zeros(len(ids), np.int64)
    prefix, read = 0, 0            # the window decoded for context, and the first token not yet placed

    def decode(a, b):
        return tokenizer.decode(ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    for k in range(len(ids)):
        before, now = decode(prefix, read), decode(prefix, k + 1)
        if now.endswith("\ufffd") and k + 1 < len(ids):   # inside a character: wait for its last byte
            continue
        new = now[len(before):] if now.startswith(before) else now
        starts[read:k + 1] = len(text)
        text += new
        ends[read:k + 1] = len(text)
        prefix, read = read, k + 1
    return text, starts, ends


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) token index ranges where `mask` is True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def spans_record(tokenizer, row: dict) -> dict:
    ids = np.asarray(row["input_ids"])
    response, labels = np.asarray(row["response_mask"], bool), np.asarray(row["labels"])
    weights = np.asarray(row["weights"], np.float32) if row.get("weights") is not None else (labels != -100) * 1.0
    text, starts, ends = token_spans(tokenizer, ids.tolist())

    def chars(a, b):
        return [int(starts[a]), int(ends[b - 1])]

    out = {"record_index": row["record_index"], "text": text,
           "response": [chars(a, b) for a, b in runs(response)],
           "dropped": [chars(a, b) for a, b in runs(response & (weights == 0))],
           "response_tokens": int(response.sum()), "kept_tokens": int((response & (weights > 0)).sum())}
    if row.get("weights") is not None:
        partial = response & (weights > 0) & (weights < 1)
        out["weighted"] = [[*chars(j, j + 1), round(float(weights[j]), 4)] for j in np.flatnonzero(partial)]
    return out


def swift_record(tokenizer, messages: list[dict], row: dict) -> tuple[dict, int]:
    """(an ms-swift record, how many assistant turns were written whole for want of an exact token match)."""
    ids = np.asarray(row["input_ids"])
    labels = np.asarray(row["labels"])
    weights = np.asarray(row["weights"], np.float32) if row.get("weights") is not None else (labels != -100) * 1.0
    turns = runs(np.asarray(row["response_mask"], bool))
    out, inexact, t = [], 0, 0
    for m in messages:
        if m["role"] != "assistant":
            out.append({"role": m["role"], "content": m["content"]})
            continue
        if not m.get("train", True) or t >= len(turns):   # context, or cut off by data.max_length: never trained
            out.append({"role": "assistant", "content": m["content"], "loss": False})
            continue
        a, b = turns[t]
        t += 1
        content = tokenizer(m["content"], add_special_tokens=False)["input_ids"]
        if ids[a:a + len(content)].tolist() == content and len(content) <= b - a:
            scale = [round(float(w), 6) for w in weights[a:a + len(content)]]
            out.append({"role": "assistant", "content": {"token_ids": content, "loss_scale": scale}})
        else:
            inexact += 1
            out.append({"role": "assistant", "content": m["content"]})
    return {"messages": out}, inexact


def run_tokenizer(run: Path):
    from tokenclean.models import load_tokenizer

    path = json.loads((run / "manifest.json").read_text())["inputs"]["tokenizer"]["path"]
    if not Path(path).is_dir():
        raise ExportError(f"{run}: the run's tokenizer {path} is gone; the swift and spans formats decode the tokens "
                          "with it (hf and trl need no tokenizer)")
    return load_tokenizer(path)


def run_records(run: Path):
    """The run's training records (data.train as it read them), indexed by record_index."""
    import yaml

    from tokenclean.data import read_conversations

    d = yaml.safe_load((run / "config.yaml").read_text())["data"]
    try:
        return read_conversations(d["train"], d["format"], d["on_error"], d["limit"])[0]
    except FileNotFoundError:
        raise ExportError(f"{run}: its data.train {d['train']} is gone; the swift format reads the records' text "
                          "from it") from None


def write_jsonl(path: Path, records) -> None:
    def write(f):
        for r in records:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode())
    atomic_write(path, write)


def export(run_dir: str | Path, fmt: str, out: str | Path) -> dict:
    """Write the run's decisions as `fmt` into the directory `out` (created; files in it are replaced). Returns
    what was written: {"format", "examples", "path", ...}."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    run, out = finished_run(run_dir), Path(out)
    data = cleaned_dataset(run)
    missing = [c for c in ("response_mask", "record_index") if c not in data.column_names]
    if missing and fmt in ("swift", "spans"):
        raise ExportError(f"{run / 'cleaned.parquet'} has no {' or '.join(missing)} column (written by an older "
                          "tokenclean): run the run's command again, which resumes the finished run and rewrites it")
    info = {"format": fmt, "examples": len(data)}
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        tmp = out / f".dataset.tmp{os.getpid()}"
        data.save_to_disk(str(tmp))
        for f in tmp.iterdir():          # the dataset's files beside README.md, each replaced by one rename
            f.replace(out / f.name)
        tmp.rmdir()
        info["path"] = str(out)
    elif fmt == "trl":
        def copy(f):
            with open(run / "cleaned.parquet", "rb") as src:
                shutil.copyfileobj(src, f)
        atomic_write(out / "train.parquet", copy)
        info["path"] = str(out / "train.parquet")
    elif fmt == "spans":
        tok = run_tokenizer(run)
        write_jsonl(out / "spans.jsonl", (spans_record(tok, row) for row in data))
        info["path"] = str(out / "spans.jsonl")
    else:
        tok, records = run_tokenizer(run), run_records(run)
        inexact = [0]

        def rows():
            for row in data:
                record, n = swift_record(tok, records[row["record_index"]]["messages"], row)
                inexact[0] += n
                yield record
        write_jsonl(out / "train.jsonl", rows())
        info.update(path=str(out / "train.jsonl"), turns_written_whole=inexact[0])
    atomic_write_text(out / "README.md", dataset_card(run))
    shutil.copyfile(run / "config.yaml", out / "config.yaml")
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tokenclean.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a finished tokenclean run directory (holds cleaned.parquet)")
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--out", required=True, help="the directory to write (created)")
    a = ap.parse_args(argv)
    try:
        info = export(a.run_dir, a.format, a.out)
    except UserError as e:
        print(f"tokenclean.export: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"tokenclean.export: {info['examples']:,} examples as {info['format']} -> {info['path']}"
          + (f" ({info['turns_written_whole']} assistant turns written whole)" if info.get("turns_written_whole")
             else ""))


if __name__ == "__main__":
    main()
