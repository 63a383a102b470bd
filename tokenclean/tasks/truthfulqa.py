"""TruthfulQA MC1/MC2 (lm-eval's truthfulqa_mc1 / truthfulqa_mc2) on BIG-bench's copy of the questions, offline.

BIG-bench 1.0.0 ships TruthfulQA's questions (``benchmark_tasks/truthful_qa/questions.json``: 299 of the 817, with
their true, false and best answers); `python -m tokenclean.fetch truthfulqa` (``make eval-data``) puts that one file
in tokenclean's data directory. `load` turns each question into the document lm-eval's tasks read from the hub's
``truthful_qa/multiple_choice``, built the way that data set was built from the same answer lists:

- ``mc1_targets``: the best answer first (label 1), then every false answer (label 0);
- ``mc2_targets``: every true answer (label 1), then every false answer (label 0).

The task YAMLs next to this file are lm-eval's own (the same 6-shot QA prompt, target 0, acc), and MC2's score is
lm-eval's formula (`process_results_mc2`, a copy of lm_eval/tasks/truthfulqa/utils.py's, which imports sacrebleu
and rouge_score at the top). BIG-bench's ``task_mc.json`` (2-5 choices per question) is its own shortened variant and
is not used. The file carries BIG-bench's canary GUID: evaluation only, never train on it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

QUESTIONS = "truthful_qa/questions.json"


def source(data_root: str | None = None) -> Path:
    """<data_root>/truthful_qa/questions.json when there is one (a tree of your own), else the fetched file."""
    from tokenclean import fetch
    if data_root and (Path(data_root) / QUESTIONS).is_file():
        return Path(data_root) / QUESTIONS
    return fetch.require("truthfulqa")


def documents(questions: dict) -> list[dict]:
    """BIG-bench's questions.json -> lm-eval's truthful_qa/multiple_choice documents, in file order."""
    docs = []
    for q in questions["examples"]:
        true, false, best = q["True answers"], q["False answers"], q["Best answer"]
        docs.append({
            "question": q["Question"],
            "category": q["Category"],
            "mc1_targets": {"choices": [best, *false], "labels": [1] + [0] * len(false)},
            "mc2_targets": {"choices": [*true, *false], "labels": [1] * len(true) + [0] * len(false)},
        })
    return docs


def load(data_root: str | None = None, **_):
    """The validation split (the only one lm-eval's tasks use). lm-eval passes the task's metadata as keyword
    arguments: data_root is the one used."""
    from datasets import Dataset, DatasetDict

    with open(source(data_root), encoding="utf-8") as f:
        docs = documents(json.load(f))
    return DatasetDict({"validation": Dataset.from_list(docs)})


def process_results_mc2(doc, results):
    """lm-eval's MC2: the normalised probability mass of the true answers (lm_eval/tasks/truthfulqa/utils.py)."""
    ll, _ = zip(*results)
    ll = np.array(ll)
    probs = np.exp(ll)
    probs_norm = probs / np.sum(probs)
    labels = np.array(doc["mc2_targets"]["labels"])
    pm_true = np.sum(probs_norm[labels == 1])
    return {"acc": pm_true}
