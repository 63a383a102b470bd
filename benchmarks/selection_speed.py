"""Top-k selection speed: tokenclean's `selection.keep_mask` (global and per sample) over 10M response tokens, against
one read of the scores, the implementation before it, the simple one (`simple_keep_mask`, below: the tests'
equality reference) and a Python sort; rewrites the section "topk" of results/performance.md.

  python -m benchmarks.selection_speed
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import PERFORMANCE, ROOT, code_commit, command, machine, table, write_section
from tokenclean.ragged import Ragged
from tokenclean.selection import kept_count

MODULE = "selection_speed"

# -- the simple implementation (float64 copies, lexsort), as it was before the fast paths: the reference that
#    tests/test_selection_speed_paths.py checks the fast paths against, bit for bit, and the row "simple" here -------
def simple_keep_mask(scores: Ragged, target: Ragged, method: str, keep_ratio: float = 1.0, threshold=None):
    is_target = np.asarray(target.values, dtype=bool)
    cand = np.flatnonzero(is_target)
    keep = np.zeros(len(is_target), dtype=bool)
    s = np.asarray(scores.values, dtype=np.float64)[cand]
    assert not np.isnan(s).any()
    if method == "global":
        keep[cand[simple_top_k(s, kept_count(len(cand), keep_ratio))]] = True
    elif method == "sample":
        keep[cand[simple_top_k_per_group(s, target.example_ids()[cand], keep_ratio)]] = True
    elif method == "threshold":
        keep[cand[s > threshold]] = True
    return keep


def simple_top_k(s, k):
    n = len(s)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n)
    kth = np.partition(s, n - k)[n - k]
    above = np.flatnonzero(s > kth)
    ties = np.flatnonzero(s == kth)[: k - len(above)]
    return np.sort(np.concatenate([above, ties]))


def simple_top_k_per_group(s, group, ratio):
    order = np.lexsort((np.arange(len(s)), -s, group))
    sizes = np.bincount(group)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    g = group[order]
    rank = np.arange(len(s)) - starts[g]
    k = kept_count(sizes, ratio)
    return np.sort(order[rank < k[g]])


def _topk_data(examples: int, tokens: int, seed: int = 0):
    """`examples` examples with `tokens` response tokens in all (each: a prompt of 16-128 tokens, never a
    candidate, then its response), float32 scores (standard normal: as a loss difference, with the ties float32
    has) on the response, NaN elsewhere, as the scorers write them."""
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


def run(a, argv) -> None:
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
    if a.old:   # the first implementation (float64 copies, lexsort): the tests' equality reference
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
             f"Command: `{command(MODULE, argv)}`", "", f"Commit: {code_commit()}.", "",
             f"{len(scores.values):,} positions ({n:,} response tokens; prompts of 16-128 tokens are not "
             f"candidates), float32 scores (standard normal) with NaN off the response, keep ratio {a.ratio}; "
             "global = the top floor(n * ratio) of all candidates, sample = of each example's. Seconds, best of "
             f"{a.repeats}, the one read and the keep_masks timed in turns (the Python sort: once).", "",
             *table(["", "global (s)", "per sample (s)", "x one read (global / sample)",
                      "faster than the Python sort", ""], rows), "",
             "Goals: at most 30x one read, at least 500x faster than the Python sort.", "",
             f"500x faster than the Python sort is {py_global / 500 * 1e3:.0f} ms global "
             f"({py_global / 500 / read:.1f} reads) and {py_sample / 500 * 1e3:.0f} ms per sample "
             f"({py_sample / 500 / read:.1f} reads); numpy's sort alone of the {len(rows_200.ravel()):,} candidates "
             f"as rows of 200 (`np.sort(axis=1)`, SIMD sorting networks) takes {t_rows * 1e3:.0f} ms.", "",
             f"Machine: {machine()}."]
    write_section("topk", "\n".join(lines), Path(a.out))


def main(argv=None) -> None:
    argv = list(argv if argv is not None else sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=50_000)
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--python-tokens", type=int, default=1_000_000)
    ap.add_argument("--no-old", dest="old", action="store_false", help="skip timing the previous implementations")
    ap.add_argument("--out", default=str(PERFORMANCE))
    run(ap.parse_args(argv), argv)


if __name__ == "__main__":
    main()
