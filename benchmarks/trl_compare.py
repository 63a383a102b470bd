"""Plain SFT: tokenclean's train.prepare/fit against TRL's SFTTrainer on the same batches (SmolLM2-135M), timed
per step; rewrites its section of results/performance.md.

  python -m benchmarks.trl_compare                 # 240 chatterbot examples, batch 8, both trainers at once
  python -m benchmarks.trl_compare --repeats 2 --one-at-a-time

Every trainer runs in a fresh subprocess (its own peak RSS, no warm caches from another). Times are wall seconds and
process CPU seconds (all threads): on a shared machine the CPU time moves less with other load than the wall time,
and the load average is written beside the table.
"""
from __future__ import annotations

import argparse
import math
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    MODELS,
    PERFORMANCE,
    child_main,
    code_commit,
    command,
    machine,
    run_children,
    table,
    write_section,
)

MODULE = "trl_compare"
SMOLLM2 = MODELS["smollm2"].name_or_path


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


def run(a, argv) -> None:
    spec = {"examples": a.examples, "batch": a.batch, "max_length": a.max_length}
    order = ["tokenclean", "trl"] + (["trl", "tokenclean"] if a.repeats > 1 else [])
    got = run_children("benchmarks.trl_compare", [(f"{who}{i}", f"sft_{who}", spec) for i, who in enumerate(order)],
                       a.threads, a.together)
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
             f"Command: `{command(MODULE, argv)}`", "", f"Commit: {code_commit()}.", "",
             f"{tc['examples']} chatterbot examples (builtin:chatterbot, read_records + tokenize, max length "
             f"{a.max_length}), one epoch = {tc['steps']} optimiser steps of {a.batch}, fp32 on both (this CPU has no "
             "bf16: tokenclean's `mixed_precision=auto` resolves to fp32), no gradient checkpointing, AdamW lr 1e-4, "
             "linear schedule with the same warm-up step, clipping 1.0. Each trainer in a fresh process, "
             + (f"all {len(runs)} at once (so they share whatever else loads the machine)" if a.together else
                "one after the other, in the order listed")
             + f", torch threads: {a.threads or 'default'}; time from the first step's start to the last step's "
             "end (model loading and data preparation excluded).", "",
             *table(["trainer", "steps", "seconds", "s/step", "s/step after step 1", "CPU s/step", "peak RSS (MB)"],
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
             "trained positions only.", "", f"Machine: {machine()}."]
    write_section("trl", "\n".join(lines), Path(a.out))


def main(argv=None) -> None:
    if child_main({"sft_tokenclean": _sft_tokenclean, "sft_trl": _sft_trl}):
        return
    argv = list(argv if argv is not None else sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=240)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1, help="1 run each (2: a second pair, reversed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per measured process (0: torch's default)")
    ap.add_argument("--one-at-a-time", dest="together", action="store_false",
                    help="run the trainers one after the other instead of at once")
    ap.add_argument("--out", default=str(PERFORMANCE))
    run(ap.parse_args(argv), argv)


if __name__ == "__main__":
    main()
