"""Padded vs packed forward passes on the default job (SmolLM2-135M, chatterbot, limit 400, max_length 256, batch 8).

  python -m benchmarks.packing --out results/packing.md
  python -m benchmarks.packing --steps 5 model=tiny data.limit=240 data.eval_size=24    # any tokenclean overrides

Three layouts of a forward's examples: padded (one example per row), packed (losses.collate(packed=True): several
to a row, rows as wide as the longest example; what training and scoring use) and one row (all the examples
concatenated: no padding at all). Counts: every forward pass of the fixed job with these overrides (reference and
final training; base and reference losses on the pool; held-out losses before, with the reference, after), from
the job's own data splits and batch plans: processed token positions per layout over real tokens. Timing, in one
process and from the same weights: forward + backward of the micro-batches of the final stage's first --steps
steps (the optimiser step, the same for every layout, left out), one scoring pass over the pool, and one
micro-batch of max_length examples (nothing to save by packing). The layouts take turns batch by batch, so a
machine shared with other work slows them alike; wall and CPU seconds.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from benchmarks.common import code_commit, command, compose, provenance

LAYOUTS = ("padded", "packed", "one row")


def make_batch(ids, target, idx, layout: str) -> dict:
    """One forward's batch in `layout`; "one row": the examples concatenated, no padding at all."""
    import torch

    from tokenclean.losses import collate
    b = collate(ids, target, idx, packed=layout == "packed")
    if layout != "one row":
        return b
    real = b.pop("attention_mask").bool()
    pos = torch.arange(real.shape[1]).expand_as(real)
    return {"input_ids": b["input_ids"][real][None], "position_ids": pos[real][None], "mask": b["mask"][real][None],
            **({"weights": b["weights"]} if "weights" in b else {})}


def forwards(cfg, data) -> dict:
    """Every forward pass of the fixed job, as (examples, indices): training micro-batches, then scoring batches."""
    from tokenclean.losses import length_batches
    from tokenclean.pipelines.job import stage_seed
    from tokenclean.train import micro_batches, plan_steps

    t = cfg.training
    n_micro = math.ceil(t.batch_size / t.micro_batch_size)
    train = [(ex, b) for stage, ex in (("reference", data.warmup), ("final", data.train))
             for step in plan_steps(len(ex), t, stage_seed(cfg.seed, stage))
             for b in micro_batches(step, 0, 1, t.micro_batch_size, n_micro) if len(b)]
    score = [(ex, b) for ex in (data.train, data.train, data.eval, data.eval, data.eval)
             for b in length_batches(ex.input_ids.lengths, t.score_batch_size)]
    return {"training steps": train, "scoring passes": score}


