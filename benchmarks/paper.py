"""The paper's comparison in one command: every arm fine-tunes the same base on the identical pool with the paper's
recipe (conf/experiment/paper.yaml: LoRA r=64, lr 1e-4 linear, 1 epoch, batch 48, top 60% globally, 5 chunks), and
each final model is scored with lm-evaluation-harness on the paper's tasks that exist offline.

  python -m benchmarks.paper --model /models/Llama-3.2-3B --pool sharegpt --warmup /data/warmup.jsonl \
      --arms full,random,rho,fixed,self_evolving --seeds 42 --out results/paper_llama3b

Arms (the conf/experiment/paper_*_<arm> presets): full (every response token), random (a seeded 60%), rho (the
paper's Rho baseline: the influence score ranked within each sample), fixed (fixed-model Token Cleaning),
self_evolving (the reference code's HEAD: round 0 trains on chunk D_0 whole), self_evolving_published (the run behind
the paper's numbers: the warm-up model is the first reference). The pool is builtin:sharegpt (`make data`) or a data
file, optionally a seeded random subset (--pool-size: data.sample); the warm-up set is --warmup FILE (the paper's
separate 10k) or, without one, a --warmup-fraction carved from the pool in every arm alike. Tasks: MMLU 5-shot,
ARC-Challenge, HellaSwag, BoolQ, TruthfulQA MC1/MC2 (`make eval-data`) 0-shot. Every arm is compared with full SFT
paired over the same documents and seeds (benchmarks/stats.py through benchmarks/accuracy.py's table). A rerun
resumes: finished (arm, seed) pairs are kept in <out>.json and skipped. Writes <out>.md, <out>.json and <out>.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

from benchmarks import accuracy
from benchmarks.common import MODELS, commits_line, compose, model_path

log = logging.getLogger("benchmarks.paper")

ARMS = {
    "full": ["selection=all"],
    "random": ["selection=random"],
    "rho": ["selection=sample"],
    "fixed": ["scorer=influence", "selection=global"],
    "self_evolving": ["pipeline=self_evolving"],
    "self_evolving_published": ["pipeline=self_evolving", "pipeline.first_reference=warmup"],
}
TASKS = ["mmlu", "arc_challenge", "hellaswag", "boolq", "truthfulqa_mc1", "truthfulqa_mc2"]
PRECISION = {"bf16": ["model.dtype=bfloat16", "training.mixed_precision=bf16"],
             "fp32": ["model.dtype=float32", "training.mixed_precision=no"]}


def _list(text: str) -> list[str]:
    return [x for x in text.replace(",", " ").split() if x]


def precision(choice: str) -> str:
    if choice != "auto":
        return choice
    import torch
    return "bf16" if torch.cuda.is_available() else "fp32"   # bf16 on a CPU only adds overhead


def overrides(args) -> list[str]:
    """The tokenclean overrides every arm shares: the paper's recipe, the model, the pool, the warm-up set."""
    model = model_path(args.model) if args.model in MODELS else str(Path(args.model).expanduser().resolve())
    pool = "builtin:sharegpt" if args.pool == "sharegpt" else str(Path(args.pool).expanduser().resolve())
    out = ["experiment=paper", f"model.name_or_path={model}", f"data.train={pool}", "eval.tasks=[]",
           *PRECISION[precision(args.precision)]]
    if args.pool_size:
        out += [f"data.sample={args.pool_size}", "data.limit=null"]   # drawn from the whole pool
    if args.warmup:
        out.append(f"data.warmup={Path(args.warmup).expanduser().resolve()}")
    else:
        out.append(f"data.warmup_fraction={args.warmup_fraction}")
    return out + list(args.extra)


def run(args, command: str) -> dict:
    from tokenclean.evaluation import evaluate

    out = Path(args.out)
    work = Path(args.work) / out.name
    state_path = out.with_suffix(".json")
    state = json.loads(state_path.read_text()) if state_path.exists() else {"rows": [], "base": None}
    common = overrides(args)
    cfg, _ = compose(None, common)
    state["meta"] = {"model": args.model, "pool": args.pool, "pool_size": args.pool_size, "warmup": args.warmup,
                     "warmup_fraction": None if args.warmup else args.warmup_fraction, "tasks": args.tasks,
                     "seeds": args.seeds, "arms": args.arms, "eval_limit": args.eval_limit,
                     "precision": precision(args.precision), "settings": common,
                     "commands": sorted(set(state.get("meta", {}).get("commands", []) + [command]))}

    def score(checkpoint):
        return evaluate(checkpoint, args.tasks, limit=args.eval_limit, batch_size=args.eval_batch_size,
                        device=args.device, dtype="bfloat16" if precision(args.precision) == "bf16" else "float32",
                        documents=True)

    if state["base"] is None:
        from tokenclean.assets import resolve_model
        state["base"] = score(resolve_model(cfg.model.name_or_path))
        accuracy.save(state, state_path)
    harness = SimpleNamespace(model=None, keep_runs=args.keep_runs)   # what accuracy.run_method reads of its args
    for seed in args.seeds:
        for arm in args.arms:
            accuracy.run_method(harness, state, state_path, work, common, {}, arm, seed, score, ARMS[arm])
    accuracy.save(state, state_path)
    write_report(state, out)
    return state


