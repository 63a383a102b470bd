"""Does cleaning buy task accuracy? Every method trains the same base on the same noisy SFT set built from task data
(benchmarks/task_data.py: training halves of the tasks' validation splits, a known share of responses corrupted), with
the same steps, for several seeds; each final model is scored with lm-evaluation-harness on every document of the
held-out halves.

  python -m benchmarks.accuracy --model smollm2 --tasks sciq arc_easy --per-task 100 --warmup 30 --dev-per-task 50 \
      --seeds 41 42 43 --out results/accuracy_smollm2

Settings are chosen on a dev split carved from the training halves (apart from the warm-up and training records,
never the held-out half): the keep ratio (fixed influence), first_reference (self-evolving influence) and the
soft-weight temperature, each tried with seed 0, the best dev accuracy taken; the choice and the dev scores go to the
results. Every method is compared with full SFT paired over the same documents and seeds (benchmarks/stats.py:
bootstrap 95% interval, minimal detectable effect), on accuracy and on the log-probability margin of the gold answer
over the best distractor; a method that keeps another share of tokens than the keep ratio gets a random control at
its own ratio. A rerun resumes: finished (method, seed) pairs are kept in <out>.json and skipped. Writes <out>.md
(table, per-seed rows, the commands), <out>.json and <out>.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import METHODS, code_commit, commits_line, compose

log = logging.getLogger("benchmarks.accuracy")

# settings chosen on dev: (the method it is tried with, the override, the values); the chosen value goes to every arm
DEV_KNOBS = {
    "keep_ratio": ("fixed (influence)", "selection.keep_ratio", [0.4, 0.6, 0.8]),
    "first_reference": ("self-evolving (influence)", "pipeline.first_reference", ["round0", "warmup"]),
    "temperature": ("soft (influence)", "selection.temperature", [0.25, 0.5, 1.0]),
}
RANDOM_AT = "random at {}'s ratio"


def run(args, command: str) -> dict:
    from benchmarks import task_data
    from tokenclean.assets import resolve_model
    from tokenclean.evaluation import evaluate

    out = Path(args.out)
    work = Path(args.work) / out.name
    data = work / "data"
    if not (data / "meta.json").exists():
        task_data.build(data, tasks=args.tasks, per_task=args.per_task, warmup=args.warmup,
                        noise_rate=args.noise_rate, seed=args.data_seed, dev=args.dev_per_task)
    meta = json.loads((data / "meta.json").read_text())
    state_path = out.with_suffix(".json")
    state = json.loads(state_path.read_text()) if state_path.exists() else {"rows": [], "base": None, "dev": {}}
    state.setdefault("dev", {})
    state["meta"] = {"model": args.model, "tasks": args.tasks, "per_task": args.per_task, "warmup": args.warmup,
                     "noise_rate": args.noise_rate, "data_seed": args.data_seed, "seeds": args.seeds,
                     "dev_per_task": args.dev_per_task, "eval_limit": args.eval_limit, "chunks": args.chunks,
                     "data": meta["counts"], "noise": meta["noise"]["per_kind"],
                     "commands": sorted(set(state.get("meta", {}).get("commands", []) + [command]))}

    def score(checkpoint, root="heldout"):
        return evaluate(checkpoint, args.tasks, limit=args.eval_limit, data_root=str(data / root), batch_size=8,
                        documents=True)

    if state["base"] is None:
        state["base"] = score(resolve_model(compose(args.model, [])[0].model.name_or_path))
        save(state, state_path)
    common = ["data=file", f"data.train={data / 'train.jsonl'}", f"data.warmup={data / 'warmup.jsonl'}",
              "data.eval_size=0", f"data.max_length={args.max_length}", f"pipeline.chunks={args.chunks}",
              *args.extra]
    chosen = {"keep_ratio": f"selection.keep_ratio={args.keep_ratio}"}
    if args.dev_per_task:
        for knob in args.dev_knobs:   # in order: a later knob is tried with the earlier ones' choices
            method, key, values = DEV_KNOBS[knob]
            tried = state["dev"].setdefault(knob, {"method": method, "scores": {}})
            for value in values:
                if str(value) in tried["scores"]:
                    continue
                tag = f"dev-{knob}-{value}"
                cfg, cdict = compose(args.model, [*common, *chosen.values(), *METHODS[method], f"{key}={value}",
                                                  "seed=0", f"name=acc-{tag}"])
                summary = train(cfg, cdict, work / "runs" / tag)
                tried["scores"][str(value)] = score(summary["checkpoint"], "dev")["average"]["acc"]
                if not args.keep_runs:
                    remove_checkpoints(work / "runs" / tag)
                save(state, state_path)
            best = max(values, key=lambda v: tried["scores"][str(v)])   # ties: the first (the tool's default order)
            tried["chosen"] = best
            chosen[knob] = f"{key}={best}"
            save(state, state_path)
    state["meta"]["settings"] = list(chosen.values())
    keep_ratio = float(chosen["keep_ratio"].split("=")[1])
    for seed in args.seeds:
        for name in args.methods:
            kept = run_method(args, state, state_path, work, common, chosen, name, seed, score, [])
            if kept is not None and args.random_controls and abs(kept - keep_ratio) > 0.005 and \
                    name not in ("full", "random"):
                run_method(args, state, state_path, work, common, chosen, RANDOM_AT.format(name), seed, score,
                           ["selection=random", f"selection.keep_ratio={kept:.6f}"])
    state["noise_drops"] = noise_drops(work, state, resolve_model(compose(args.model, [])[0].model.name_or_path))
    save(state, state_path)
    write_report(state, out)
    return state


def run_method(args, state, state_path, work, common, chosen, name, seed, score, overrides) -> float | None:
    """One (method, seed): trained, scored and saved unless done. Returns its kept ratio."""
    done = [r for r in state["rows"] if r["method"] == name and r["seed"] == seed]
    if done:
        return done[0]["kept_ratio"]
    tag = run_tag(name)
    cfg, cdict = compose(args.model, [*common, *chosen.values(), *(overrides or METHODS[name]), f"seed={seed}",
                                      f"name=acc-{tag}-{seed}"])
    started = time.perf_counter()
    summary = train(cfg, cdict, work / "runs" / f"{tag}-s{seed}")
    acc = score(summary["checkpoint"])
    if not args.keep_runs:
        remove_checkpoints(work / "runs" / f"{tag}-s{seed}")
    row = {"method": name, "seed": seed, "commit": code_commit(), "kept_ratio": summary["kept_ratio"], "tasks": acc,
           "seconds": round(time.perf_counter() - started, 1)}
    state["rows"] = [r for r in state["rows"] if (r["method"], r["seed"]) != (name, seed)] + [row]
    save(state, state_path)
    log.info("%s seed %d: average acc %.4f (kept %.3f, %.0f s)", name, seed, acc["average"]["acc"],
             row["kept_ratio"], row["seconds"])
    return row["kept_ratio"]


def train(cfg, cdict, run_dir: Path) -> dict:
    """One arm through the real pipeline, in this process; returns its summary."""
    from tokenclean import pipelines, rundir
    try:
        return pipelines.run(cfg, run_dir, cdict)[1].to_json()
    finally:
        rundir.end_run()


def run_tag(method: str) -> str:
    """A method's run directory name: runs/<tag>-s<seed>."""
    if method.startswith("random at "):
        return "random_at_" + run_tag(method.removeprefix("random at ").removesuffix("'s ratio"))
    return method.split(" ")[0].replace("-", "_")