def positions(passes) -> dict:
    """Real tokens and, per layout, the token positions the forwards process."""
    out = {"forwards": len(passes), "real": sum(int(ex.input_ids.lengths[b].sum()) for ex, b in passes)}
    for layout in LAYOUTS:
        out[layout] = sum(make_batch(ex.input_ids, ex.target, b, layout)["input_ids"].numel() for ex, b in passes)
    return out


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def time_layouts(acc, model, passes, train: bool) -> tuple[dict, dict]:
    """Seconds (wall, CPU) per layout over these forwards (+ backward when train), taking turns; and the losses."""
    import torch

    seconds = {layout: np.zeros(2) for layout in LAYOUTS}
    losses = {layout: [] for layout in LAYOUTS}
    model.train(train)
    for i, (ex, idx) in enumerate(passes):
        for layout in LAYOUTS[i % 3:] + LAYOUTS[:i % 3]:       # each layout goes first as often as the others
            b = make_batch(ex.input_ids, ex.target, idx, layout)

            def run(b=b):
                with torch.set_grad_enabled(train), acc.autocast():
                    out = model(**b)
                if train:
                    out.sum().backward()
                    model.zero_grad(set_to_none=True)
                return out.detach().float()
            out, wall, cpu = timed(run)
            seconds[layout] += (wall, cpu)
            losses[layout].append(out)
    return seconds, {k: torch.cat(v) for k, v in losses.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="final-stage training steps timed")
    ap.add_argument("--counts-only", action="store_true", help="print the job's token counts, time nothing")
    ap.add_argument("--out", default=None)
    a, overrides = ap.parse_known_args()

    import torch

    from tokenclean.assets import resolve_model
    from tokenclean.dist import make_accelerator
    from tokenclean.losses import TokenLoss, length_batches
    from tokenclean.models import load_model, load_tokenizer
    from tokenclean.pipelines.inputs import read_data, tokenize_data
    from tokenclean.pipelines.job import stage_seed
    from tokenclean.ragged import Ragged
    from tokenclean.train import micro_batches, plan_steps

    commit = code_commit()
    cfg = compose(None, overrides)[0]
    t = cfg.training
    path = resolve_model(cfg.model.name_or_path)
    data = tokenize_data(cfg, *read_data(cfg), load_tokenizer(path))
    acc = make_accelerator(t.mixed_precision)
    counts = {name: positions(passes) for name, passes in forwards(cfg, data).items()}
    print(counts, flush=True)
    if a.counts_only:
        return

    model = TokenLoss(load_model(path, cfg.model, cfg.seed), t.loss_chunk_size).to(acc.device)
    n_micro = math.ceil(t.batch_size / t.micro_batch_size)
    steps = plan_steps(len(data.train), t, stage_seed(cfg.seed, "final"))[:a.steps]
    n, length = t.micro_batch_size, cfg.data.max_length
    rng = np.random.default_rng(0)
    full = Ragged.from_list([rng.integers(10, 1000, length) for _ in range(n)], np.int64)
    full_data = type("Full", (), {"input_ids": full, "target": full.like(np.ones(len(full.values), bool))})
    pieces = {f"forward + backward: the {len(steps)} first training steps (final stage)":
              ([(data.train, b) for s in steps for b in micro_batches(s, 0, 1, t.micro_batch_size, n_micro)], True),
              "forward: one scoring pass over the pool":
              ([(data.train, b) for b in length_batches(data.train.input_ids.lengths, t.score_batch_size)], False),
              f"forward + backward: {n} examples of {length} tokens, 3 times":
              ([(full_data, np.arange(n))] * 3, True)}
    timings = {}
    for name, (passes, train) in pieces.items():
        timings[name] = positions(passes), *time_layouts(acc, model, passes, train)
        print(name, timings[name][:2], flush=True)

    lines = [*provenance(command("packing", sys.argv[1:]), commit),
             f"Data: {cfg.data.train}, limit {cfg.data.limit}, max_length {cfg.data.max_length}: {len(data.train)} "
             f"pool, {len(data.warmup)} warm-up, {len(data.eval)} held-out examples. Model {cfg.model.name_or_path} "
             f"({model.config._attn_implementation} attention), batch {t.batch_size} (micro {t.micro_batch_size}), "
             f"score batch {t.score_batch_size}, mixed precision {acc.mixed_precision}, "
             f"{torch.get_num_threads()} torch threads on {acc.device}.", "",
             "Token positions processed by every forward pass of the whole fixed job:", "",
             "| passes | forwards | real tokens | padded | packed | one row |", "|---|---|---|---|---|---|"]
    for name, c in counts.items():
        lines.append(f"| {name} | {c['forwards']} | {c['real']:,} | "
                     + " | ".join(f"{c[k]:,} ({c[k] / c['real']:.2f}x)" for k in LAYOUTS) + " |")
    lines += ["", "Timed, the layouts taking turns batch by batch; seconds, wall / CPU (CPU speed-up over padded):", "",
              "| piece | real tokens | positions padded / packed | padded | packed | one row |",
              "|---|---|---|---|---|---|"]
    for name, (c, secs, _) in timings.items():
        cells = [f"{secs[k][0]:.1f} / {secs[k][1]:.1f} ({secs['padded'][1] / secs[k][1]:.2f}x)" for k in LAYOUTS]
        lines.append(f"| {name} | {c['real']:,} | {c['padded']:,} / {c['packed']:,} | " + " | ".join(cells) + " |")
    diff = max(float((v[2][k] - v[2]["padded"]).abs().max()) for v in timings.values() for k in LAYOUTS)
    lines += ["", f"Every layout gave the same per-token losses: largest difference to padded {diff:.1e}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