def write_report(state: dict, out: Path) -> None:
    meta, rows = state["meta"], accuracy.table(state)
    names = meta["tasks"]
    tasks = names + ["average"]
    base = state["base"]
    n_docs = sum(len(base["documents"][t]) for t in names)
    pool = "builtin:sharegpt" if meta["pool"] == "sharegpt" else meta["pool"]
    warm = meta["warmup"] or f"a {meta['warmup_fraction']} fraction carved from the pool (the same in every arm)"
    lines = [f"# The paper's comparison: {meta['model']} on {pool}", "", "Commands:", "", "```", *meta["commands"],
             "```", "", commits_line(state["rows"]), "",
             f"Pool: {pool}" + (f", a seeded random {meta['pool_size']}" if meta["pool_size"] else "")
             + f"; warm-up set: {warm}. Recipe: conf/experiment/paper.yaml with `{' '.join(meta['settings'])}` "
             f"({meta['precision']}). Tasks: {', '.join(names)}, "
             + ("every document" if meta["eval_limit"] is None else f"the first {meta['eval_limit']} documents of each")
             + f" ({n_docs} in all; mmlu 5-shot, the rest 0-shot). Seeds {meta['seeds']}. acc as lm-eval reports it "
             "(truthfulqa_mc2: the true answers' probability mass), mean ± std over seeds; 'average' is the mean over "
             "the tasks (mmlu counted once). 'vs full': the paired difference over the same documents (every task's "
             "documents pooled) and seeds with its bootstrap 95% interval; 'wins' = difference > 2 se; MDE: the "
             "smallest true difference these documents and seeds detect (80% power).", "",
             "| arm | kept | " + " | ".join(tasks) + " | vs full (acc) | 95% CI | MDE | wins | s/run |",
             "|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|",
             "| base (no fine-tuning) | | " + " | ".join(f"{base[t]['acc']:.4f}" for t in tasks) + " | | | | | |"]
    for r in rows:
        cells = [f"{m:.4f} ± {s:.4f}" if not math.isnan(s) else f"{m:.4f}" for m, s in (r["acc"][t] for t in tasks)]
        p = r["vs_full"].get("acc")
        vs = ci = mde = wins = ""
        if p:
            vs, ci, mde = f"{p['diff']:+.4f}", f"{p['ci'][0]:+.4f} .. {p['ci'][1]:+.4f}", f"{p['mde']:.4f}"
            wins = "yes" if p["diff"] > 2 * p["se"] else ("worse" if p["diff"] < -2 * p["se"] else "no")
        lines.append(f"| {r['method']} | {r['kept_ratio']:.3f} | " + " | ".join(cells)
                     + f" | {vs} | {ci} | {mde} | {wins} | {r['seconds']:.0f} |")
    lines += ["", "Per seed (acc):", "", "| arm | seed | " + " | ".join(tasks) + " | kept | commit |",
              "|---|---|" + "---|" * len(tasks) + "---|---|"]
    for r in sorted(state["rows"], key=lambda r: (r["method"], r["seed"])):
        lines.append(f"| {r['method']} | {r['seed']} | " + " | ".join(f"{r['tasks'][t]['acc']:.4f}" for t in tasks)
                     + f" | {r['kept_ratio']:.3f} | {r.get('commit', '')} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    from tokenclean.io import atomic_write_text
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    accuracy.plot(rows, base, out.with_suffix(".png"), meta)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.paper", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help=f"a local HF checkpoint directory, or {', '.join(MODELS)}")
    ap.add_argument("--pool", default="sharegpt", help="sharegpt (builtin:sharegpt, `make data`) or a data file")
    ap.add_argument("--pool-size", type=int, default=None, help="a seeded random subset of the pool (data.sample)")
    ap.add_argument("--warmup", default=None, help="the warm-up set (a data file) the references learn from")
    ap.add_argument("--warmup-fraction", type=float, default=0.1,
                    help="without --warmup: carve this fraction of the pool out as the warm-up set, in every arm")
    ap.add_argument("--arms", type=_list, default=list(ARMS)[:5], help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--tasks", type=_list, default=TASKS, help="comma-separated lm-eval task names")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--eval-limit", "--limit", type=int, default=None, help="documents per task (default: all)")
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--device", default=None, help="lm-eval's device (default: cuda if there is one, else cpu)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="auto: the paper's bf16 on a GPU, fp32 on a CPU")
    ap.add_argument("--extra", nargs="*", default=[], help="more tokenclean overrides for every arm")
    ap.add_argument("--work", default="runs/paper")
    ap.add_argument("--out", default="results/paper")
    ap.add_argument("--keep-runs", action="store_true", help="keep every arm's checkpoints")
    args = ap.parse_args(argv)
    bad = [a for a in args.arms if a not in ARMS]
    if bad or not args.arms:
        ap.error(f"unknown arms {bad}; of: {', '.join(ARMS)}")
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    run(args, "python -m benchmarks.paper " + shlex.join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