def remove_checkpoints(run_dir: Path) -> None:
    """Checkpoints are large; the run's arrays, manifest and summary stay."""
    for d in [*run_dir.glob("final"), *run_dir.glob("reference"), *run_dir.glob("round_*/model")]:
        d.unlink() if d.is_symlink() else shutil.rmtree(d, ignore_errors=True)


def noise_drops(work: Path, state: dict, tokenizer_dir: str) -> dict:
    """Which tokens each method drops, from its run's cleaned.parquet and the injected spans (train_noise.jsonl):
    per noise kind, the share of its tokens dropped, and the share of clean response tokens dropped (mean over
    seeds). A token is noise when its characters overlap the injected span. Reads training data only."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = work / "data"
    records = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    spans = [json.loads(x) for x in (data / "train_noise.jsonl").read_text().splitlines()]
    runs = work / "runs"
    full = {r["seed"] for r in state["rows"] if r["method"] == "full"}
    if not full:
        return {}
    # response positions: what full SFT trains on (every response token); the same for every seed
    full_labels = pq.read_table(runs / f"full-s{min(full)}" / "cleaned.parquet").column("labels").to_pylist()
    # a row is matched to its record by its response text (a record the tokenizer step skipped has no row)
    by_text = {r["completion"].strip(): i for i, r in enumerate(records)}
    row_record, is_noise = [], []          # per row of the pool: its record, a bool per response token
    response = [[j for j, y in enumerate(labels) if y != -100] for labels in full_labels]
    for labels, pos in zip(full_labels, response):
        ids = [labels[j] for j in pos]
        text = tok.decode(ids)
        i = next((j for c, j in by_text.items() if c and c in text), None)
        row_record.append(i)
        noise = np.zeros(len(ids), bool)
        if i is not None and spans[i]["noise_span"] is not None:
            comp = records[i]["completion"]
            lead = text.find(comp.strip()) - (len(comp) - len(comp.lstrip()))
            a, b = (x + lead for x in spans[i]["noise_span"])
            ends = [len(tok.decode(ids[:k + 1])) for k in range(len(ids))]
            noise = np.array([st < b and en > a for st, en in zip([0] + ends[:-1], ends)], bool)
        is_noise.append(noise)
    kinds = [(spans[i]["noise_kind"] or "clean") if i is not None else "clean" for i in row_record]
    out = {}
    for method in dict.fromkeys(r["method"] for r in state["rows"]):
        tag = run_tag(method)
        per_seed = []
        for seed in sorted({r["seed"] for r in state["rows"] if r["method"] == method}):
            run = runs / f"{tag}-s{seed}"
            labels = pq.read_table(run / "cleaned.parquet").column("labels").to_pylist()
            order = list(range(len(full_labels)))
            if (run / "chunks.json").exists():    # self-evolving: the rows are in chunk order (pool indices)
                order = [i for c in json.loads((run / "chunks.json").read_text()) for i in c]
            dropped = {k: [0, 0] for k in dict.fromkeys(kinds)}
            dropped["clean tokens"] = [0, 0]
            for row, i in zip(labels, order):
                drop = np.array([row[j] == -100 for j in response[i]], bool)
                noise = is_noise[i]
                if kinds[i] != "clean":
                    dropped[kinds[i]][0] += int(drop[noise].sum())
                    dropped[kinds[i]][1] += int(noise.sum())
                dropped["clean tokens"][0] += int(drop[~noise].sum())
                dropped["clean tokens"][1] += int((~noise).sum())
            per_seed.append({k: d / max(n, 1) for k, (d, n) in dropped.items() if k != "clean"})
        out[method] = {k: float(np.mean([p[k] for p in per_seed])) for k in per_seed[0]}
    return out


def save(state: dict, path: Path) -> None:
    from tokenclean.io import atomic_write_text
    atomic_write_text(path, json.dumps(state, indent=1))


def documents(tasks: dict, names: list[str], field: str) -> np.ndarray:
    """One run's per-document scores over every task, in a fixed order (task, doc_id)."""
    return np.concatenate([[d[field] for d in tasks["documents"][t]] for t in names])


