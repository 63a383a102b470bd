"""A controlled experiment where the reference can know the truth: noisy two-digit addition (issue 18, item 5).

    python -m benchmarks.arithmetic --seeds 1 2 3 --out results/arithmetic_smollm2

The task: `What is 44 + 15?` -> `44 + 15 = 59.`, problems drawn with a fixed seed from every pair of two-digit
numbers, split into disjoint sets: a clean warm-up set (the references learn from it), the training pool (a known
share of responses carry a wrong sum, and another share a span of random words after the answer), a dev set
(held-out loss; the keep ratio is chosen on it) and the test set, scored only by the final evaluation. Every arm
trains the same base (SmolLM2-135M-Instruct) on the same pool with the same steps through the real pipelines; the
**oracle** is full SFT with exactly the injected noise tokens masked (the upper bound).

Test scores come from lm-evaluation-harness on two local tasks: `arith_em` (greedy generation, exact match of the
number after "=") and `arith_mc` (the gold sum against four distractors, gold +-1 and +-10; acc, and the
log-probability margin of the gold over the best distractor as a continuous measure). Every comparison with full
SFT is paired over the same test problems and seeds (benchmarks/stats.py). A rerun resumes: finished (arm, seed)
pairs are kept in <out>.json and skipped. Writes <out>.md and <out>.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import stats
from benchmarks.common import code_commit, commits_line, compose, package_versions

log = logging.getLogger("benchmarks.arithmetic")

# (overrides) per arm; every arm also gets the common overrides of `run` (the pool, the warm-up file, the recipe).
# "keep" marks the arms whose keep ratio is the one chosen on dev.
ARMS = {   # in the order they run (each seed runs every arm): the comparison that matters most first
    "full": ["selection=all"],
    "oracle": ["selection=all"],                      # + the injected noise tokens masked (run_arm)
    "oracle (false digits only)": ["selection=all"],  # + only the false digits and the random words masked: a wrong
                                                      # sum's digits that match the truth stay trained
    "fixed (influence)": ["scorer=influence"],
    "fixed (influence > 0)": ["scorer=influence", "selection=threshold", "selection.threshold=0"],  # no ratio: drop
                                                      # what the reference finds less likely than the base does
    "self-evolving (influence, warmup)": ["scorer=influence", "pipeline=self_evolving",
                                          "pipeline.first_reference=warmup"],
    "self-evolving (influence, round0)": ["scorer=influence", "pipeline=self_evolving"],
    "random": ["selection=random"],
    "soft (influence)": ["scorer=influence", "selection=soft"],
    "rho (online)": ["scorer=rho"],
    "self_online": ["scorer=self_online"],
    "entropy": ["scorer=entropy"],
    "xtf": ["scorer=xtf"],
    "random at xtf's ratio": ["selection=random"],    # + selection.keep_ratio = what xtf kept on the same seed
    "full (warm-up, then pool)": ["selection=all", "pipeline=self_evolving", "pipeline.first_reference=warmup"],
}
TASKS = ("arith_em", "arith_mc")
GROUPS = ("false digits", "wrong-sum digits that match the truth", "random words", "right-sum digits",
          "right-sum digits, carry", "right-sum digits, no carry", "other clean tokens")
WORDS = ("river", "purple", "quietly", "banana", "window", "seven", "cloud", "jumping", "marble", "forest")


def problem(a: int, b: int, shown: int | None = None) -> dict:
    s = a + b if shown is None else shown
    return {"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {s}."}


def build(out: Path, seed: int, n_warmup: int, n_pool: int, n_dev: int, n_test: int, wrong_rate: float,
          words_rate: float, eos: str) -> dict:
    """The data files, the noise spans of the pool (characters of the completion) and the two lm-eval tasks."""
    from tokenclean.data import render_plain
    from tokenclean.io import atomic_write_text

    rng = np.random.default_rng(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    order = rng.permutation(len(pairs))
    take = iter(order)
    sets = {name: [pairs[next(take)] for _ in range(n)] for name, n in
            (("warmup", n_warmup), ("pool", n_pool), ("dev", n_dev), ("test", n_test))}
    n_wrong, n_words = round(wrong_rate * n_pool), round(words_rate * n_pool)
    kinds = ["wrong_sum"] * n_wrong + ["random_words"] * n_words + ["clean"] * (n_pool - n_wrong - n_words)
    kinds = [kinds[i] for i in rng.permutation(n_pool)]
    pool, noise = [], []
    for (a, b), kind in zip(sets["pool"], kinds):
        rec, span = problem(a, b), None
        if kind == "wrong_sum":
            delta = int(rng.choice([d for d in range(-10, 11) if d != 0]))
            rec = problem(a, b, a + b + delta)
            start = rec["completion"].index("= ") + 2
            span = (start, len(rec["completion"]) - 1)          # the digits of the wrong sum
        elif kind == "random_words":
            extra = " " + " ".join(rng.choice(WORDS, size=3, replace=False))
            span = (len(rec["completion"]), len(rec["completion"]) + len(extra))
            rec["completion"] += extra
        pool.append(rec)
        noise.append({"kind": kind, "span": span})
    out.mkdir(parents=True, exist_ok=True)

    def jsonl(rows):
        return "".join(json.dumps(r) + "\n" for r in rows)

    atomic_write_text(out / "warmup.jsonl", jsonl(problem(a, b) for a, b in sets["warmup"]))
    atomic_write_text(out / "pool.jsonl", jsonl(pool))
    atomic_write_text(out / "pool_noise.jsonl", jsonl(noise))
    atomic_write_text(out / "dev.jsonl", jsonl(problem(a, b) for a, b in sets["dev"]))
    for split in ("dev", "test"):
        docs = []
        for a, b in sets[split]:
            s = a + b
            text = render_plain([{"role": "user", "content": f"What is {a} + {b}?"}], eos, add_generation_prompt=True)
            choices = [f" {x}." for x in (s, s + 1, s - 1, s + 10, s - 10)]
            docs.append({"text": text, "mc_text": f"{text}{a} + {b} =", "answer": str(s), "choices": choices,
                         "gold": 0})
        atomic_write_text(out / "tasks" / f"{split}.jsonl", jsonl(docs))
        for task in TASKS:
            atomic_write_text(out / "tasks" / f"{task}_{split}.yaml", task_yaml(task, split, out / "tasks", eos))
    meta = {"seed": seed, "counts": {k: len(v) for k, v in sets.items()},
            "noise": {k: kinds.count(k) for k in ("wrong_sum", "random_words", "clean")}}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))
    return meta


def task_yaml(task: str, split: str, where: Path, eos: str) -> str:
    head = (f"task: {task}_{split}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {where / f'{split}.jsonl'}\ntest_split: test\n")
    if task == "arith_em":
        return head + (
            "output_type: generate_until\ndoc_to_text: '{{text}}'\ndoc_to_target: '{{answer}}'\n"
            f"generation_kwargs:\n  until: [{json.dumps(eos)}, \"\\n\"]\n  do_sample: false\n  max_gen_toks: 16\n"
            "filter_list:\n  - name: answer\n    filter:\n      - function: regex\n"
            "        regex_pattern: '=\\s*(-?\\d+)'\n      - function: take_first\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return head + ("output_type: multiple_choice\ndoc_to_text: '{{mc_text}}'\ndoc_to_choice: choices\n"
                   "doc_to_target: gold\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
                   "    aggregation: mean\n    higher_is_better: true\n")


def response_noise(examples, tokenizer, noise: list[dict], records: list[dict]):
    """Per pool example, bools per response token: `noisy` (it overlaps the injected noise span, characters of the
    completion: the oracle masks these), `answer` (the digits of the sum shown, right or wrong) and `false` (a digit
    of a wrong sum that differs from the true sum's digit in its place: the tokens that teach a falsehood; a wrong
    sum shares the other digits with the truth, e.g. 59 shown as 56)."""
    noisy, answer, false = [], [], []
    for i in range(len(examples)):
        ids, tgt = examples.input_ids[i], examples.target[i]
        resp = [int(x) for x in ids[tgt]]
        ends = [len(tokenizer.decode(resp[:k + 1])) for k in range(len(resp))]
        starts = [0] + ends[:-1]
        comp = records[i]["completion"]
        eq = comp.index("= ") + 2
        digits = (eq, eq + len(comp[eq:].split(".")[0]))
        span = noise[i]["span"]
        noisy.append(np.array([span is not None and s < span[1] and e > span[0] for s, e in zip(starts, ends)]))
        answer.append(np.array([s < digits[1] and e > digits[0] for s, e in zip(starts, ends)]))
        shown = comp[digits[0]:digits[1]]
        a, b = (int(x) for x in records[i]["prompt"].removeprefix("What is ").rstrip("?").split(" + "))
        true = str(a + b)
        bad = {digits[0] + j for j, c in enumerate(shown) if len(shown) != len(true) or c != true[j]} \
            if noise[i]["kind"] == "wrong_sum" else set()
        false.append(np.array([any(s <= c < e for c in bad) for s, e in zip(starts, ends)]))
    return noisy, answer, false


def run_arm(name: str, cfg, cdict, run_dir: Path, oracle_keep=None) -> dict:
    """One arm through the real pipeline. The oracle's keep mask is committed as its select stage, the way the
    pipeline commits its own, then the fixed pipeline trains on it."""
    from tokenclean import pipelines, rundir, selection
    from tokenclean.pipelines import fixed
    from tokenclean.pipelines.artefacts import POOL
    from tokenclean.pipelines.job import finish, setup
    try:
        if oracle_keep is None:
            return pipelines.run(cfg, run_dir, cdict)[1].to_json()
        job = setup(cfg, run_dir, cdict)
        if not job.run.done("select"):
            with job.run.stage("select") as st:
                keep = oracle_keep(job)
                job.save_scored(None, keep, POOL)
                st.info.update(selection.summary(keep, job.data.train.target))
        summary, parts = fixed.run(job)
        return finish(job, summary, parts).to_json()
    finally:
        rundir.end_run()


def trained_share(run_dir: Path, examples, noisy, answer, false, carry) -> dict:
    """The share of each kind of response token a run trained on (weights summed for soft weights), from the
    keep arrays it stored (self-evolving: every round's, placed back in pool order; round 0 of
    first_reference=round0 trains every token). Right-sum digits are also split by whether the problem carries in
    the units (`carry`, per pool example): a scorer that drops what is hard rather than what is wrong drops those."""
    from tokenclean.ragged import Ragged
    n, target = len(noisy), examples.target
    kept = [None] * n
    if (run_dir / "chunks.json").exists():
        first = first_round(run_dir)
        for t, part in enumerate(json.loads((run_dir / "chunks.json").read_text())):
            path = run_dir / f"round_{t + first}" / "keep"
            if Ragged.exists(path):
                keep = Ragged.load(path, mmap=False)
                for j, i in enumerate(part):
                    kept[i] = np.asarray(keep[j], np.float64)[target[i]]
    else:
        keep = Ragged.load(run_dir / "keep", mmap=False)
        kept = [np.asarray(keep[i], np.float64)[target[i]] for i in range(n)]
    kept = [np.ones(len(noisy[i])) if k is None else k for i, k in enumerate(kept)]
    groups = {g: [] for g in GROUPS}
    for i in range(n):
        k, z, a, f = kept[i], noisy[i], answer[i], false[i]
        groups["false digits"].append(k[f])
        groups["wrong-sum digits that match the truth"].append(k[z & a & ~f])
        groups["random words"].append(k[z & ~a])
        groups["right-sum digits"].append(k[~z & a])
        groups["right-sum digits, carry" if carry[i] else "right-sum digits, no carry"].append(k[~z & a])
        groups["other clean tokens"].append(k[~z & ~a])
    return {g: float(np.concatenate(v).mean()) if sum(len(x) for x in v) else float("nan")
            for g, v in groups.items()}


def first_round(run_dir: Path) -> int:
    """1 when the self-evolving run started from the warm-up model (no round_0), else 0."""
    return 0 if (run_dir / "round_0").exists() else 1


def score_evidence(run_dir: Path, examples, noisy, answer, false, carry) -> dict:
    """Why a scorer keeps what it keeps: its mean score and the base's and reference's mean loss on the digits of
    right sums (all, and those of problems that carry in the units) and on the false digits of wrong sums, and the
    AUC of its score ranking the right above the false (fixed pipeline runs, which store these arrays for the whole
    pool)."""
    from tokenclean.ragged import Ragged
    out = {}
    arrays = {"score": run_dir / "scores", "base loss": run_dir / "losses/base",
              "reference loss": run_dir / "losses/reference"}
    for label, path in arrays.items():
        if not Ragged.exists(path):
            continue
        a = Ragged.load(path, mmap=False)
        right, wrong, right_carry = [], [], []
        for i in range(len(answer)):
            v = np.asarray(a[i], np.float64)[examples.target[i]]
            right.append(v[answer[i] & ~noisy[i]])
            right_carry.append(right[-1] if carry[i] else v[:0])
            wrong.append(v[false[i]])
        right, wrong, right_carry = np.concatenate(right), np.concatenate(wrong), np.concatenate(right_carry)
        out[label] = {"right": float(np.nanmean(right)), "wrong": float(np.nanmean(wrong)),
                      "right, carry": float(np.nanmean(right_carry))}
        if label == "score":
            out["auc right vs wrong"] = stats.auc(right, wrong)
    return out


def run(args, command: str) -> dict:
    from tokenclean.assets import resolve_model
    from tokenclean.data import read_conversations, tokenize
    from tokenclean.evaluation import evaluate
    from tokenclean.io import atomic_write_text
    from tokenclean.models import load_tokenizer

    out, work = Path(args.out), Path(args.work)
    data = work / "data"
    base_dir = resolve_model(compose(args.model, [])[0].model.name_or_path)
    tokenizer = load_tokenizer(base_dir)
    if not (data / "meta.json").exists():
        build(data, args.data_seed, args.warmup, args.pool, args.dev, args.test, args.wrong_rate, args.words_rate,
              tokenizer.eos_token)
    meta = json.loads((data / "meta.json").read_text())
    state_path = out.with_suffix(".json")
    state = json.loads(state_path.read_text()) if state_path.exists() else {"rows": [], "base": None, "dev": {}}
    state["meta"] = {**meta, "data_dir": str(data), "model": args.model, "seeds": args.seeds, "epochs": args.epochs,
                     "wrong_rate": args.wrong_rate, "words_rate": args.words_rate, "chunks": args.chunks,
                     "commands": sorted(set(state.get("meta", {}).get("commands", []) + [command]))}

    def save():
        atomic_write_text(state_path, json.dumps(state, indent=1))

    def score(checkpoint, split="test"):
        return evaluate(checkpoint, [f"{t}_{split}" for t in TASKS], include_path=str(data / "tasks"),
                        batch_size=args.eval_batch_size, documents=True)

    common = ["data=file", f"data.train={data / 'pool.jsonl'}", f"data.warmup={data / 'warmup.jsonl'}",
              f"data.eval={data / 'dev.jsonl'}", "data.template=plain", f"data.max_length={args.max_length}",
              f"training.epochs={args.epochs}", f"pipeline.chunks={args.chunks}", *args.extra]
    if state["base"] is None:
        state["base"] = score(base_dir)
        save()
    records = [json.loads(x) for x in (data / "pool.jsonl").read_text().splitlines()]
    noise = [json.loads(x) for x in (data / "pool_noise.jsonl").read_text().splitlines()]
    # the pool as every arm tokenizes it (no eval or warm-up split is carved from it: both are files)
    examples = tokenize(read_conversations(str(data / "pool.jsonl"))[0], tokenizer, args.max_length, "plain")
    assert len(examples) == len(records) and examples.n_truncated == 0, "every pool record must be one whole example"
    noisy, answer, false = response_noise(examples, tokenizer, noise, records)
    carry = [units_carry(r["prompt"]) for r in records]

    def oracle_keep(job, only_false=False):
        """Every response token but the injected noise (only_false: but the false digits and the random words)."""
        if job.data.train.fingerprint() != examples.fingerprint():
            raise RuntimeError("the oracle's pool differs from the one its noise spans were mapped on")
        drop = [f | (z & ~a) for z, a, f in zip(noisy, answer, false)] if only_false else noisy
        keep = examples.target.values.copy()
        keep[keep] = ~np.concatenate(drop)
        return examples.target.like(keep)

    # the keep ratio, chosen on the dev set (held-out loss is not the measure: dev exact match is) with seed 0
    if args.dev_ratios and "keep_ratio" not in state["dev"]:
        for ratio in args.dev_ratios:
            key = str(ratio)
            if key in state["dev"].get("scores", {}):
                continue
            cfg, cdict = compose(args.model, [*common, *ARMS["fixed (influence)"], "seed=0",
                                              f"selection.keep_ratio={ratio}", f"name=arith-dev-{ratio}"])
            summary = run_arm("dev", cfg, cdict, work / "runs" / f"dev-{ratio}")
            acc = score(summary["checkpoint"], "dev")
            state["dev"].setdefault("scores", {})[key] = {t: acc[f"{t}_dev"] for t in TASKS}
            cleanup(work / "runs" / f"dev-{ratio}")
            save()
        best = max(args.dev_ratios, key=lambda r: (state["dev"]["scores"][str(r)]["arith_em"]["exact_match,answer"],
                                                    -abs(r - 0.6)))
        state["dev"]["keep_ratio"] = best
        save()
    # the same dev score for the sign rule (influence > 0), reported beside the ratios: it has no ratio to choose
    if args.dev_ratios and "influence > 0" not in state["dev"].get("scores", {}):
        cfg, cdict = compose(args.model, [*common, *ARMS["fixed (influence > 0)"], "seed=0", "name=arith-dev-sign"])
        summary = run_arm("dev", cfg, cdict, work / "runs" / "dev-sign")
        acc = score(summary["checkpoint"], "dev")
        state["dev"]["scores"]["influence > 0"] = {t: acc[f"{t}_dev"] for t in TASKS}
        cleanup(work / "runs" / "dev-sign")
        save()
    if args.report:   # the token analysis again for every row, from the arrays its run left; nothing is trained
        for row in state["rows"]:
            tag = "".join(c if c.isalnum() else "_" for c in row["arm"]).strip("_")
            run_dir = work / "runs" / f"{tag}-s{row['seed']}"
            row["tokens_trained"] = trained_share(run_dir, examples, noisy, answer, false, carry)
            row["evidence"] = score_evidence(run_dir, examples, noisy, answer, false, carry)
        write_report(state, out)
        return state
    keep_ratio = state["dev"].get("keep_ratio", args.keep_ratio)
    for seed in args.seeds:
        for name in args.arms:
            if any(r["arm"] == name and r["seed"] == seed for r in state["rows"]):
                continue
            tag = "".join(c if c.isalnum() else "_" for c in name).strip("_")
            run_dir = work / "runs" / f"{tag}-s{seed}"
            ratio = keep_ratio
            if name.startswith("random at "):   # a random control at another arm's own kept ratio
                other = name.removeprefix("random at ").removesuffix("'s ratio")
                ratio = next((r["kept_ratio"] for r in state["rows"] if r["arm"] == other and r["seed"] == seed),
                             None)
                if ratio is None:
                    log.warning("%s: no %s run for seed %d yet; skipped", name, other, seed)
                    continue
            cfg, cdict = compose(args.model, [*common, *ARMS[name], f"selection.keep_ratio={ratio}",
                                              f"seed={seed}", f"name=arith-{tag}-{seed}"])
            started = time.perf_counter()
            oracle = {"oracle": oracle_keep, "oracle (false digits only)": lambda job: oracle_keep(job, True)}
            summary = run_arm(name, cfg, cdict, run_dir, oracle.get(name))
            row = {"arm": name, "seed": seed, "commit": code_commit(), "versions": package_versions(),
                   "kept_ratio": summary["kept_ratio"],
                   "eval_loss_dev": summary.get("eval_loss_after"), "test": score(summary["checkpoint"]),
                   "seconds": round(time.perf_counter() - started, 1)}
            if name == "fixed (influence)":   # the reference itself: how well does it know the task?
                row["reference_test"] = score(run_dir / "reference")
            row["tokens_trained"] = trained_share(run_dir, examples, noisy, answer, false, carry)
            row["evidence"] = score_evidence(run_dir, examples, noisy, answer, false, carry)
            state["rows"] = [r for r in state["rows"] if (r["arm"], r["seed"]) != (name, seed)] + [row]
            save()
            em = row["test"]["arith_em_test"]["exact_match,answer"]
            log.info("%s seed %d: exact match %.3f (kept %.3f, %.0f s)", name, seed, em, row["kept_ratio"],
                     row["seconds"])
            if not args.keep_runs:
                cleanup(run_dir)
    write_report(state, out)
    return state


def cleanup(run_dir: Path) -> None:
    """Checkpoints are large; the run's arrays, manifest and summary stay."""
    for d in [*run_dir.glob("final"), *run_dir.glob("reference"), *run_dir.glob("round_*/model")]:
        d.unlink() if d.is_symlink() else shutil.rmtree(d, ignore_errors=True)


