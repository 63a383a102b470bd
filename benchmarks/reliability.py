"""Reliability figures (issue 20): the fuzz properties of tests/test_fuzz.py at their large budget, with the share
of generated inputs accepted and refused, and the lock's refusal time on a 200k-record pool beside the time reading
that pool takes.

    python -m benchmarks.reliability --out results/reliability_figures

Writes <out>.json; results/reliability.md cites it beside the chaos soak (benchmarks/chaos.py) and the tests.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, code_commit

POOL_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


def fuzz() -> dict:
    """pytest -m slow tests/test_fuzz.py with hypothesis' statistics: per property, the examples run, the seconds
    and the outcomes (the `event`s the properties record)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "slow", "-p", "no:cacheprovider",
                           "--hypothesis-show-statistics", "tests/test_fuzz.py"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    out, current = {"seconds": round(time.perf_counter() - t0, 1)}, None
    for line in proc.stdout.splitlines():
        if m := re.search(r"tests/test_fuzz.py::(\w+)", line):
            current = out.setdefault(m.group(1), {"events": {}})
        elif current is not None and (m := re.search(r"(\d+) passing, (\d+) failing", line)):
            current["passing"], current["failing"] = int(m.group(1)), int(m.group(2))
        elif current is not None and (m := re.search(r"\* ([\d.]+)%, (accepted|refused)", line)):
            current["events"][m.group(2)] = float(m.group(1)) / 100
    return out


def lock_refusal(n_records: int) -> dict:
    """Seconds until a second run on a held run directory is refused, against the seconds reading the pool takes."""
    from tokenclean.data import read_conversations
    with tempfile.TemporaryDirectory() as tmp:
        pool, run_dir = Path(tmp) / "pool.jsonl", Path(tmp) / "run"
        pool.write_text((POOL_LINE + "\n") * n_records)
        t0 = time.perf_counter()
        records, _ = read_conversations(str(pool))
        reading = time.perf_counter() - t0
        assert len(records) == n_records
        run_dir.mkdir()
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from tokenclean.rundir import RunLock; "
                                   "RunLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)",
                                   str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert holder.stdout.readline().strip() == "held"
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "tokenclean", "model=tiny", "tracking=none", "data=file",
                                   f"data.train={pool}", "data.warmup_fraction=0.2", "cache=false",
                                   f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True)
            refusal = time.perf_counter() - t0
        finally:
            holder.kill()
            holder.wait()
        assert proc.returncode == 2 and "is in use by another run" in proc.stderr, proc.stderr[-2000:]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tokenclean", "--help"], cwd=ROOT, check=True, capture_output=True)
        help_seconds = time.perf_counter() - t0
    return {"records": n_records, "refusal_seconds": round(refusal, 2), "reading_seconds": round(reading, 2),
            "cli_help_seconds": round(help_seconds, 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "reliability_figures")
    args = ap.parse_args(argv)
    from tokenclean.io import atomic_write_text
    state = {"command": "python -m benchmarks.reliability " + " ".join(argv if argv is not None else sys.argv[1:]),
             "commit": code_commit(), "lock": lock_refusal(args.records), "fuzz": fuzz()}
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(state, indent=1))
    print(json.dumps(state, indent=1))
    return state


if __name__ == "__main__":
    main()