def table(state: dict) -> list[dict]:
    """Per method: mean and std over seeds of each task's acc and their average, the mean margin, and the paired
    comparison with full SFT over the same documents and seeds (benchmarks/stats.py), on acc and on margin."""
    from benchmarks import stats
    names = state["meta"]["tasks"]
    tasks = names + ["average"]
    by = {}
    for r in state["rows"]:
        by.setdefault(r["method"], {})[r["seed"]] = r
    full = by.get("full", {})
    out = []
    for method, rows in by.items():
        seeds = sorted(rows)
        accs = {t: np.array([rows[s]["tasks"][t]["acc"] for s in seeds]) for t in tasks}
        margin = np.array([documents(rows[s]["tasks"], names, "margin").mean() for s in seeds])
        both = [s for s in seeds if s in full]
        paired = {}
        if method != "full" and both:
            for field in ("acc", "margin"):
                paired[field] = stats.paired(np.stack([documents(rows[s]["tasks"], names, field) for s in both]),
                                             np.stack([documents(full[s]["tasks"], names, field) for s in both]))
        out.append({"method": method, "n": len(seeds), "kept_ratio": float(np.mean([rows[s]["kept_ratio"]
                                                                                   for s in seeds])),
                    "acc": {t: (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan)
                            for t, v in accs.items()},
                    "margin": (float(margin.mean()), float(margin.std(ddof=1)) if len(margin) > 1 else math.nan),
                    "vs_full": paired, "seconds": float(np.mean([rows[s]["seconds"] for s in seeds]))})
    return out


