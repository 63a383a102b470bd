"""A keep-ratio sweep on the score cache against one run of the same job; rewrites its section of
results/performance.md.

  python -m benchmarks.sweep                       # the default job, keep ratios 0.4, 0.6, 0.8
  python -m benchmarks.sweep --ratios 0.5,0.7 model=tiny
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import PERFORMANCE, code_commit, command, machine, table, write_section

MODULE = "sweep"


def run(a, argv) -> None:
    """One run of the job (score cache off: it computes everything), then the same job as a sweep over keep ratios
    with an empty score cache (its first point computes and caches the base losses and the reference, the others
    reuse them). The built-in model's converted copy is linked into the fresh cache, so neither converts it."""
    from tokenclean.io import cache_root
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
    lines = ["## A keep-ratio sweep vs one run", "", f"Command: `{command(MODULE, argv)}`", "",
             f"Commit: {code_commit()}.", "",
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
             *table(["run", "base losses", "reference (incl. base losses)", "select",
                      "final (training + held-out losses)"], rows),
             "", "A sweep point still trains its own final model (its keep ratio changes what it learns from): that "
             "stage bounds what a cache can save. With n points, a sweep costs at least one run plus (n - 1) final "
             "stages.", "", f"Machine: {machine()}."]
    write_section("sweep", "\n".join(lines), Path(a.out))


def main(argv=None) -> None:
    argv = list(argv if argv is not None else sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0.4,0.6,0.8")
    ap.add_argument("--out", default=str(PERFORMANCE))
    ap.add_argument("overrides", nargs="*", help="tokenclean overrides for the job (default: the default job)")
    run(ap.parse_intermixed_args(argv), argv)


if __name__ == "__main__":
    main()