def doc_scores(row_test: dict, task: str, field: str) -> np.ndarray:
    return np.array([d[field] for d in row_test["documents"][f"{task}_test"]], np.float64)


def write_report(state: dict, out: Path) -> None:
    """The table: per arm, mean ± std over seeds of exact match, MC acc and margin; paired vs full over the same
    problems and seeds (bootstrap 95% interval, minimal detectable effect); share of the full -> oracle gap closed;
    which tokens each arm trained on."""
    from tokenclean.io import atomic_write_text
    meta, rows = state["meta"], state["rows"]
    by = {}
    for r in rows:
        by.setdefault(r["arm"], {})[r["seed"]] = r
    measures = (("exact match", "arith_em", "exact_match"), ("MC acc", "arith_mc", "acc"),
                ("MC margin", "arith_mc", "margin"))
    full = by.get("full", {})
    oracle = by.get("oracle", {})
    lines = [f"# Noisy arithmetic, where the reference can know the truth: {meta['model']}", "",
             "Commands:", "", "```", *meta["commands"], "```", "", commits_line(state["rows"]), "",
             f"Data (seed {meta['seed']}): {meta['counts']['warmup']} clean warm-up problems, a pool of "
             f"{meta['counts']['pool']} ({meta['noise']['wrong_sum']} with a wrong sum, "
             f"{meta['noise']['random_words']} with three random words after the answer, {meta['noise']['clean']} "
             f"clean), {meta['counts']['dev']} dev and {meta['counts']['test']} test problems, all disjoint. "
             f"{meta['epochs']} epochs per training stage, seeds {sorted({r['seed'] for r in rows})}. "
             f"Keep ratio {state['dev'].get('keep_ratio', 'default')} ({dev_choice(state['dev'])}).", "",
             "Test scores: mean ± std over seeds. 'vs full': the paired difference of exact match over the same "
             "problems and seeds, bootstrap 95% interval (documents and seeds resampled), and the smallest effect "
             "this size detects (MDE, 80% power), over the seeds the arm and full share; 'wins' = difference > 2 se. "
             "'gap closed' = (arm - full) / (oracle - full) of exact match, both over the seeds the three share.", "",
             "| arm | seeds | kept | exact match | MC acc | MC margin | vs full (EM) | 95% CI | MDE | wins |"
             " gap closed | s/run |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = state["base"]
    lines.append("| base (no fine-tuning) | | | " + " | ".join(
        f"{np.mean([d[f] for d in base['documents'][f'{t}_test']]):.3f}" for _, t, f in measures) + " | | | | | | |")

    def mean_over(arm_rows, t, f):
        return np.array([doc_scores(r["test"], t, f).mean() for r in arm_rows.values()])

    def gap_on(seeds):   # oracle - full, exact match, over these seeds (None without both)
        common = sorted(set(seeds) & set(full) & set(oracle))
        if not common:
            return None
        return float(np.mean([doc_scores(oracle[s]["test"], "arith_em", "exact_match").mean()
                              - doc_scores(full[s]["test"], "arith_em", "exact_match").mean() for s in common]))

    gap = gap_on(full)
    summary = {}
    for arm, arm_rows in by.items():
        cells = []
        for _, t, f in measures:
            v = mean_over(arm_rows, t, f)
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}")
        seeds = sorted(set(arm_rows) & set(full))
        vs = ci = mde = wins = closed = ""
        if arm != "full" and seeds:
            a = np.stack([doc_scores(arm_rows[s]["test"], "arith_em", "exact_match") for s in seeds])
            b = np.stack([doc_scores(full[s]["test"], "arith_em", "exact_match") for s in seeds])
            p = stats.paired(a, b)
            summary[arm] = p
            vs, ci, mde = f"{p['diff']:+.3f}", f"{p['ci'][0]:+.3f} .. {p['ci'][1]:+.3f}", f"{p['mde']:.3f}"
            wins = "yes" if p["diff"] > 2 * p["se"] else ("worse" if p["diff"] < -2 * p["se"] else "no")
            if gap_on(seeds):
                closed = f"{p['diff'] / gap_on(seeds):.0%}"
        kept = np.mean([r["kept_ratio"] for r in arm_rows.values()])
        secs = np.mean([r["seconds"] for r in arm_rows.values()])
        lines.append(f"| {arm} | {len(arm_rows)} | {kept:.3f} | " + " | ".join(cells)
                     + f" | {vs} | {ci} | {mde} | {wins} | {closed} |"
                     f" {secs:.0f} |")
    state["paired"] = summary
    if full and oracle:
        lines += ["", f"The noise hurts: oracle - full = {gap:+.3f} exact match (paired: "
                  f"{summary['oracle']['ci'][0]:+.3f} .. {summary['oracle']['ci'][1]:+.3f})."
                  if "oracle" in summary else ""]
    carry = carries(meta)
    if carry is not None:
        lines += ["", f"Exact match on the test problems with a carry in the units ({carry.mean():.0%} of them) and "
                  "without (mean over seeds):", "", "| arm | with a carry | without |", "|---|---|---|"]
        for arm, arm_rows in by.items():
            em = np.stack([doc_scores(r["test"], "arith_em", "exact_match") for r in arm_rows.values()])
            lines.append(f"| {arm} | {em[:, carry].mean():.3f} | {em[:, ~carry].mean():.3f} |")
    refs = [r["reference_test"] for r in rows if "reference_test" in r]
    if refs:
        em = [np.mean([d["exact_match"] for d in x["documents"]["arith_em_test"]]) for x in refs]
        lines += ["", f"The warm-up reference alone (fixed pipeline's, one per seed): test exact match "
                  f"{np.mean(em):.3f} (seeds: {', '.join(f'{x:.3f}' for x in em)})."]
    groups = [g for g in GROUPS if any(g in r["tokens_trained"] for r in rows)]
    lines += ["", "Which tokens each arm trained on (share kept, weights summed for soft weights; mean over seeds; "
              "training data only):", "", "| arm | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for arm, arm_rows in by.items():
        lines.append(f"| {arm} | " + " | ".join(
            f"{np.nanmean([r['tokens_trained'].get(g, np.nan) for r in arm_rows.values()]):.1%}" for g in groups)
            + " |")
    lines += ["", "(Rows that ran before the carry split have no carry columns: 'nan'.)"]
    ev = [(arm, r["evidence"]) for arm, arm_rows in by.items() for r in arm_rows.values() if r.get("evidence")]
    if ev:
        lines += ["", "Scores and losses on the digits of right sums and on the false digits of wrong sums "
                  "(fixed-pipeline runs, which store the arrays for the whole pool; mean over seeds):", "",
                  "| arm | measure | right-sum digits | of them, carry | false digits | AUC right > false |",
                  "|---|---|---|---|---|---|"]
        seen = {}
        for arm, e in ev:
            seen.setdefault(arm, []).append(e)
        for arm, es in seen.items():
            for label in ("score", "base loss", "reference loss"):
                if label in es[0]:
                    auc = f"{np.mean([e['auc right vs wrong'] for e in es]):.3f}" if label == "score" else ""
                    cells = [np.nanmean([e[label].get(k, np.nan) for e in es]) for k in ("right", "right, carry",
                                                                                          "wrong")]
                    lines.append(f"| {arm} | {label} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {auc} |")
    lines += ["", "Per seed (test exact match):", "", "| arm | seed | exact match | MC acc | kept | s | commit |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["arm"], r["seed"])):
        lines.append(f"| {r['arm']} | {r['seed']} | {doc_scores(r['test'], 'arith_em', 'exact_match').mean():.3f} | "
                     f"{doc_scores(r['test'], 'arith_mc', 'acc').mean():.3f} | {r['kept_ratio']:.3f} | "
                     f"{r['seconds']:.0f} | {r.get('commit', '0e6f117')} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    atomic_write_text(out.with_suffix(".json"), json.dumps(state, indent=1))


def carries(meta: dict) -> np.ndarray | None:
    """Per test problem (in document order): does adding its units digits carry? None without the data."""
    path = Path(meta.get("data_dir", "")) / "tasks" / "test.jsonl"
    if not path.is_file():
        return None
    return np.array([units_carry(json.loads(x)["text"]) for x in path.read_text().splitlines()])


def units_carry(text: str) -> bool:
    """Does the problem in `text` ("What is A + B?") carry when its units digits are added?"""
    a, b = re.search(r"What is (\d+) \+ (\d+)\?", text).groups()
    return int(a) % 10 + int(b) % 10 >= 10


def dev_choice(dev: dict) -> str:
    if not dev.get("scores"):
        return "not tuned"
    tried = ", ".join(f"{k}: {v['arith_em']['exact_match,answer']:.3f}" for k, v in dev["scores"].items())
    return f"the keep ratio chosen on dev exact match with fixed influence, seed 0: {tried}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.arithmetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--warmup", type=int, default=240, help="clean warm-up problems")
    ap.add_argument("--pool", type=int, default=320, help="training pool")
    ap.add_argument("--dev", type=int, default=100)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--wrong-rate", type=float, default=0.4, help="share of the pool with a wrong sum")
    ap.add_argument("--words-rate", type=float, default=0.1, help="share of the pool with random words appended")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=4, help="self-evolving chunks")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--keep-ratio", type=float, default=0.6, help="used when --dev-ratios is empty")
    ap.add_argument("--dev-ratios", type=float, nargs="*", default=[0.4, 0.6, 0.8],
                    help="keep ratios tried on dev (fixed influence, seed 0); the best is used by every ratio arm")
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--extra", nargs="*", default=[], help="more tokenclean overrides for every arm")
    ap.add_argument("--work", default="runs/arithmetic")
    ap.add_argument("--out", default="results/arithmetic_smollm2")
    ap.add_argument("--keep-runs", action="store_true")
    ap.add_argument("--report", action="store_true",
                    help="train nothing: recompute the token analysis of every finished row from its run's arrays and "
                         "rewrite the report")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    run(args, "python -m benchmarks.arithmetic " + shlex.join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