def write_report(state: dict, out: Path) -> None:
    meta, rows = state["meta"], table(state)
    names = meta["tasks"]
    tasks = names + ["average"]
    base = state["base"]
    n_docs = sum(len(base["documents"][t]) for t in names)
    dev = state.get("dev") or {}
    lines = [f"# Task accuracy after cleaning: {meta['model']}, noisy SFT from {', '.join(names)}", "",
             "Commands:", "", "```", *meta["commands"], "```", "", commits_line(state["rows"]), "",
             f"Training pool: {sum(c['train'] for c in meta['data'].values())} records "
             f"({', '.join(t + ' ' + str(c['train']) for t, c in meta['data'].items())}), "
             f"noise rate {meta['noise_rate']} "
             f"({', '.join(f'{k} {n}' for k, n in (meta['noise'] or {}).items())} records); "
             f"clean warm-up {sum(c['warmup'] for c in meta['data'].values())} records; dev "
             f"{meta.get('dev_per_task', 0)} documents per task; held-out halves scored on "
             + ("every document" if meta["eval_limit"] is None else f"their first {meta['eval_limit']} documents")
             + f" ({n_docs} in all). Settings: {' '.join(meta.get('settings', []))}; seeds {meta['seeds']} (the seed "
             "changes training order, initialisation and random choices; the data are fixed). acc as lm-eval "
             "reports it, mean ± std over seeds; margin: the gold answer's log-likelihood minus the best "
             "distractor's, mean over documents. 'vs full': the paired difference over the same documents (all "
             "tasks pooled, each document once) and seeds, with its bootstrap 95% interval; 'wins' = difference > "
             "2 se; MDE: the smallest true difference this many documents and seeds detect (80% power).", ""]
    if dev:
        lines += ["Chosen on dev (seed 0, dev average acc; never the held-out half):", ""]
        for knob, d in dev.items():
            tried = ", ".join(f"{v}: {a:.4f}" for v, a in d["scores"].items())
            lines.append(f"- {knob} = {d.get('chosen')} (tried with {d['method']}: {tried})")
        lines.append("")
    lines += ["| method | kept | " + " | ".join(tasks) + " | margin | vs full (acc) | 95% CI | MDE | wins | "
              "vs full (margin) | s/run |", "|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|---|---|",
              "| base (no fine-tuning) | | " + " | ".join(f"{base[t]['acc']:.4f}" for t in tasks) +
              f" | {documents(base, names, 'margin').mean():.3f} | | | | | | |"]
    for r in rows:
        cells = [f"{m:.4f} ± {s:.4f}" if not math.isnan(s) else f"{m:.4f}" for m, s in (r["acc"][t] for t in tasks)]
        p, q = r["vs_full"].get("acc"), r["vs_full"].get("margin")
        vs = ci = mde = wins = vm = ""
        if p:
            vs, ci, mde = f"{p['diff']:+.4f}", f"{p['ci'][0]:+.4f} .. {p['ci'][1]:+.4f}", f"{p['mde']:.4f}"
            wins = "yes" if p["diff"] > 2 * p["se"] else ("worse" if p["diff"] < -2 * p["se"] else "no")
            vm = f"{q['diff']:+.3f} ({q['ci'][0]:+.3f} .. {q['ci'][1]:+.3f})"
        m = r["margin"]
        lines.append(f"| {r['method']} | {r['kept_ratio']:.3f} | " + " | ".join(cells) +
                     f" | {m[0]:.3f} | {vs} | {ci} | {mde} | {wins} | {vm} | {r['seconds']:.0f} |")
    lines += ["", "Per seed (acc):", "", "| method | seed | " + " | ".join(tasks) + " | kept |",
              "|---|---|" + "---|" * len(tasks) + "---|"]
    for r in sorted(state["rows"], key=lambda r: (r["method"], r["seed"])):
        lines.append(f"| {r['method']} | {r['seed']} | " + " | ".join(f"{r['tasks'][t]['acc']:.4f}" for t in tasks)
                     + f" | {r['kept_ratio']:.3f} |")
    drops = state.get("noise_drops") or {}
    if drops:
        kinds = list(next(iter(drops.values())))
        lines += ["", "Which tokens each method drops (from each run's cleaned.parquet and the injected spans in "
                  "train_noise.jsonl; training data only): the share of each noise kind's tokens dropped, and of "
                  "the clean response tokens (those outside any injected span); mean over seeds. A scorer that "
                  "tells noise from signal drops far more of the first columns than of the last.", "",
                  "| method | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for method, d in drops.items():
            lines.append(f"| {method} | " + " | ".join(f"{d[k]:.1%}" for k in kinds) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, base, out.with_suffix(".png"), meta)


def plot(rows, base, path: Path, meta) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(rows))
    ax.bar(x, [r["acc"]["average"][0] for r in rows],
           yerr=[0 if math.isnan(r["acc"]["average"][1]) else r["acc"]["average"][1] for r in rows], capsize=4)
    ax.axhline(base["average"]["acc"], color="grey", ls="--", label="base, no fine-tuning")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['method']}\n(kept {r['kept_ratio']:.2f})" for r in rows], rotation=25, ha="right",
                       fontsize=7)
    lo = min([r["acc"]["average"][0] for r in rows] + [base["average"]["acc"]])
    ax.set_ylim(max(0.0, lo - 0.05), None)
    ax.set_ylabel(f"held-out accuracy, average of {', '.join(meta['tasks'])}")
    ax.set_title(f"{meta['model']}: accuracy after cleaning, mean ± std over seeds {meta['seeds']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--tasks", nargs="+", default=["sciq", "arc_easy"])
    ap.add_argument("--per-task", type=int, default=100, help="training records per task")
    ap.add_argument("--warmup", type=int, default=30, help="clean warm-up records per task (the references)")
    ap.add_argument("--noise-rate", type=float, default=0.3)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[41, 42, 43])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--keep-ratio", type=float, default=0.6, help="used when keep_ratio is not chosen on dev")
    ap.add_argument("--dev-per-task", type=int, default=50, help="dev documents per task (0: choose nothing on dev)")
    ap.add_argument("--dev-knobs", nargs="*", default=list(DEV_KNOBS), choices=list(DEV_KNOBS),
                    help="settings chosen on dev, in this order")
    ap.add_argument("--no-random-controls", dest="random_controls", action="store_false",
                    help="skip the random control at each method's own kept ratio")
    ap.add_argument("--chunks", type=int, default=3, help="self-evolving chunks")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--eval-limit", type=int, default=None, help="held-out documents per task (default: every one)")
    ap.add_argument("--extra", nargs="*", default=[], help="more tokenclean overrides for every arm")
    ap.add_argument("--work", default="runs/accuracy")
    ap.add_argument("--out", default="results/accuracy")
    ap.add_argument("--keep-runs", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    command = "python -m benchmarks.accuracy " + shlex.join(argv if argv is not None else sys.argv[1:])
    run(args, command)


if __name__ == "__main__":
    main()
