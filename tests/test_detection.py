"""The known-truth benchmark (benchmarks/injection.py, benchmarks/detection.py): injections tracked to the exact tokens,
metrics by hand, a CI-sized run."""
import csv
import json

import numpy as np
import pytest

from benchmarks import detection as D
from benchmarks import injection as B


@pytest.fixture(scope="module")
def tiny_tok():
    from tokenclean.assets import resolve_model
    from tokenclean.models import load_tokenizer
    return load_tokenizer(resolve_model("builtin:tiny"))


def test_injected_spans_become_exactly_the_injected_tokens(tiny_tok):
    from tokenclean.data import tokenize
    train, _, _ = B.split_records("builtin:chatterbot", 60, 0, 0, seed=3)
    fake = lambda recs, idx: {i: " and so on and so forth" for i in idx}  # noqa: E731
    noisy, inj = B.inject(train, tiny_tok, seed=5, p_clean=0.2, continue_fn=fake)
    assert {i.kind for i in inj} == set(B.KINDS[1:])
    # the clean records are untouched and every injection is the only change to its record
    injected = {i.record for i in inj}
    assert all(noisy[r] == train[r] for r in range(len(train)) if r not in injected)
    for i in inj:
        c = noisy[i.record]["messages"][i.turn]["content"]
        orig = train[i.record]["messages"][i.turn]["content"].rstrip()
        assert c[:i.start] + c[i.end:] == orig
        if i.kind == "duplicate":
            assert c[i.start + 1:i.end] in orig and c[i.start] == " "
    t = tokenize(noisy, tiny_tok, 512)
    truth = B.token_truth(noisy, inj, tiny_tok, t)
    assert truth.same_layout(t.input_ids)
    tgt = t.target.values.astype(bool)
    assert not (truth.values.astype(bool) & ~tgt).any()          # injected tokens are response tokens
    for i in inj:
        e = int(np.flatnonzero(t.record_indices == i.record)[0])
        marked = t.input_ids[e][truth[e] == B.KINDS.index(i.kind)]
        c = noisy[i.record]["messages"][i.turn]["content"]
        # inserted after a word with a leading space: the marked tokens decode to exactly the injected text
        assert tiny_tok.decode(marked) == c[i.start:i.end], (i, tiny_tok.decode(marked))
    clean_examples = [int(np.flatnonzero(t.record_indices == r)[0]) for r in range(len(train)) if r not in injected]
    assert all(not truth[e].any() for e in clean_examples)


def test_detection_metrics_by_hand():
    truth = np.array([0, 0, 0, 0, 1, 1, 3, 3])
    noise = np.array([0.1, 0.2, 0.9, 0.3, 0.8, 0.7, 0.05, 0.6])
    dropped = np.array([False, False, True, False, True, False, False, True])
    m = D.detection_metrics(noise, dropped, truth)
    # injected {4,5,6,7} vs clean {0,1,2,3}: pairs won: 0.8 > 3 of 4 clean (loses to .9), 0.7: 3, 0.05: 0, 0.6: 3
    assert m["auc"] == pytest.approx(9 / 16)
    assert m["auc_random"] == pytest.approx(6 / 8)               # kind 1 = random: 0.8 and 0.7 vs the clean 4
    assert m["auc_duplicate"] == pytest.approx(3 / 8)            # kind 3: 0.05 -> 0, 0.6 -> 3
    assert np.isnan(m["auc_boilerplate"]) and np.isnan(m["recall_boilerplate"])
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 4)
    assert m["recall_random"] == pytest.approx(0.5) and m["recall_duplicate"] == pytest.approx(0.5)
    assert m["clean_dropped"] == pytest.approx(1 / 4) and m["dropped"] == pytest.approx(3 / 8)
    none = D.detection_metrics(None, np.zeros(8, bool), truth)
    assert np.isnan(none["auc"]) and np.isnan(none["precision"]) and none["recall"] == 0


def test_ci_sized_detection_run_writes_the_table(tmp_path):
    out = tmp_path / "scorers_ci"
    rows = D.detect("tiny", n_train=40, n_warmup=24, out=str(out), self_evolving_ref=False, command="ci")
    names = [r["scorer"] for r in rows]
    assert names[0].startswith("full") and any(n.startswith("rho online") for n in names)
    assert any(n.startswith("self_online") for n in names) and any(n.startswith("xtf (union") for n in names)
    # every scorer of tokenclean/scorers/ has a row
    from tokenclean import scorers
    assert {n.split(" ")[0].split(",")[0] for n in names} >= set(scorers.names())
    by = {r["scorer"]: r for r in rows}
    assert by["full (selection=all)"]["dropped"] == 0
    # ratio scorers drop 40% (floor of 60% kept: a little more than 40%), per sample a little more again
    for n in ("random (selection=random)", "influence, global (fixed)", "rho online (l_cur - l_ref)",
              "entropy (-H_base), global"):
        assert 0.4 <= by[n]["dropped"] < 0.42
    # EKSFT removes the union of two top-20% sets per step: between a fifth and two fifths
    eksft = next(r for n, r in by.items() if n.startswith("eksft"))
    assert 0.18 <= eksft["dropped"] <= 0.4
    # the offline "rho" ranks the same score within samples: same AUC, other dropped set
    assert by["rho offline = influence, sample"]["auc"] == by["influence, global (fixed)"]["auc"]
    for r in rows:
        for k, v in r.items():
            if k.startswith("auc") and not np.isnan(v):
                assert 0 <= v <= 1
    md = out.with_suffix(".md").read_text()
    assert md.count("\n| ") == len(rows) + 1 and "Command: `ci`" in md and "Commit: " in md
    with open(out.with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    meta = json.loads((tmp_path / "scorers_ci.json").read_text())["meta"]
    assert sum(meta["tokens"].values()) > 0 and meta["tokens"]["clean"] < sum(meta["tokens"].values())
    assert out.with_suffix(".png").stat().st_size > 1000
