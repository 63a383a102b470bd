"""Does cleaning buy task accuracy? Every method trains the same base on the same noisy SFT set built from task data
(benchmarks/task_data.py: training halves of the tasks' validation splits, a known share of responses corrupted), with
the same steps, for several seeds; each final model is scored with lm-evaluation-harness on the held-out halves.

  python -m benchmarks.accuracy --model smollm2 --tasks sciq arc_easy --per-task 100 --warmup 30 \
      --seeds 41 42 43 --eval-limit 100 --out results/accuracy_smollm2

Settings are fixed before any held-out score is seen (the tool's defaults: keep ratio 0.6, lr 1e-4, 1 epoch); the
held-out halves are read only by the final evaluation. A rerun resumes: finished (method, seed) pairs are kept in
<out>.json and skipped. Writes <out>.md (table, per-seed rows, the commands), <out>.json and <out>.png.
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

log = logging.getLogger("benchmarks.accuracy")

MODELS = {"smollm2": "smollm2", "tiny": "tiny"}
# (overrides) per method: every arm runs through the real pipelines, on the same pool and the same warm-up file
METHODS = {
    "full": ["selection=all"],
    "random": ["selection=random"],
    "fixed (influence)": ["scorer=influence"],
    "self-evolving (influence)": ["scorer=influence", "pipeline=self_evolving"],
    "rho (online)": ["scorer=rho"],
    "self_online": ["scorer=self_online"],
    "xtf": ["scorer=xtf"],
}


def compose(model: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    import tokenclean.__main__ as cli
    from tokenclean import scorers
    from tokenclean.config import validate
    with initialize_config_dir(config_dir=cli.conf_dir(), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[f"model={MODELS[model]}", "tracking=none", *overrides])
    typed = OmegaConf.to_object(cfg)
    validate(typed)
    scorers.validate(typed)
    return typed, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def run(args, command: str) -> dict:
    from benchmarks import task_data
    from tokenclean import pipelines
    from tokenclean.assets import resolve_model
    from tokenclean.evaluation import evaluate

    out = Path(args.out)
    work = Path(args.work) / out.name
    data = work / "data"
    if not (data / "meta.json").exists():
        task_data.build(data, tasks=args.tasks, per_task=args.per_task, warmup=args.warmup,
                        noise_rate=args.noise_rate, seed=args.data_seed)
    meta = json.loads((data / "meta.json").read_text())
    state_path = out.with_suffix(".json")
    state = json.loads(state_path.read_text()) if state_path.exists() else {"rows": [], "base": None}
    state["meta"] = {"model": args.model, "tasks": args.tasks, "per_task": args.per_task, "warmup": args.warmup,
                     "noise_rate": args.noise_rate, "data_seed": args.data_seed, "seeds": args.seeds,
                     "keep_ratio": args.keep_ratio, "eval_limit": args.eval_limit, "chunks": args.chunks,
                     "data": meta["counts"], "noise": meta["noise"]["per_kind"],
                     "commands": sorted(set(state.get("meta", {}).get("commands", []) + [command]))}
    score = dict(tasks=args.tasks, limit=args.eval_limit, data_root=str(data / "heldout"), batch_size=8)
    if state["base"] is None:
        state["base"] = evaluate(resolve_model(compose(args.model, [])[0].model.name_or_path), **score)
        save(state, state_path)
    base = ["data=file", f"data.train={data / 'train.jsonl'}", f"data.warmup={data / 'warmup.jsonl'}",
            "data.eval_size=0", f"data.max_length={args.max_length}", f"selection.keep_ratio={args.keep_ratio}",
            f"pipeline.chunks={args.chunks}", *args.extra]
    for seed in args.seeds:
        for name in args.methods:
            if any(r["method"] == name and r["seed"] == seed for r in state["rows"]):
                continue
            tag = name.split(" ")[0].replace("-", "_")
            cfg, cdict = compose(args.model, [*base, *METHODS[name], f"seed={seed}", f"name=acc-{tag}-{seed}"])
            run_dir = work / "runs" / f"{tag}-s{seed}"
            started = time.perf_counter()
            job, summary = pipelines.run(cfg, run_dir, cdict)
            acc = evaluate(summary["checkpoint"], **score)
            row = {"method": name, "seed": seed, "kept_ratio": summary["kept_ratio"], "tasks": acc,
                   "seconds": round(time.perf_counter() - started, 1)}
            state["rows"] = [r for r in state["rows"] if (r["method"], r["seed"]) != (name, seed)] + [row]
            save(state, state_path)
            log.info("%s seed %d: average acc %.4f (kept %.3f, %.0f s)", name, seed, acc["average"]["acc"],
                     row["kept_ratio"], row["seconds"])
            if not args.keep_runs:   # checkpoints are large; the run's arrays and summary stay
                for d in [*run_dir.glob("final"), *run_dir.glob("reference"), *run_dir.glob("round_*/model")]:
                    d.unlink() if d.is_symlink() else shutil.rmtree(d, ignore_errors=True)
    state["noise_drops"] = noise_drops(work, state, resolve_model(compose(args.model, [])[0].model.name_or_path))
    save(state, state_path)
    write_report(state, out)
    return state


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
        tag = method.split(" ")[0].replace("-", "_")
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
    from tokenclean.rundir import atomic_write_text
    atomic_write_text(path, json.dumps(state, indent=1))


def table(state: dict) -> list[dict]:
    """Per method: mean and std over seeds of each task's acc and their average, and the paired difference to full
    (method - full on the same seed): its mean and std, and whether mean > 2 std (the target)."""
    tasks = state["meta"]["tasks"] + ["average"]
    by = {}
    for r in state["rows"]:
        by.setdefault(r["method"], {})[r["seed"]] = r
    full = by.get("full", {})
    out = []
    for method, rows in by.items():
        seeds = sorted(rows)
        accs = {t: np.array([rows[s]["tasks"][t]["acc"] for s in seeds]) for t in tasks}
        paired = [rows[s]["tasks"]["average"]["acc"] - full[s]["tasks"]["average"]["acc"] for s in seeds if s in full]
        d = np.array(paired)
        out.append({"method": method, "n": len(seeds), "kept_ratio": float(np.mean([rows[s]["kept_ratio"]
                                                                                   for s in seeds])),
                    "acc": {t: (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan)
                            for t, v in accs.items()},
                    "vs_full": (float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else math.nan) if len(d)
                    else None,
                    "seconds": float(np.mean([rows[s]["seconds"] for s in seeds]))})
    return out


def write_report(state: dict, out: Path) -> None:
    meta, rows = state["meta"], table(state)
    tasks = meta["tasks"] + ["average"]
    base = state["base"]
    lines = [f"# Task accuracy after cleaning: {meta['model']}, noisy SFT from {', '.join(meta['tasks'])}", "",
             "Commands:", "", "```", *meta["commands"], "```", "",
             f"Training pool: {sum(c['train'] for c in meta['data'].values())} records "
             f"({', '.join(t + ' ' + str(c['train']) for t, c in meta['data'].items())}), "
             f"noise rate {meta['noise_rate']} "
             f"({', '.join(f'{k} {n}' for k, n in (meta['noise'] or {}).items())} records); "
             f"clean warm-up {sum(c['warmup'] for c in meta['data'].values())} records; "
             f"held-out halves scored on their first {meta['eval_limit']} documents per task. Keep ratio "
             f"{meta['keep_ratio']}, seeds {meta['seeds']} (the seed changes training order, initialisation and random "
             "choices; the data are fixed). acc as lm-eval reports it; mean ± std over seeds; 'vs full' is the "
             "paired per-seed difference of the average (method - full), mean ± std; 'wins' = mean > 2 std.", "",
             "| method | kept | " + " | ".join(tasks) + " | vs full | wins | s/run |",
             "|---|---|" + "---|" * len(tasks) + "---|---|---|",
             "| base (no fine-tuning) | | " + " | ".join(f"{base[t]['acc']:.4f}" for t in tasks) + " | | | |"]
    for r in rows:
        cells = [f"{m:.4f} ± {s:.4f}" if not math.isnan(s) else f"{m:.4f}" for m, s in (r["acc"][t] for t in tasks)]
        vs = r["vs_full"]
        wins = "" if vs is None or r["method"] == "full" or math.isnan(vs[1]) else \
            ("yes" if vs[0] > 2 * vs[1] else "no")
        vs_txt = "" if vs is None or r["method"] == "full" else f"{vs[0]:+.4f} ± {vs[1]:.4f}"
        lines.append(f"| {r['method']} | {r['kept_ratio']:.3f} | " + " | ".join(cells) +
                     f" | {vs_txt} | {wins} | {r['seconds']:.0f} |")
    lines += ["", "Per seed (average acc):", "", "| method | seed | " + " | ".join(tasks) + " | kept |",
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
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--tasks", nargs="+", default=["sciq", "arc_easy"])
    ap.add_argument("--per-task", type=int, default=100, help="training records per task")
    ap.add_argument("--warmup", type=int, default=30, help="clean warm-up records per task (the references)")
    ap.add_argument("--noise-rate", type=float, default=0.3)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[41, 42, 43])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--keep-ratio", type=float, default=0.6)
    ap.add_argument("--chunks", type=int, default=3, help="self-evolving chunks")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--eval-limit", type=int, default=100, help="held-out documents per task")
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
