"""A chaos soak (issue 20, item 6): a self-evolving run of the tiny model on 2 processes (accelerate launch, gloo),
interrupted again and again (SIGKILL or SIGTERM at random moments, SIGKILL at the points where files are published,
a full disk at the writes of every kind of file) and rerun each time with the same command, must end with the same
keep masks and, within the 1-vs-2-process tolerance of tests/test_distributed.py, the same weights as the run that
was never interrupted; and leave no temporary file in the run directory or the score cache.

    python -m benchmarks.chaos --out results/chaos      # 9 lives, about 10 minutes on 2 cores

Each life is a run from scratch: its first start gets one of the targeted faults (TARGETED: every stage kind and
every kind of file at least once over the lives), the next starts timed signals at moments drawn with the seed,
until it finishes. Each start's fault, exit code and the stages done after it go to <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, code_commit, launch_command, launch_environment

SCRIPTS = ROOT / "tests" / "scripts"
ROUNDS = 3
JOB = ["model=tiny", "tracking=none", "pipeline=self_evolving", f"pipeline.chunks={ROUNDS}", "data.limit=200",
       "data.eval_size=16", "training.micro_batch_size=2", "training.loss_chunk_size=64", "training.save_every=2"]
SLOW_STEP = 0.3                     # seconds of pause per optimiser step in the starts that get a timed signal
MAX_STARTS = 6                      # per life: the last start runs untouched
RTOL_FRO, ATOL_MAX = 1e-4, 1e-3     # tests/test_distributed.py: what two processes may differ by from one
# (kind, argument): the fault script's names (tests/scripts/kill_run.py KILL_AT, tests/scripts/fault.py FAULT)
TARGETED = [
    ("enospc", "/scores/.base_losses-"),      # publishing the base losses to the score cache
    ("kill", "slow:round_0:0.3"),             # a timed SIGKILL while round 0 trains (slowed: 0.3 s a step)
    ("kill", "checkpoint:model"),             # round 0's model written, not yet renamed into place
    ("enospc", ".state/"),                    # a resumable training state being written
    ("kill", "array:round_1/scores"),         # round 1's scores: the arrays written, not their .json
    ("term", "slow:round_1:0.3"),             # SIGTERM mid round 1: stop at the step boundary, save, exit 75
    ("kill", "manifest:round_1"),             # the manifest naming round_1 half written
    ("enospc", "round_2/.keep"),              # round 2's keep mask (its per-process temporary file)
    ("enospc", "manifest.json"),              # the manifest itself
]


def command(run_dir: Path, script: Path | None = None) -> list[str]:
    return launch_command("ddp.yaml", ["--num_processes", "2"], script) + JOB + [f"hydra.run.dir={run_dir}"]


def attempt(run_dir: Path, env: dict, fault: tuple[str, str] | None, delay: float | None, log) -> dict:
    """One start of the job with one fault; returns what happened."""
    kind, arg = fault or ("none", "")
    script, extra = None, {}
    if kind == "enospc":
        script, extra = SCRIPTS / "fault.py", {"FAULT": f"enospc:{arg}"}
    elif arg:   # a kill at a point, or (slow:...) a pause per step so that a timed signal lands mid-training
        script, extra = SCRIPTS / "kill_run.py", {"KILL_AT": arg}
    t0 = time.perf_counter()
    proc = subprocess.Popen(command(run_dir, script), cwd=ROOT, env={**env, **extra}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    signalled = None
    if delay is not None:
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            signalled = signal.SIGKILL if kind == "kill" else signal.SIGTERM
            signal_job(run_dir, signalled)
    try:
        rc = proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        signal_job(run_dir, signal.SIGKILL)
        rc = proc.wait()
    signal_job(run_dir, signal.SIGKILL, wait=True)   # no orphaned worker may outlive its launcher into the next start
    manifest = run_dir / "manifest.json"
    done = list(json.loads(manifest.read_text())["stages"]) if manifest.exists() else []
    at = ", ".join(x for x in (arg, f"signal after {delay:.1f} s" if delay is not None else "") if x)
    return {"fault": kind, "at": at, "signal":
            signalled.name if signalled else None, "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "stages_done": done}


def signal_job(run_dir: Path, sig: signal.Signals, wait: bool = False) -> None:
    """Signal the launcher and every worker of the job on `run_dir`, as SLURM or a node failure does: torchrun starts
    each worker in a session of its own, so a process-group signal would miss them (and a killed launcher orphans
    them). They are found by their command line."""
    import psutil
    mark = f"hydra.run.dir={run_dir}"
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        if mark in (p.info["cmdline"] or []):
            procs.append(p)
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    if wait:   # only once the launcher is reaped: psutil would reap our own child and hide its exit code
        psutil.wait_procs(procs, timeout=30)


def weights(run: Path, t: int) -> dict:
    from safetensors.numpy import load_file
    return load_file(str(run / f"round_{t}" / "model" / "model.safetensors"))


def compare(ref: Path, run: Path, cache: Path) -> dict:
    """What the interrupted run ended with, against the uninterrupted one."""
    masks_equal = all(np.array_equal(np.load(ref / f"round_{t}" / "keep.values.npy"),
                                     np.load(run / f"round_{t}" / "keep.values.npy")) for t in range(1, ROUNDS))
    rel = absolute = 0.0
    for t in range(ROUNDS):
        a, b = weights(ref, t), weights(run, t)
        assert a.keys() == b.keys()
        for k in a:
            d = (a[k].astype(np.float64) - b[k].astype(np.float64))
            rel = max(rel, float(np.linalg.norm(d) / max(np.linalg.norm(a[k]), 1e-30)))
            absolute = max(absolute, float(np.abs(d).max()))
    s_ref, s_run = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    # the package's temporary names (io.atomic_write, cache.put); not the .partial manifest the kill script plants
    leftovers = [str(p) for root in (run, cache) for p in root.rglob("*") if ".tmp" in p.name]
    return {"masks_equal": masks_equal, "weights_rel_fro_max": rel, "weights_abs_max": absolute,
            "weights_within_tolerance": rel <= RTOL_FRO and absolute <= ATOL_MAX,
            "eval_loss": [s_ref["eval_loss_after"], s_run["eval_loss_after"]], "leftovers": leftovers}


def soak(n_lives: int, seed: int, work: Path, log_path: Path, targeted=TARGETED) -> dict:
    """`n_lives` runs from scratch, each in a fresh run directory and score cache: its first start gets the next
    targeted fault, then timed signals at random moments until it finishes (at most MAX_STARTS starts), then it is
    compared with the uninterrupted run."""
    rng = np.random.default_rng(seed)
    model_cache = work / "model_cache"
    subprocess.run([sys.executable, "-c", "from tokenclean.assets import resolve_model; resolve_model('builtin:tiny')"],
                   env=launch_environment(model_cache), check=True, cwd=ROOT)

    def fresh_cache(name):   # the built tiny model only: every score is computed afresh
        shutil.copytree(model_cache, work / name)
        return work / name

    lives = []
    with open(log_path, "w") as log:
        ref_cache = fresh_cache("cache_ref")
        first = attempt(work / "ref", launch_environment(ref_cache), None, None, log)
        assert first["rc"] == 0, f"the uninterrupted run failed: see {log_path}"
        duration = first["seconds"]
        for life in range(n_lives):
            cache, run_dir = fresh_cache(f"cache_{life}"), work / f"run_{life}"
            env, starts = launch_environment(cache), []
            fault = targeted[life % len(targeted)]
            starts.append(attempt(run_dir, env, fault, float(rng.uniform(3, 12)) if fault[1].startswith("slow:")
                                  else None, log))
            while starts[-1]["rc"] != 0 and len(starts) < MAX_STARTS:
                last = len(starts) == MAX_STARTS - 1
                timed = None if last else ("kill" if rng.random() < 0.5 else "term", f"slow:*:{SLOW_STEP}")
                # the launch takes most of `duration`; slowed steps make the work after it last about as long again
                starts.append(attempt(run_dir, env, timed, None if last else float(rng.uniform(0.6, 1.4) * duration),
                                      log))
            for x in starts:
                print(json.dumps({"life": life, **x}), flush=True)
            result = compare(work / "ref", run_dir, cache) if starts[-1]["rc"] == 0 else None
            lives.append({"life": life, "starts": starts, "result": result})
    return {"uninterrupted_seconds": duration, "lives": lives}


def write(out: Path, state: dict) -> None:
    from tokenclean.io import atomic_write_text
    atomic_write_text(out.with_suffix(".json"), json.dumps(state, indent=1))
    lines = ["# Chaos soak: self-evolving runs on 2 processes, interrupted and rerun", "", "```", state["command"],
             "```", "", f"Commit {state['commit']}, seed {state['seed']}; the uninterrupted run took "
             f"{state['uninterrupted_seconds']:.0f} s (the launch of 2 processes included). Each life is a run from "
             "scratch in a fresh run directory and score cache: its first start gets a targeted fault, the next "
             f"ones SIGKILL or SIGTERM at a random moment (each step slowed by {SLOW_STEP} s so that signals land "
             "in training too), the last one runs untouched.", "",
             "| life | start | fault | at | signal | exit | stages done after | masks | weights: rel / abs diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    n_starts = n_interrupted = n_ok = 0
    for life in state["lives"]:
        r = life["result"]
        for i, x in enumerate(life["starts"], 1):
            n_starts += 1
            n_interrupted += x["rc"] != 0
            end = i == len(life["starts"])
            masks = ("equal" if r["masks_equal"] else "DIFFERENT") if end and r else ""
            w = (f"{r['weights_rel_fro_max']:.1e} / {r['weights_abs_max']:.1e}" if end and r else "")
            lines.append(f"| {life['life']} | {i} | {x['fault']} | {x['at']} | {x['signal'] or ''} | {x['rc']} | "
                         f"{', '.join(x['stages_done'])} | {masks} | {w} |")
        n_ok += bool(r and r["masks_equal"] and r["weights_within_tolerance"] and not r["leftovers"])
    lines += ["", f"{len(state['lives'])} lives, {n_starts} starts, {n_interrupted} of them interrupted (exit code not "
              f"0). {n_ok} of {len(state['lives'])} lives ended with the uninterrupted run's keep masks, its weights "
              f"within the 1-vs-2-process tolerance ({RTOL_FRO:g} relative, {ATOL_MAX:g} absolute) and no temporary "
              "file left in the run directory or the cache."]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lives", type=int, default=len(TARGETED), help="runs from scratch, each interrupted until done")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "chaos")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="chaos-"))
    state = soak(args.lives, args.seed, work, work / "soak.log")
    state.update(command="python -m benchmarks.chaos " + " ".join(argv if argv is not None else sys.argv[1:]),
                 commit=code_commit(), seed=args.seed)
    write(args.out, state)
    return state


if __name__ == "__main__":
    main()
