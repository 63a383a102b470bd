"""benchmarks.paper end to end on the tiny model: every arm on the identical ShareGPT-shaped pool, scored on TruthfulQA
MC1/MC2 (the two-question fixture), paired with full SFT, resumable, a table and a plot."""
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from benchmarks import accuracy, paper
from tokenclean import fetch
from tokenclean.assets import SHAREGPT_MEMBER

FIXTURE = Path(__file__).resolve().parent / "data" / "fetched"
WORDS = "the cat sat on a mat while birds sang softly near old green trees by rivers".split()
SMALL = ["--extra", "training.batch_size=8", "training.micro_batch_size=8", "training.score_batch_size=8",
         "data.max_length=128", "pipeline.chunks=2", "training.lr=2e-3"]


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A fetched-data directory with a 40-conversation ShareGPT wheel (its list cut off) and the TruthfulQA fixture."""
    root = tmp_path / "data"
    (root / "sharegpt").mkdir(parents=True)
    items = []
    for i in range(40):
        q = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(6))
        items.append({"id": str(i), "conversations": [
            {"from": "human", "value": f"Tell me about {q}?"}, {"from": "gpt", "value": f"Sure: {q}. " * (1 + i % 3)},
            {"from": "human", "value": "And then?"}, {"from": "gpt", "value": f"Then {WORDS[i % len(WORDS)]}."}]})
    with zipfile.ZipFile(root / fetch.SOURCES["sharegpt"].dest, "w") as z:
        z.writestr(SHAREGPT_MEMBER, json.dumps(items)[:-30])
    shutil.copytree(FIXTURE / "truthful_qa", root / "truthful_qa")
    monkeypatch.setenv(fetch.ENV, str(root))
    return root


def run(tmp_path, arms, tasks, extra=()):
    out = tmp_path / "results" / "paper"
    paper.main(["--model", "tiny", "--pool", "sharegpt", "--arms", ",".join(arms), "--tasks", ",".join(tasks),
                "--eval-limit", "3", "--seeds", "1", "--work", str(tmp_path / "w"), "--out", str(out), *SMALL,
                *extra])
    return out, json.loads(out.with_suffix(".json").read_text())


def check(out, state, arms, tasks):
    rows = {r["method"]: r for r in state["rows"]}
    assert list(rows) == arms and state["base"]["truthfulqa_mc1"]["n"] == 2
    assert rows["full"]["kept_ratio"] == 1.0
    for arm in set(arms) & {"random", "fixed"}:
        assert rows[arm]["kept_ratio"] == pytest.approx(0.6, abs=0.02)
    for r in rows.values():
        for t in tasks:
            docs = r["tasks"]["documents"][t]
            assert [d["doc_id"] for d in docs] == list(range(len(docs)))
            assert np.mean([d["acc"] for d in docs]) == pytest.approx(r["tasks"][t]["acc"])
    table = {r["method"]: r for r in accuracy.table(state)}
    for arm in arms[1:]:
        p = table[arm]["vs_full"]["acc"]
        assert p["diff"] == pytest.approx(accuracy.documents(rows[arm]["tasks"], tasks, "acc").mean()
                                          - accuracy.documents(rows["full"]["tasks"], tasks, "acc").mean())
    # every arm trained on the same pool: the same records read, the same examples and response tokens
    runs = out.parent.parent / "w" / "paper" / "runs"
    pools = set()
    for a in arms:
        summary = json.loads((runs / f"{a}-s1" / "summary.json").read_text())
        manifest = json.loads((runs / f"{a}-s1" / "manifest.json").read_text())
        pools.add((manifest["inputs"]["data.train"]["fingerprint"], json.dumps(summary["pool"]),
                   summary["tokens_target"]))
    assert len(pools) == 1
    report = out.with_suffix(".md").read_text()
    assert all(f"| {a} |" in report for a in arms) and "| base (no fine-tuning) |" in report
    assert "experiment=paper" in report and out.with_suffix(".png").stat().st_size > 1000


def test_paper_benchmark_end_to_end_and_resume(tmp_path, data_dir, monkeypatch):
    arms, tasks = ["full", "self_evolving"], ["truthfulqa_mc1", "truthfulqa_mc2"]
    out, state = run(tmp_path, arms, tasks)
    check(out, state, arms, tasks)
    assert state["meta"]["precision"] == "fp32" and "data.warmup_fraction=0.1" in state["meta"]["settings"]

    def no_training(*a, **k):
        raise AssertionError("a finished (arm, seed) was trained again")
    monkeypatch.setattr(accuracy, "train", no_training)
    _, again = run(tmp_path, arms, tasks)
    assert again["rows"] == state["rows"] and again["base"] == state["base"]


def test_unknown_arm_is_refused(capsys):
    with pytest.raises(SystemExit):
        paper.main(["--model", "tiny", "--arms", "full,oracle"])
    assert "unknown arms ['oracle']" in capsys.readouterr().err


@pytest.mark.slow   # every arm, a pool subset and ARC-Challenge too (~20-40 s on top of the default test)
def test_paper_benchmark_every_arm(tmp_path, data_dir):
    arms, tasks = list(paper.ARMS), ["arc_challenge", "truthfulqa_mc1", "truthfulqa_mc2"]
    out, state = run(tmp_path, arms, tasks, ["--pool-size", "30"])
    check(out, state, arms, tasks)
    assert "data.sample=30" in state["meta"]["settings"]
