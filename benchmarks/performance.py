"""The standing performance benchmark: one command per comparison, each rewriting its own section of
results/performance.md (the exact command above its table; the other sections are left as they are).

  python -m benchmarks.performance trl             # plain SFT: tokenclean train.prepare/fit vs TRL's SFTTrainer
  python -m benchmarks.performance self_evolving   # self-evolving (influence, online) / plain SFT, per-part seconds
  python -m benchmarks.performance memory          # scoring peak memory: chunked LM head vs full fp32 logits
  python -m benchmarks.performance topk            # selection.keep_mask global / sample vs a Python sort, one read
  python -m benchmarks.performance all

Every model measurement runs in a fresh subprocess (its own peak RSS, no warm caches from another). Times are wall
seconds and process CPU seconds (all threads): on a shared machine the CPU time moves less with other load than the
wall time, and the load average is written beside each table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "performance.md"
SMOLLM2 = "builtin:smollm2-135m-instruct"
TITLE = "# Performance: tokenclean at every scale\n\nWritten by `python -m benchmarks.performance <part>` " \
        "(benchmarks/performance.py); each part rewrites only its own section.\n"


# -- shared ----------------------------------------------------------------------------------------------------------
def _spawn(part: str, spec: dict, threads: int | None) -> subprocess.Popen:
    """One measurement in a fresh interpreter (its result: the last line of its stdout, JSON). threads: torch's
    intra-op threads there (None: torch's default)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PERF_THREADS=str(threads))
    return subprocess.Popen([sys.executable, "-m", "benchmarks.performance", "_child", part, json.dumps(spec)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _collect(proc: subprocess.Popen, what: str, timeout: int = 7200) -> dict:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{err[-6000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _run_all(jobs: list[tuple[str, str, dict]], threads: int | None, together: bool) -> dict:
    """jobs: (name, part, spec). together: all at once (each then sees the same machine load: the fair way to
    compare on a shared machine), else one after the other."""
    results = {}
    if together:
        procs = [(name, _spawn(part, spec, threads)) for name, part, spec in jobs]
        for name, proc in procs:
            results[name] = _collect(proc, name)
    else:
        for name, part, spec in jobs:
            results[name] = _collect(_spawn(part, spec, threads), name)
    return results


def _child(part: str, spec: dict) -> dict:
    return _collect(_spawn(part, spec, None), part)


def _machine() -> str:
    import numpy
    import torch
    import transformers
    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, numpy {numpy.__version__}; "
            f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) when the part ended")


def _command(argv: list[str]) -> str:
    return " ".join(["python -m benchmarks.performance", *argv])


def write_section(name: str, body: str, out: Path = OUT) -> None:
    """Replace the section `name` of `out` (or append it), keeping every other section."""
    begin, end = f"<!-- performance:{name} -->", f"<!-- /performance:{name} -->"
    text = out.read_text() if out.exists() else TITLE
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(block)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]


# -- (a) plain SFT: tokenclean vs TRL --------------------------------------------------------------------------------
def _sft_data(examples: int, batch: int, max_length: int):
    """The chatterbot examples both trainers see, and tokenclean's plan of steps (one seeded permutation, cut in
    batches): TRL gets the examples in exactly that order with a sequential sampler, so its step i is tokenclean's."""
    from tokenclean.assets import resolve_model
    from tokenclean.config import TrainingConfig
    from tokenclean.data import read_records, tokenize
    from tokenclean.models import load_tokenizer
    from tokenclean.train import plan_steps

    path = resolve_model(SMOLLM2)
    tok = load_tokenizer(path)
    records, _ = read_records("builtin:chatterbot", limit=examples)
    data = tokenize(records, tok, max_length)
    cfg = TrainingConfig(batch_size=batch, micro_batch_size=batch, mixed_precision="no", lr=1e-4, warmup_ratio=0.03)
    return path, tok, data, cfg, plan_steps(len(data), cfg, 0)


def _sft_tokenclean(spec: dict) -> dict:
    import torch

    from tokenclean.config import ModelConfig
    from tokenclean.dist import make_accelerator
    from tokenclean.models import load_model
    from tokenclean.train import fit, prepare

    path, tok, data, cfg, plan = _sft_data(spec["examples"], spec["batch"], spec["max_length"])
    torch.manual_seed(0)
    acc = make_accelerator("no")
    lm = load_model(path, ModelConfig(name_or_path=path), seed=0)
    p = prepare(acc, lm, len(data), cfg, seed=0)
    assert all((a == b).all() for a, b in zip(p.steps, plan))
    marks = []
    t0, c0 = time.perf_counter(), time.process_time()
    stats = fit(acc, p, data.input_ids, data.target, cfg, tok.pad_token_id,
                on_step=lambda i, m: marks.append((time.perf_counter(), time.process_time())))
    return _timing("tokenclean", t0, c0, marks, stats["train_loss"], len(data), spec)


def _sft_trl(spec: dict) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tokenclean.losses import collate

    path, tok, data, cfg, plan = _sft_data(spec["examples"], spec["batch"], spec["max_length"])
    order = np.concatenate(plan)
    rows = []
    for i in order:
        ids, tgt = np.asarray(data.input_ids[int(i)], np.int64), np.asarray(data.target[int(i)], bool)
        rows.append({"input_ids": ids.tolist(), "labels": np.where(tgt, ids, -100).tolist()})
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lm.config.use_cache = False
    out_dir = tempfile.mkdtemp(prefix="perf_trl_")
    args = SFTConfig(output_dir=out_dir, per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
                     max_steps=len(plan), learning_rate=cfg.lr, lr_scheduler_type="linear",
                     warmup_steps=math.ceil(cfg.warmup_ratio * len(plan)), weight_decay=0.0, max_grad_norm=1.0,
                     optim="adamw_torch", adam_epsilon=1e-8, bf16=False, fp16=False, gradient_checkpointing=False,
                     max_length=None, train_sampling_strategy="sequential", logging_steps=1, save_strategy="no",
                     report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    marks, t0c0, batches = [], [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            t0c0.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *a, **k):
            marks.append((time.perf_counter(), time.process_time()))

    trainer = SFTTrainer(model=lm, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Clock()])
    collator = trainer.data_collator

    def recording(examples):
        b = collator(examples)
        batches.append({k: b[k].clone() for k in ("input_ids", "attention_mask", "labels")})
        return b

    trainer.data_collator = recording
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    # sameness: every TRL batch holds tokenclean's step, in its order, with the same trained positions
    same = len(batches) >= len(plan)
    for step, b in zip(plan, batches):
        ref = collate(data.input_ids, data.target, step, tok.pad_token_id)
        attn = b["attention_mask"].bool()
        same &= b["input_ids"].shape == ref["input_ids"].shape and bool((attn == ref["attention_mask"].bool()).all())
        same &= bool((b["input_ids"][attn] == ref["input_ids"][attn]).all())
        same &= bool(((b["labels"] != -100)[:, 1:] == ref["mask"][:, 1:]).all())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    t0, c0 = t0c0[0]
    return {**_timing("trl", t0, c0, marks, losses, len(data), spec), "same_batches": bool(same)}


def _timing(who: str, t0: float, c0: float, marks: list, losses: list, n_examples: int, spec: dict) -> dict:
    walls = [m[0] for m in marks]
    return {"who": who, "steps": len(marks), "examples": n_examples, "seconds": round(walls[-1] - t0, 2),
            "cpu_seconds": round(marks[-1][1] - c0, 2),
            "s_per_step": round((walls[-1] - t0) / len(marks), 3),
            "s_per_step_after_first": round((walls[-1] - walls[0]) / max(len(marks) - 1, 1), 3),
            "cpu_s_per_step": round((marks[-1][1] - c0) / len(marks), 3),
            "losses": [round(float(x), 5) for x in losses],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def part_trl(a, argv) -> None:
    spec = {"examples": a.examples, "batch": a.batch, "max_length": a.max_length}
    order = ["tokenclean", "trl"] + (["trl", "tokenclean"] if a.repeats > 1 else [])
    got = _run_all([(f"{who}{i}", f"sft_{who}", spec) for i, who in enumerate(order)], a.threads, a.together)
    runs = list(got.values())
    for r in runs:
        print(f"{r['who']}: {r['seconds']} s, {r['s_per_step']} s/step, cpu {r['cpu_s_per_step']} s/step", flush=True)
    by = {w: [r for r in runs if r["who"] == w] for w in ("tokenclean", "trl")}
    mean = {w: {k: sum(r[k] for r in rs) / len(rs) for k in ("seconds", "s_per_step", "s_per_step_after_first",
                                                             "cpu_s_per_step")} for w, rs in by.items()}
    tc, trl = by["tokenclean"][0], by["trl"][0]
    diff = max(abs(x - y) for x, y in zip(tc["losses"], trl["losses"]))
    rows = [[r["who"], r["steps"], r["seconds"], r["s_per_step"], r["s_per_step_after_first"], r["cpu_s_per_step"],
             r["peak_rss_mb"]] for r in runs]
    ratio = {k: round(mean["trl"][k] / mean["tokenclean"][k], 2) for k in mean["trl"]}
    lines = [f"## Plain SFT: tokenclean vs TRL SFTTrainer (SmolLM2-135M, {tc['steps']} steps of batch {a.batch})", "",
             f"Command: `{_command(argv)}`", "",
             f"{tc['examples']} chatterbot examples (builtin:chatterbot, read_records + tokenize, max length "
             f"{a.max_length}), one epoch = {tc['steps']} optimiser steps of {a.batch}, fp32 on both (this CPU has no "
             "bf16: tokenclean's `mixed_precision=auto` resolves to fp32), no gradient checkpointing, AdamW lr 1e-4, "
             "linear schedule with the same warm-up step, clipping 1.0. Each trainer in a fresh process, "
             + (f"all {len(runs)} at once (so they share whatever else loads the machine)" if a.together else
                "one after the other, in the order listed")
             + f", torch threads: {a.threads or 'default'}; time from the first step's start to the last step's "
             "end (model loading and data preparation excluded).", "",
             *_table(["trainer", "steps", "seconds", "s/step", "s/step after step 1", "CPU s/step", "peak RSS (MB)"],
                     rows), "",
             f"**TRL / tokenclean: {ratio['s_per_step']}x wall s/step, {ratio['s_per_step_after_first']}x after the "
             f"first step, {ratio['cpu_s_per_step']}x CPU s/step** (means over the runs of each).", "",
             "Sameness: TRL trains on a pre-tokenized dataset (input_ids, labels = input_ids on tokenclean's target "
             "positions, -100 elsewhere) laid out in tokenclean's step order (`train.plan_steps`, seed 0) with "
             "`train_sampling_strategy=sequential`, so step i of both holds the same examples in the same order. "
             f"Checked on every step (TRL's collated batches vs `losses.collate` of the plan): "
             f"**{'identical' if trl['same_batches'] else 'DIFFERENT'}** input ids, padding and trained positions. "
             f"Per-step training loss, first step: tokenclean {tc['losses'][0]}, TRL {trl['losses'][0]}; "
             f"largest difference over the {len(tc['losses'])} steps {diff:.2g}.", "",
             "What differs is the trainers themselves: TRL 1.x runs its own chunked LM head that also computes "
             "per-token entropy and top-1 accuracy for its logs; tokenclean's TokenLoss runs the LM head over the "
             "trained positions only.", "", _machine()]
    write_section("trl", "\n".join(lines), Path(a.out))


# -- (b) self-evolving vs plain SFT ----------------------------------------------------------------------------------
PARTS = {"setup": "data, tokenizer, accelerator", "load": "model load + prepare (per round)",
         "train": "training steps", "eval": "held-out loss", "base_pass": "base-loss pass",
         "reference_pass": "reference-loss pass", "select": "selection and arrays", "checkpoint": "checkpoint write",
         "report": "report + cleaned.parquet"}


def _cli_timed(spec: dict) -> dict:
    """Run the tokenclean command in this process with timers around the Job's building blocks (exclusive time:
    a block's time excludes the blocks it calls), then read the run's manifest."""
    import functools

    from tokenclean import __main__ as cli
    from tokenclean import pipelines
    from tokenclean.pipelines import job as job_mod
    from tokenclean.pipelines import self_evolving

    spent: dict[str, float] = {}
    spent_cpu: dict[str, float] = {}
    stack: list[list] = []

    def timed(name, fn, unless_in=()):
        """Count fn's time (wall, and process CPU) under `name`, less the time of the timed blocks it calls; inside
        a block named in unless_in it counts as part of that block (the held-out loss and the base pass compute
        losses too)."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if any(entry[0] in unless_in for entry in stack):
                return fn(*args, **kwargs)
            stack.append([name, time.perf_counter(), 0.0, time.process_time(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                _, t0, children, c0, children_cpu = stack.pop()
                total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
                spent[name] = spent.get(name, 0.0) + total - children
                spent_cpu[name] = spent_cpu.get(name, 0.0) + total_cpu - children_cpu
                if stack:
                    stack[-1][2] += total
                    stack[-1][4] += total_cpu
        return wrapper

    J = job_mod.Job
    J.__init__ = timed("setup", J.__init__)
    J.train_model = timed("load", J.train_model)
    J.fit = timed("train", J.fit)
    J.evaluate = timed("eval", J.evaluate)
    J.base_signals = timed("base_pass", J.base_signals)
    J.losses = timed("reference_pass", J.losses, unless_in=("eval", "base_pass"))
    J.save_model = timed("checkpoint", J.save_model)
    J.decide = timed("select", J.decide)
    J.save_scored = timed("select", J.save_scored)
    job_mod.finish = timed("report", job_mod.finish)
    if spec.get("plain"):
        self_evolving.run = _plain_sft
    pipelines_run = pipelines.run
    t0 = time.perf_counter()
    run_dir = Path(spec["run_dir"])
    sys.argv = ["tokenclean", *spec["overrides"], f"hydra.run.dir={run_dir}"]
    pipelines.run = timed("total", pipelines_run)
    cli.main()
    wall = time.perf_counter() - t0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    stages = {k: v.get("seconds") for k, v in manifest["stages"].items()}
    steps = sum(v.get("steps", 0) for k, v in manifest["stages"].items() if "." not in k and k != "base_losses")
    for d in (spent, spent_cpu):
        d["total"] = d.get("total", 0.0) + sum(v for k, v in d.items() if k != "total")
    return {"wall": round(wall, 2), "cpu": round(time.process_time(), 2), "parts": {k: round(v, 2) for k, v in
            spent.items()}, "parts_cpu": {k: round(v, 2) for k, v in spent_cpu.items()}, "stages": stages,
            "steps": steps, "eval_loss_after": summary.get("eval_loss_after")}


def _plain_sft(job):
    """Plain SFT on the self-evolving run's pool: the fixed pipeline's final stage with selection=all (one load,
    held-out loss before and after, every response token, one checkpoint), without its warm-up split, so the
    examples and the steps are the self-evolving run's."""
    d = job.data
    with job.run.stage("final") as st:
        model = job.train_model(job.base_dir, "final", len(d.train))
        st.info["eval_base"] = job.evaluate(model.model, "base")
        st.info.update(job.fit(model, d.train, d.train.target, "final"))
        st.info["eval_final"] = job.evaluate(model.model, "final")
        job.save_model(model, "final", job.base_dir)
    n = d.train.n_targets
    return ({"pipeline": "plain", "tokens_scored": 0, "tokens_target": n, "tokens_kept": n, "kept_ratio": 1.0,
             "eval_loss_before": st.info["eval_base"].get("eval_loss"),
             "eval_loss_after": st.info["eval_final"].get("eval_loss"), "checkpoint": str(job.run.path / "final")},
            [(d.train, "")])


VARIANTS = {"plain": (["selection=all"], True),
            "influence": ([], False),
            "online": (["scorer=self_online"], False),
            "influence_eval5": (["eval.every=5"], False),
            "online_eval5": (["scorer=self_online", "eval.every=5"], False)}


def part_self_evolving(a, argv) -> None:
    from tokenclean.config import Config
    # no warm-up split carved (chatterbot carves one for every arm now): the pool its figures were measured on
    base = [f"model={a.model}", "tracking=none", f"data.limit={a.limit}", f"data.eval_size={a.eval_size}",
            "data.warmup_fraction=null", "pipeline=self_evolving", f"pipeline.chunks={a.chunks}"]
    if hasattr(Config(), "cache"):
        base.append("cache=false")       # a score cache hit would skip the base-loss pass
    tmp = tempfile.mkdtemp(prefix="perf_se_")
    results, baseline = {}, {}
    try:
        for g, group in enumerate(a.groups.split(";")):   # a group's runs go at once, each against its own plain
            names = group.split(",")
            jobs = [(f"{n}#{g}", "cli", {"overrides": base + VARIANTS[n][0], "plain": VARIANTS[n][1],
                                         "run_dir": f"{tmp}/{n}{g}"}) for n in names]
            got = _run_all(jobs, a.threads, True)
            for key, r in got.items():
                results[key] = r
                baseline[key] = f"plain#{g}" if "plain" in names else None
                print(key, r["wall"], r["cpu"], r["parts"], r["parts_cpu"], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cols = list(results)
    plains = [results[n] for n in cols if n.startswith("plain#")]

    def ratio(n, field):
        """Against the plain SFT run of its group; a group without one: the mean of the plain runs (marked *)."""
        if baseline[n]:
            return f"**{results[n][field] / results[baseline[n]][field]:.2f}x**"
        if plains:
            return f"**{results[n][field] / (sum(p[field] for p in plains) / len(plains)):.2f}x***"
        return "n/a"

    rows = [["process CPU seconds"] + [results[n]["cpu"] for n in cols],
            ["process wall seconds"] + [results[n]["wall"] for n in cols],
            ["pipeline wall seconds (tokenclean.pipelines.run)"] + [results[n]["parts"].get("total") for n in cols],
            ["**CPU / plain SFT of its group**"] + [ratio(n, "cpu") for n in cols],
            ["**wall / plain SFT of its group**"] + [ratio(n, "wall") for n in cols],
            ["optimiser steps"] + [results[n]["steps"] for n in cols]]

    def part(n, key):
        return f"{results[n]['parts'].get(key, 0.0)} / {results[n]['parts_cpu'].get(key, 0.0)}"

    def other(n, field):
        return round(_other_seconds(results[n][field]), 2)

    rows.append(["parts: wall seconds / CPU seconds"] + [""] * len(cols))
    for key, label in PARTS.items():
        rows.append([f"  {label}"] + [part(n, key) for n in cols])
    rows.append(["  other (hydra, config, manifest, waits)"] +
                [f"{other(n, 'parts')} / {other(n, 'parts_cpu')}" for n in cols])
    rows.append(["held-out loss after"] + [f"{results[n]['eval_loss_after']:.4f}" if results[n]["eval_loss_after"]
                                           else "n/a" for n in cols])
    stage_lines = [f"- {n}: " + ", ".join(f"{k} {v}" for k, v in results[n]["stages"].items()) for n in cols]
    lines = [f"## Self-evolving / plain SFT ({a.model}, data.limit={a.limit}, {a.chunks} chunks)", "",
             f"Command: `{_command(argv)}`", "",
             f"Each column is one `tokenclean` run (`model={a.model} tracking=none data.limit={a.limit} "
             f"data.eval_size={a.eval_size} data.warmup_fraction=null pipeline=self_evolving "
             f"pipeline.chunks={a.chunks}` + its overrides) in a "
             f"fresh process; the runs of a group (#0, #1, ...) go at once, so that the runs compared share the "
             f"machine's load, each against the plain SFT run of its group (* a group without one: against the "
             f"mean of the plain runs); torch threads: "
             f"{a.threads or 'default'}), with timers around the Job's building blocks (exclusive seconds, wall / "
             "process CPU: the wall time stretches with the machine's load, and a run's wall time is shared with "
             "the others of its group only while they run; the CPU time moves much less). The pool is "
             f"{a.limit - a.eval_size} examples: {a.chunks} chunks of {(a.limit - a.eval_size) // a.chunks}, so every "
             "round is whole batches and the rounds together take as many steps as one pass of plain SFT. "
             "plain = the fixed pipeline's final stage with selection=all (one model load, held-out loss before and "
             "after, every response token, one checkpoint) on the same pool, built from the same Job; "
             "influence = the paper's scorer (a reference pass per round); online = `scorer=self_online` "
             "(chosen while training, no reference pass); eval5 = `eval.every=5` (held-out loss of the base and "
             "the last round only, as plain SFT).", "",
             *_table(["", *cols], rows), "",
             *_extra_cpu(results, baseline), "",
             "Per-stage seconds from each run's manifest.json (a round includes its nested stages: round_0 the "
             "base-loss pass, round_t its round_t.select):", "", *stage_lines, "", _machine()]
    # the configuration (264 examples, 5 chunks) in `self_evolving`; any other beside it, in its own section
    default = (a.limit, a.chunks) == (264, 5)
    write_section("self_evolving" if default else f"self_evolving_{a.limit}x{a.chunks}", "\n".join(lines),
                  Path(a.out))


def _other_seconds(parts: dict) -> float:
    """A run's seconds outside every timed part: its total less the parts."""
    return parts["total"] - sum(v for k, v in parts.items() if k not in ("total", "other"))


def _extra_cpu(results: dict, baseline: dict) -> list[str]:
    """Where each run's CPU seconds beyond its group's plain SFT run go, part by part (CPU: the wall time of a part
    depends on what else ran at the time)."""
    groups = {"base-loss pass": ("base_pass",), "reference-loss pass": ("reference_pass",),
              "held-out loss": ("eval",), "training steps": ("train",),
              "loop (loads, checkpoints, arrays, setup, report, other)": ("load", "checkpoint", "select", "setup",
                                                                          "report", "other")}

    def cpu(n, keys):
        c = dict(results[n]["parts_cpu"])
        c["other"] = _other_seconds(c)
        return sum(c.get(k, 0.0) for k in keys)

    lines = []
    for n, plain in baseline.items():
        if plain and n != plain:
            extra = results[n]["cpu"] - results[plain]["cpu"]
            lines.append(f"- {n}: {extra:+.1f} CPU s over {plain}: " + ", ".join(
                f"{label} {cpu(n, keys) - cpu(plain, keys):+.1f}" for label, keys in groups.items()))
    return ["Where the CPU seconds beyond plain SFT go (each part's CPU seconds minus plain's):", "", *lines] \
        if lines else []


# -- (c) scoring peak memory -----------------------------------------------------------------------------------------
def _memory(spec: dict) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tokenclean.assets import resolve_model
    from tokenclean.dist import make_accelerator
    from tokenclean.losses import TokenLoss, collate, token_losses
    from tokenclean.ragged import Ragged

    torch.manual_seed(0)
    vocab = spec["vocab"]
    if vocab == "smollm2":
        lm = AutoModelForCausalLM.from_pretrained(resolve_model(SMOLLM2), dtype=torch.float32)
    else:   # SmolLM2's width, 2 layers, this vocabulary: the LM head is what scales with it
        lm = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=int(vocab), hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
            num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048))
    lm.eval()
    v = lm.config.vocab_size
    rng = np.random.default_rng(0)
    n, length, prompt = spec["examples"], spec["length"], int(spec["length"] * (1 - spec["response"]))
    ids = Ragged.from_list([rng.integers(0, v, length) for _ in range(n)], np.int64)
    target = Ragged.from_list([np.r_[np.zeros(prompt, bool), np.ones(length - prompt, bool)] for _ in range(n)],
                              bool)
    acc = make_accelerator("no")
    with torch.no_grad():
        lm(input_ids=torch.zeros(1, 8, dtype=torch.long))            # warm-up: allocator and kernels
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if spec["kind"] == "chunked":
        token_losses(acc, TokenLoss(lm, spec["chunk"]), ids, target, spec["batch"], 0)
    else:
        with torch.no_grad():
            for lo in range(0, n, spec["batch"]):
                b = collate(ids, target, range(lo, min(lo + spec["batch"], n)), 0)
                logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
                F.cross_entropy(logits[:, :-1].flatten(0, 1), b["input_ids"][:, 1:].flatten(), reduction="none")
                del logits
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"vocab": v, "kind": spec["kind"], "baseline_mb": round(base), "peak_mb": round(peak),
            "scoring_mb": round(peak - base), "seconds": round(time.perf_counter() - t0, 2)}


def part_memory(a, argv) -> None:
    rows = []
    small = a.small_chunk
    for vocab in a.vocabs.split(","):
        got = {}
        for kind, chunk in (("full_logits", a.chunk), ("chunked", a.chunk), ("chunked_small", small)):
            got[kind] = _child("memory", {"vocab": vocab, "kind": kind.replace("_small", ""), "examples": a.examples,
                                          "length": a.length, "response": a.response, "batch": a.batch,
                                          "chunk": chunk})
            print(kind, got[kind], flush=True)
        f, c, cs = got["full_logits"], got["chunked"], got["chunked_small"]
        logits_gb = a.batch * a.length * f["vocab"] * 4 / 2**30
        rows.append([f"{f['vocab']:,}" + (" (SmolLM2-135M)" if vocab == "smollm2" else " (2-layer Llama)"),
                     f"{logits_gb:.2f}", f["baseline_mb"],
                     f"{f['peak_mb']} / {f['scoring_mb']}", f"{c['peak_mb']} / {c['scoring_mb']}",
                     f"**{c['peak_mb'] / f['peak_mb']:.2f}x** / **{c['scoring_mb'] / max(f['scoring_mb'], 1):.2f}x**",
                     f"{cs['peak_mb']} / {cs['scoring_mb']}",
                     f"**{cs['peak_mb'] / f['peak_mb']:.2f}x** / **{cs['scoring_mb'] / max(f['scoring_mb'], 1):.2f}x**",
                     f"{f['seconds']} / {c['seconds']} / {cs['seconds']}"])
    resp = int(a.length * a.response) * a.batch
    lines = ["## Scoring peak memory: chunked LM head vs full fp32 logits", "",
             f"Command: `{_command(argv)}`", "",
             f"{a.examples} examples of {a.length} random tokens ({a.response:.0%} of them response: {resp} response "
             f"positions per batch), batch {a.batch}, fp32, no gradient. chunked = `tokenclean.losses.token_losses` "
             "(TokenLoss: the decoder once, then the LM head and cross-entropy over the response positions only, "
             f"in chunks of `training.loss_chunk_size` positions: the default {a.chunk}, which here holds a whole "
             f"batch, and {small}); full logits = the plain computation (`lm(...).logits.float()` for the whole "
             "batch, then cross-entropy). Peak RSS (ru_maxrss) of a fresh process per cell, as 'peak / scoring': "
             "scoring is the peak minus the peak after loading the model and one warm-up forward (what the pass "
             "itself adds). 128k-262k: SmolLM2's width (576) with 2 layers and that vocabulary, random weights "
             "from a config.", "",
             *_table(["vocabulary", "fp32 logits of one batch (GB)", "model loaded (MB)", "full logits (MB)",
                      f"chunked, {a.chunk} (MB)", "ratio: peak / scoring", f"chunked, {small} (MB)",
                      "ratio: peak / scoring", "seconds: full / chunked / small chunks"], rows), "",
             "Goal: at most 0.5x.", "", _machine()]
    write_section("memory", "\n".join(lines), Path(a.out))


# -- (d) top-k selection ---------------------------------------------------------------------------------------------
def _topk_data(examples: int, tokens: int, seed: int = 0):
    """`examples` examples with `tokens` response tokens in all (each: a prompt of 16-128 tokens, never a
    candidate, then its response), float32 scores (standard normal: as a loss difference, with the ties float32
    has) on the response, NaN elsewhere, as the scorers write them."""
    import numpy as np

    from tokenclean.ragged import Ragged
    rng = np.random.default_rng(seed)
    mean = tokens / examples
    resp = rng.integers(int(mean // 4), int(mean * 7 // 4) + 1, examples)
    while resp.sum() != tokens:                 # exactly `tokens`: +-1 on as many examples as it takes
        d = int(tokens - resp.sum())
        resp[: min(abs(d), examples)] += 1 if d > 0 else -1
    prompt = rng.integers(16, 129, examples)
    lengths = prompt + resp
    offsets = np.zeros(examples + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    pos = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    target = pos >= np.repeat(prompt, lengths)
    scores = np.full(offsets[-1], np.nan, np.float32)
    scores[target] = rng.standard_normal(int(target.sum()), dtype=np.float32)
    return Ragged(scores, offsets), Ragged(target, offsets)


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _best_of_each(fns: dict, repeats: int) -> dict:
    """The best seconds of each function, taking turns (one call of each per round): all share the same load."""
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


TOPK_BEFORE = "e798874"     # the last commit with keep_mask as it was before issue 10, item 5 (the row "before")


def _selection_at(rev: str):
    """tokenclean/selection.py as it was at git revision `rev`, loaded as a module of its own; None where git or
    that revision is missing (a copy without the history)."""
    import types
    try:
        src = subprocess.run(["git", "show", f"{rev}:tokenclean/selection.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType(f"selection_{rev}")
    exec(compile(src, f"{rev}:tokenclean/selection.py", "exec"), module.__dict__)
    return module


def _python_sort_global(values: list, k: int) -> list:
    """The reference code's way: a stable Python sort of (score, position) tuples, highest first; the first k."""
    pairs = [(s, i) for i, s in enumerate(values)]
    return sorted(pairs, key=lambda p: p[0], reverse=True)[:k]


def _python_sort_sample(rows: list, ratio: float) -> list:
    return [_python_sort_global(r, int(math.floor(len(r) * ratio + 1e-9))) for r in rows]


def part_topk(a, argv) -> None:
    import numpy as np

    from tokenclean import selection
    scores, target = _topk_data(a.examples, a.tokens)
    n = int(np.count_nonzero(target.values))
    g = selection.keep_mask(scores, target, "global", a.ratio)
    s = selection.keep_mask(scores, target, "sample", a.ratio)
    assert int(g.values.sum()) == int(selection.kept_count(n, a.ratio))
    fns = {"read": lambda: scores.values.sum(),
           "global": lambda: selection.keep_mask(scores, target, "global", a.ratio),
           "sample": lambda: selection.keep_mask(scores, target, "sample", a.ratio)}
    before = _selection_at(TOPK_BEFORE) if a.old else None
    if before is not None:      # timed in turns with the current one, so both see the same load
        assert np.array_equal(before.keep_mask(scores, target, "global", a.ratio).values, g.values)
        assert np.array_equal(before.keep_mask(scores, target, "sample", a.ratio).values, s.values)
        fns.update(before_global=lambda: before.keep_mask(scores, target, "global", a.ratio),
                   before_sample=lambda: before.keep_mask(scores, target, "sample", a.ratio))
    t = _best_of_each(fns, a.repeats)
    read = t["read"]

    # the reference: a Python sort over (score, position) tuples, on a prefix of the candidates, scaled up
    m = min(a.python_tokens, n)
    cand = scores.values[target.values]
    t_py, _ = _best(lambda: _python_sort_global(cand[:m].tolist(), int(m * a.ratio)), 1)
    scale = (n * math.log(n)) / (m * math.log(m))
    py_global = t_py * scale
    ex_end = int(np.searchsorted(np.cumsum(target.row_sums()), m))       # the examples holding those m tokens
    rows = [scores[i][np.asarray(target[i], bool)].tolist() for i in range(ex_end)]
    m_rows = sum(len(r) for r in rows)
    t_py_s, _ = _best(lambda: _python_sort_sample(rows, a.ratio), 1)
    py_sample = t_py_s * n / m_rows                                          # per-example sorts: linear in n
    rows_200 = cand[: n // 200 * 200].reshape(-1, 200)         # a floor for per sample: sorting rows, nothing else
    t_rows, _ = _best(lambda: np.sort(rows_200, axis=1), a.repeats)

    def row(name, tg, ts, note="", bold="**"):
        return [name, f"{tg:.3f}", f"{ts:.3f}", f"{bold}{tg / read:.0f}x{bold} / {bold}{ts / read:.0f}x{bold}",
                f"{bold}{py_global / tg:.0f}x{bold} / {bold}{py_sample / ts:.0f}x{bold}", note]

    old_rows = []
    if before is not None:
        old_rows.append(row(f"keep_mask before this change (git {TOPK_BEFORE})", t["before_global"],
                            t["before_sample"], f"best of {a.repeats}, in turns with the row above; same masks; "
                            f"this one is {t['before_global'] / t['global']:.2f}x / "
                            f"{t['before_sample'] / t['sample']:.2f}x faster", bold=""))
    if a.old:   # the first implementation (float64 copies, lexsort), kept in tests/ as the equality reference
        from tests.test_selection_speed_paths import simple_keep_mask
        t_old_g, og = _best(lambda: simple_keep_mask(scores, target, "global", a.ratio), 1)
        t_old_s, os_ = _best(lambda: simple_keep_mask(scores, target, "sample", a.ratio), 1)
        assert np.array_equal(og, g.values) and np.array_equal(os_, s.values)
        old_rows.append(["simple keep_mask (float64 copies; lexsort per sample: the tests' reference)",
                         f"{t_old_g:.3f}", f"{t_old_s:.3f}", f"{t_old_g / read:.0f}x / {t_old_s / read:.0f}x", "",
                         "once; same masks"])

    rows = [["one read: `scores.values.sum()`", f"{read:.4f}", f"{read:.4f}", "1x", "", ""],
            row("tokenclean `selection.keep_mask`", t["global"], t["sample"], f"best of {a.repeats}"),
            *old_rows,
            ["Python `sorted` over (score, position) tuples", f"{py_global:.1f}", f"{py_sample:.1f}",
             f"{py_global / read:.0f}x / {py_sample / read:.0f}x", "1x",
             f"measured on the first {m:,} tokens ({t_py:.2f} s; per sample {t_py_s:.2f} s over {ex_end:,} "
             f"examples), scaled by n log n (global) and n (per sample)"]]
    lines = [f"## Top-k selection over {n / 1e6:.1f}M response tokens in {a.examples:,} examples", "",
             f"Command: `{_command(argv)}`", "",
             f"{len(scores.values):,} positions ({n:,} response tokens; prompts of 16-128 tokens are not "
             f"candidates), float32 scores (standard normal) with NaN off the response, keep ratio {a.ratio}; "
             "global = the top floor(n * ratio) of all candidates, sample = of each example's. Seconds, best of "
             f"{a.repeats}, the one read and the keep_masks timed in turns (the Python sort: once).", "",
             *_table(["", "global (s)", "per sample (s)", "x one read (global / sample)",
                      "faster than the Python sort", ""], rows), "",
             "Goals: at most 30x one read, at least 500x faster than the Python sort.", "",
             f"500x faster than the Python sort is {py_global / 500 * 1e3:.0f} ms global "
             f"({py_global / 500 / read:.1f} reads) and {py_sample / 500 * 1e3:.0f} ms per sample "
             f"({py_sample / 500 / read:.1f} reads); numpy's sort alone of the {len(rows_200.ravel()):,} candidates "
             f"as rows of 200 (`np.sort(axis=1)`, SIMD sorting networks) takes {t_rows * 1e3:.0f} ms.", "",
             _machine()]
    write_section("topk", "\n".join(lines), Path(a.out))


# -- (e) a keep-ratio sweep vs one run ---------------------------------------------------------------------------
def part_sweep(a, argv) -> None:
    """One run of the job (score cache off: it computes everything), then the same job as a sweep over keep ratios
    with an empty score cache (its first point computes and caches the base losses and the reference, the others
    reuse them). The built-in model's converted copy is linked into the fresh cache, so neither converts it."""
    from tokenclean.assets import cache_root
    tmp = Path(tempfile.mkdtemp(prefix="perf-sweep-"))
    cache = tmp / "cache"
    cache.mkdir()
    for d in cache_root().iterdir():
        if d.is_dir() and d.name != "scores":
            (cache / d.name).symlink_to(d)
    common = ["tracking=none", *a.overrides]
    env = {**os.environ, "TOKENCLEAN_CACHE": str(cache), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}

    def timed(args):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tokenclean", *args], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - started

    try:
        single = timed([*common, "cache=false", f"hydra.run.dir={tmp / 'single'}"])
        print(f"single run: {single:.0f} s", flush=True)
        ratios = a.ratios.split(",")
        sweep = timed(["-m", *common, f"selection.keep_ratio={a.ratios}", f"hydra.sweep.dir={tmp / 'sweep'}",
                       "hydra.sweep.subdir=${hydra.job.num}"])
        print(f"sweep: {sweep:.0f} s", flush=True)
        rows = []
        for name, d in [("one run (cache off)", tmp / "single")] + \
                [(f"sweep point keep_ratio={r}", tmp / "sweep" / str(i)) for i, r in enumerate(ratios)]:
            stages = json.loads((d / "manifest.json").read_text())["stages"]
            rows.append([name] + [f"{stages[k].get('seconds', 0):.1f}" + (" (cached)" if stages[k].get("cached")
                                                                           else "")
                                  for k in ("base_losses", "reference", "select", "final")])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = ["## A keep-ratio sweep vs one run", "", f"Command: `{_command(argv)}`", "",
             f"The job ({' '.join(common) or 'no overrides'}): first as one run with `cache=false`, then as "
             f"`tokenclean -m selection.keep_ratio={a.ratios}` on an empty score cache, one after the other, each "
             "a fresh process timed from start to exit (process start, data, every stage, the report).", "",
             "| | seconds |", "|---|---|", f"| one run | {single:.0f} |",
             f"| {len(ratios)}-point sweep, score cache on | {sweep:.0f} |",
             f"| **sweep / one run** | **{sweep / single:.2f}x** |",
             f"| without the cache (each point computes everything): {len(ratios)} x one run | "
             f"{len(ratios) * single:.0f} ({len(ratios)}.00x) |", "",
             "Seconds per stage, from each run's manifest ('cached': linked from the score cache; the base-loss "
             "stage runs inside the reference stage, whose seconds include it):", "",
             *_table(["run", "base losses", "reference (incl. base losses)", "select",
                      "final (training + held-out losses)"], rows),
             "", "A sweep point still trains its own final model (its keep ratio changes what it learns from): that "
             "stage bounds what a cache can save. With n points, a sweep costs at least one run plus (n - 1) final "
             "stages.", "", _machine()]
    write_section("sweep", "\n".join(lines), Path(a.out))


# -- command line ----------------------------------------------------------------------------------------------------
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        part, spec = sys.argv[2], json.loads(sys.argv[3])
        if os.environ.get("PERF_THREADS"):
            import torch
            torch.set_num_threads(int(os.environ["PERF_THREADS"]))
        fn = {"sft_tokenclean": _sft_tokenclean, "sft_trl": _sft_trl, "cli": _cli_timed, "memory": _memory}[part]
        result = fn(spec)
        print(json.dumps(result))
        return
    argv = sys.argv[1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["trl", "self_evolving", "memory", "topk", "sweep", "all"])
    ap.add_argument("--out", default=str(OUT))
    g = ap.add_argument_group("trl")
    g.add_argument("--examples", type=int, default=None, help="trl: 240; topk: 50000")
    g.add_argument("--batch", type=int, default=None, help="trl: 8; memory: 4")
    g.add_argument("--max-length", type=int, default=512)
    g.add_argument("--repeats", type=int, default=None, help="trl: 1 run each (2: a second pair, reversed); topk: 5")
    g.add_argument("--threads", type=int, default=1, help="torch threads per measured process (0: torch's default)")
    g.add_argument("--one-at-a-time", dest="together", action="store_false",
                   help="trl: run the trainers one after the other instead of at once")
    g = ap.add_argument_group("self_evolving")
    g.add_argument("--model", default="smollm2")
    g.add_argument("--limit", type=int, default=264)
    g.add_argument("--eval-size", type=int, default=24)
    g.add_argument("--chunks", type=int, default=5)
    g.add_argument("--groups", default="plain,online;plain,influence;online_eval5,influence_eval5",
                   help="runs at once, ';' between groups (~4 GB each with SmolLM2); names: " + ",".join(VARIANTS))
    g = ap.add_argument_group("memory")
    g.add_argument("--vocabs", default="smollm2,128256,262144")
    g.add_argument("--length", type=int, default=384)
    g.add_argument("--response", type=float, default=0.6)
    g.add_argument("--chunk", type=int, default=2048)
    g.add_argument("--small-chunk", type=int, default=256)
    g = ap.add_argument_group("topk")
    g.add_argument("--tokens", type=int, default=10_000_000)
    g.add_argument("--ratio", type=float, default=0.6)
    g.add_argument("--python-tokens", type=int, default=1_000_000)
    g.add_argument("--no-old", dest="old", action="store_false", help="skip timing the previous implementation")
    g = ap.add_argument_group("sweep")
    g.add_argument("--ratios", default="0.4,0.6,0.8")
    g.add_argument("overrides", nargs="*", help="sweep: tokenclean overrides for the job (default: the default job)")
    a = ap.parse_intermixed_args(argv)
    parts = ["trl", "self_evolving", "memory", "topk", "sweep"] if a.part == "all" else [a.part]
    for part in parts:
        b = argparse.Namespace(**vars(a))
        if part == "trl":
            b.examples, b.batch, b.repeats = a.examples or 240, a.batch or 8, a.repeats or 1
        elif part == "memory":
            b.examples, b.batch = a.examples or 8, a.batch or 4
        elif part == "topk":
            b.examples, b.repeats = a.examples or 50_000, a.repeats or 5
        sub = argv if a.part != "all" else [part]
        {"trl": part_trl, "self_evolving": part_self_evolving, "memory": part_memory, "topk": part_topk,
         "sweep": part_sweep}[part](b, sub)


if __name__ == "__main__":
    main()
