"""What self-evolving cleaning costs over plain SFT on the same pool and steps: wall and CPU seconds per part of the
run (the package's own timers, summary.json "timers"); rewrites its section of results/performance.md.

  python -m benchmarks.self_evolving_cost          # SmolLM2-135M, 264 examples, 5 chunks; ~4 GB per run
  python -m benchmarks.self_evolving_cost --model tiny --limit 120 --eval-size 20 --groups plain,online

Every run is `tokenclean` in a fresh process; the runs of a group go at once (they share the machine's load).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import PERFORMANCE, child_main, code_commit, command, machine, run_children, table, write_section

MODULE = "self_evolving_cost"


PARTS = {"setup": "data, tokenizer, accelerator", "load": "model load + prepare (per round)",
         "train": "training steps", "eval": "held-out loss", "base_pass": "base-loss pass",
         "reference_pass": "reference-loss pass", "select": "selection and arrays", "checkpoint": "checkpoint write",
         "report": "report + cleaned.parquet"}


def _cli_timed(spec: dict) -> dict:
    """Run the tokenclean command in this process (its own main, as `python -m tokenclean` does), then read where
    its time went from the run's summary.json ("timers": the package's own wall and CPU seconds per part, each
    part's own time, adding up to the total) and its manifest."""
    from tokenclean import __main__ as cli

    t0 = time.perf_counter()
    run_dir = Path(spec["run_dir"])
    sys.argv = ["tokenclean", *spec["overrides"], f"hydra.run.dir={run_dir}"]
    cli.main()
    wall = time.perf_counter() - t0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    stages = {k: v.get("seconds") for k, v in manifest["stages"].items()}
    steps = sum(v.get("steps", 0) for k, v in manifest["stages"].items() if "." not in k and k != "base_losses")
    timers = summary["timers"]
    return {"wall": round(wall, 2), "cpu": round(time.process_time(), 2), "parts": timers["wall"],
            "parts_cpu": timers["cpu"], "stages": stages, "steps": steps,
            "eval_loss_after": summary.get("eval_loss_after")}


# name -> (its overrides, whether it is self-evolving); plain SFT is a real run of the fixed pipeline with
# selection=all on the same pool (no warm-up split is carved: data.warmup_fraction=null), so its examples and steps
# are the self-evolving runs'
VARIANTS = {"plain": (["pipeline=fixed", "selection=all"], False),
            "influence": ([], True),
            "online": (["scorer=self_online"], True),
            "influence_eval5": (["eval.every=5"], True),
            "online_eval5": (["scorer=self_online", "eval.every=5"], True)}


def run(a, argv) -> None:
    # no warm-up split carved (chatterbot carves one for every arm now): the pool its figures were measured on;
    # no score cache (a hit would skip the base-loss pass)
    base = [f"model={a.model}", "tracking=none", f"data.limit={a.limit}", f"data.eval_size={a.eval_size}",
            "data.warmup_fraction=null", "cache=false"]
    evolving = ["pipeline=self_evolving", f"pipeline.chunks={a.chunks}"]
    tmp = tempfile.mkdtemp(prefix="perf_se_")
    results, baseline = {}, {}
    try:
        for g, group in enumerate(a.groups.split(";")):   # a group's runs go at once, each against its own plain
            names = group.split(",")
            jobs = [(f"{n}#{g}", "cli", {"overrides": base + (evolving if VARIANTS[n][1] else []) + VARIANTS[n][0],
                                         "run_dir": f"{tmp}/{n}{g}"}) for n in names]
            got = run_children("benchmarks.self_evolving_cost", jobs, a.threads, True)
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
            ["pipeline wall seconds (summary.json timers: total)"] + [results[n]["parts"].get("total") for n in cols],
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
    rows.append(["  other (manifest, waits, whatever no part times)"] +
                [f"{other(n, 'parts')} / {other(n, 'parts_cpu')}" for n in cols])
    rows.append(["held-out loss after"] + [f"{results[n]['eval_loss_after']:.4f}" if results[n]["eval_loss_after"]
                                           else "n/a" for n in cols])
    stage_lines = [f"- {n}: " + ", ".join(f"{k} {v}" for k, v in results[n]["stages"].items()) for n in cols]
    lines = [f"## Self-evolving / plain SFT ({a.model}, data.limit={a.limit}, {a.chunks} chunks)", "",
             f"Command: `{command(MODULE, argv)}`", "", f"Commit: {code_commit()}.", "",
             f"Each column is one `tokenclean` run (`{' '.join(base)}` + `{' '.join(evolving)}` for the "
             "self-evolving ones, + its overrides) in a "
             f"fresh process; the runs of a group (#0, #1, ...) go at once, so that the runs compared share the "
             f"machine's load, each against the plain SFT run of its group (* a group without one: against the "
             f"mean of the plain runs); torch threads: "
             f"{a.threads or 'default'}), with the package's own timers (summary.json's \"timers\": each part's "
             "own seconds, wall / process CPU: the wall time stretches with the machine's load, and a run's wall "
             "time is shared with the others of its group only while they run; the CPU time moves much less). The "
             "pool is "
             f"{a.limit - a.eval_size} examples: {a.chunks} chunks of {(a.limit - a.eval_size) // a.chunks}, so every "
             "round is whole batches and the rounds together take as many steps as one pass of plain SFT. "
             "plain = `pipeline=fixed selection=all`, a real run (one model load, held-out loss before and after, "
             "every response token, one checkpoint) on the same pool; "
             "influence = the paper's scorer (a reference pass per round); online = `scorer=self_online` "
             "(chosen while training, no reference pass); eval5 = `eval.every=5` (held-out loss of the base and "
             "the last round only, as plain SFT).", "",
             *table(["", *cols], rows), "",
             *_extra_cpu(results, baseline), "",
             "Per-stage seconds from each run's manifest.json (a round includes its nested stages: round_0 the "
             "base-loss pass, round_t its round_t.select):", "", *stage_lines, "", f"Machine: {machine()}."]
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


def main(argv=None) -> None:
    if child_main({"cli": _cli_timed}):
        return
    argv = list(argv if argv is not None else sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--limit", type=int, default=264)
    ap.add_argument("--eval-size", type=int, default=24)
    ap.add_argument("--chunks", type=int, default=5)
    ap.add_argument("--groups", default="plain,online;plain,influence;online_eval5,influence_eval5",
                    help="runs at once, ';' between groups (~4 GB each with SmolLM2); names: " + ",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per measured process (0: torch's default)")
    ap.add_argument("--out", default=str(PERFORMANCE))
    run(ap.parse_args(argv), argv)


if __name__ == "__main__":
    main()
