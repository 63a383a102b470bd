"""benchmarks.accuracy's noise analysis: which injected tokens a run dropped, from its cleaned.parquet and the spans."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks import accuracy

RECORDS = [
    {"prompt": "Q: what is ice?", "completion": " frozen water. Click here to subscribe now"},
    {"prompt": "Q: what is rain?", "completion": " water falling from clouds."},
    {"prompt": "Q: what is snow?", "completion": " frozen rain."},
]
NOISE = " Click here to subscribe now"


@pytest.fixture(scope="module")
def tokenizer_dir():
    from tokenclean.assets import resolve_model
    return resolve_model("builtin:tiny")


def write_run(path, rows):
    path.mkdir(parents=True)
    table = pa.table({"input_ids": [r[0] for r in rows], "attention_mask": [[1] * len(r[0]) for r in rows],
                      "labels": [r[1] for r in rows]})
    pq.write_table(table, path / "cleaned.parquet")


def test_noise_drops_counts_exactly_the_dropped_noise_and_clean_tokens(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    start = RECORDS[0]["completion"].index(NOISE)
    spans = [{"noise_kind": "boilerplate", "noise_span": [start, start + len(NOISE)]},
             {"noise_kind": None, "noise_span": None}, {"noise_kind": None, "noise_span": None}]
    (data / "train_noise.jsonl").write_text("".join(json.dumps(s) + "\n" for s in spans))

    prompts = [tok.encode(r["prompt"], add_special_tokens=False) for r in RECORDS]
    answers = [tok.encode(r["completion"], add_special_tokens=False) for r in RECORDS]
    clean_part = tok.encode(RECORDS[0]["completion"][:start], add_special_tokens=False)
    n_noise = len(answers[0]) - len(clean_part)
    assert n_noise > 0 and answers[0][:len(clean_part)] == clean_part   # the span starts on a token boundary

    def rows(dropped):   # dropped[i]: the response positions of record i that lose their label
        return [(p + a, [-100] * len(p) + [-100 if j in dropped[i] else t for j, t in enumerate(a)])
                for i, (p, a) in enumerate(zip(prompts, answers))]
    runs = tmp_path / "runs"
    write_run(runs / "full-s1", rows([set(), set(), set()]))
    # fixed: every noise token, and the first response token of record 1 (clean)
    write_run(runs / "fixed-s1", rows([set(range(len(clean_part), len(answers[0]))), {0}, set()]))
    # self-evolving: rows in chunk order (chunks.json: pool indices); drops the last noise token of record 0
    write_run(runs / "self_evolving-s1", [rows([set(), set(), set()])[2], rows([{len(answers[0]) - 1}, set(),
                                                                               set()])[0], rows([set()] * 3)[1]])
    (runs / "self_evolving-s1" / "chunks.json").write_text(json.dumps([[2], [0, 1]]))
    state = {"rows": [{"method": m, "seed": 1} for m in ("full", "fixed (influence)", "self-evolving (influence)")]}

    got = accuracy.noise_drops(tmp_path, state, tokenizer_dir)

    n_clean = len(clean_part) + len(answers[1]) + len(answers[2])
    assert got["full"] == {"boilerplate": 0.0, "clean tokens": 0.0}
    assert got["fixed (influence)"] == {"boilerplate": 1.0, "clean tokens": pytest.approx(1 / n_clean)}
    assert got["self-evolving (influence)"] == {"boilerplate": pytest.approx(1 / n_noise), "clean tokens": 0.0}


@pytest.mark.slow   # a harness run end to end (~25 s); the harness's parts are tested in the default suite
def test_the_accuracy_benchmark_end_to_end_on_the_tiny_model(tmp_path):
    """Settings chosen on dev (never the held-out half), every method paired with full over the same documents, the
    margin beside acc, and a random control at XTF's own kept ratio."""
    out = tmp_path / "acc"
    accuracy.main(["--model", "tiny", "--tasks", "sciq", "arc_easy", "--per-task", "8", "--warmup", "4",
                   "--dev-per-task", "3", "--dev-knobs", "keep_ratio", "--eval-limit", "6", "--seeds", "1",
                   "--methods", "full", "fixed (influence)", "xtf", "--work", str(tmp_path / "w"), "--out", str(out)])
    state = json.loads(out.with_suffix(".json").read_text())
    meta = json.loads((tmp_path / "w" / "acc" / "data" / "meta.json").read_text())
    assert meta["counts"]["sciq"]["dev"] == 3 and (tmp_path / "w" / "acc" / "data" / "dev").is_dir()
    dev = state["dev"]["keep_ratio"]
    assert set(dev["scores"]) == {"0.4", "0.6", "0.8"} and dev["chosen"] == max(
        [0.4, 0.6, 0.8], key=lambda v: dev["scores"][str(v)])
    assert f"selection.keep_ratio={dev['chosen']}" in state["meta"]["settings"]
    rows = {r["method"]: r for r in state["rows"]}
    assert set(rows) == {"full", "fixed (influence)", "xtf", "random at xtf's ratio"}
    assert rows["random at xtf's ratio"]["kept_ratio"] == pytest.approx(rows["xtf"]["kept_ratio"], abs=0.01)
    assert rows["fixed (influence)"]["kept_ratio"] == pytest.approx(dev["chosen"], abs=0.01)
    for r in rows.values():
        for t in ("sciq", "arc_easy"):
            docs = r["tasks"]["documents"][t]
            assert [d["doc_id"] for d in docs] == list(range(6))
            assert np.mean([d["acc"] for d in docs]) == pytest.approx(r["tasks"][t]["acc"])
            assert all((d["margin"] > 0) == (d["acc"] == 1) for d in docs if d["margin"] != 0)
    table = {r["method"]: r for r in accuracy.table(state)}
    p = table["xtf"]["vs_full"]["acc"]
    assert p["n_docs"] == 12 and p["diff"] == pytest.approx(
        accuracy.documents(rows["xtf"]["tasks"], ["sciq", "arc_easy"], "acc").mean()
        - accuracy.documents(rows["full"]["tasks"], ["sciq", "arc_easy"], "acc").mean())
    report = out.with_suffix(".md").read_text()
    assert "Chosen on dev" in report and "| random at xtf's ratio |" in report and "MDE" in report
