"""Distributed runs on this machine: the same tiny self-evolving job on 1 process and on 2 (DDP, ZeRO-2, ZeRO-3 with
the weight matrices really sharded) over gloo, launched as tests/test_distributed.py launches them
(`accelerate launch --config_file launch/<config>.yaml ... -m tokenclean`); wall and pipeline seconds, and how far
each 2-process run's keep masks and weights are from the 1-process run's. Rewrites its section of <out>.md (the
rest of the file, written by hand, stays).

  python -m benchmarks.distributed --out results/distributed              # 2 repeats of each, interleaved

"wall" is the whole launch (start-up, imports, process-group set-up included); "pipeline" is the run itself
(summary.json "seconds"). Every run gets a fresh run directory; the score cache is off (cache=false), so every run
computes every stage.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    ROOT,
    code_commit,
    command,
    launch_command,
    launch_environment,
    provenance,
    table,
    write_section,
)

TITLE = "# Distributed runs on CPU: 1 process vs DDP, ZeRO-2, ZeRO-3 (gloo)\n"
ROUNDS = 3
JOB = ["model=tiny", "tracking=none", "pipeline=self_evolving", f"pipeline.chunks={ROUNDS}", "data.limit=200",
       "training.micro_batch_size=2", "training.loss_chunk_size=64", "cache=false"]   # tests/test_distributed.py's
ZERO3 = str(ROOT / "launch" / "deepspeed" / "zero3.json")
# name -> (launch file, launcher arguments)
CONFIGS = {
    "1 process (launch/single.yaml)": ("single.yaml", []),
    "DDP, 2 processes (launch/ddp.yaml)": ("ddp.yaml", ["--num_processes", "2"]),
    "ZeRO-2, 2 processes (launch/zero2.yaml)": ("zero2.yaml", ["--num_processes", "2"]),
    "ZeRO-3, 2 processes (launch/zero3_json.yaml + deepspeed/zero3.json: weights sharded)":
        ("zero3_json.yaml", ["--num_processes", "2", "--deepspeed_config_file", ZERO3]),
}


def launch(env: dict, config: str, launcher_args: list[str], run_dir: Path, log) -> float:
    cmd = launch_command(config, launcher_args) + JOB + [f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): see {log.name}")
    return time.perf_counter() - t0


def compare(ref: Path, run: Path) -> dict:
    """Keep masks (every round after the first) and weights (every round) of `run` against `ref`."""
    from safetensors.numpy import load_file
    masks = all(np.array_equal(np.load(ref / f"round_{t}" / "keep.values.npy"),
                               np.load(run / f"round_{t}" / "keep.values.npy")) for t in range(1, ROUNDS))
    rel = absolute = 0.0
    for t in range(ROUNDS):
        a, b = (load_file(str(d / f"round_{t}" / "model" / "model.safetensors")) for d in (ref, run))
        assert a.keys() == b.keys()
        for k in a:
            d = a[k].astype(np.float64) - b[k].astype(np.float64)
            rel = max(rel, float(np.linalg.norm(d) / max(np.linalg.norm(a[k]), 1e-30)))
            absolute = max(absolute, float(np.abs(d).max()))
    s_ref, s_run = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    return {"masks_equal": masks, "rel_fro": rel, "abs_max": absolute,
            "eval_loss": (s_ref["eval_loss_after"], s_run["eval_loss_after"])}


def main(argv=None) -> None:
    argv = list(argv if argv is not None else sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each configuration, interleaved")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "distributed")
    a = ap.parse_args(argv)
    commit, started = code_commit(), time.perf_counter()
    work = a.work or Path(tempfile.mkdtemp(prefix="distributed-"))
    cache = work / "cache"
    env = launch_environment(cache)
    subprocess.run([sys.executable, "-c", "from tokenclean.assets import resolve_model; resolve_model('builtin:tiny')"],
                   env=env, check=True, cwd=ROOT)
    times = {name: [] for name in CONFIGS}
    dirs = {}
    with open(work / "launch.log", "w") as log:
        for r in range(a.repeats):
            for i, (name, (config, args)) in enumerate(CONFIGS.items()):
                run_dir = work / f"run_{i}_{r}"
                wall = launch(env, config, args, run_dir, log)
                pipeline = json.loads((run_dir / "summary.json").read_text())["seconds"]
                times[name].append((wall, pipeline))
                dirs.setdefault(name, run_dir)
                print(f"{name} #{r}: wall {wall:.1f} s, pipeline {pipeline:.1f} s", flush=True)
    ref = dirs[next(iter(CONFIGS))]
    s_ref = json.loads((ref / "summary.json").read_text())
    pool = s_ref["pool"]
    rows_t, rows_c = [], []
    for name, ts in times.items():
        w, p = [x[0] for x in ts], [x[1] for x in ts]
        rows_t.append([name, f"{min(w):.1f} / {statistics.median(w):.1f}",
                       f"{min(p):.1f} / {statistics.median(p):.1f}"])
        if dirs[name] != ref:
            c = compare(ref, dirs[name])
            rows_c.append([name, "equal" if c["masks_equal"] else "**DIFFERENT**", f"{c['rel_fro']:.1e}",
                           f"{c['abs_max']:.1e}", f"{c['eval_loss'][1]:.6f} (1 process: {c['eval_loss'][0]:.6f})"])
    lines = ["## 1 process vs DDP, ZeRO-2, ZeRO-3", "",
             *provenance(command("distributed", argv), commit),
             f"The job (tests/test_distributed.py's): `{' '.join(JOB)}`: a pool of {pool['examples']} examples "
             f"({s_ref['tokens_target']:,} response tokens) in {ROUNDS} rounds, {pool['warmup_examples']} more carved "
             "as a warm-up set (unused: round 0 trains on every token of its chunk), 64 held out, micro-batch 2 "
             "(gradient accumulation), LM-head chunks of 64. Each configuration ran "
             f"{a.repeats} times, interleaved; min / median seconds. Wall: the whole `accelerate launch` command; "
             "pipeline: the run itself (summary.json `seconds`, after start-up, imports and process-group set-up). "
             f"Whole benchmark: {time.perf_counter() - started:.0f} s.", "",
             *table(["command", "wall min / median (s)", "pipeline min / median (s)"], rows_t), "",
             "Every 2-process run against the 1-process run (the first run of each; tests/test_distributed.py "
             "allows 1e-4 relative Frobenius and 1e-3 absolute per element):", "",
             *table(["run", "keep masks, rounds 1-2", "largest per-tensor relative Frobenius difference, 3 rounds",
                     "largest element difference", "held-out loss after"], rows_c), "",
             "The tiny model (0.2M parameters) is all overhead: on 2 cores, 2 processes are not faster than 1, and "
             "ZeRO adds its bookkeeping (ZeRO-3 with real sharding gathers every weight matrix at every forward). "
             "These runs check correctness and plumbing; speed-ups need a model whose compute dominates and real "
             "devices. The first DeepSpeed start on a new machine also compiles its shm comm op once (about a "
             "minute; cached in ~/.cache/torch_extensions)."]
    write_section("run", "\n".join(lines), a.out.with_suffix(".md"), title=TITLE)


if __name__ == "__main__":
    main()
