"""Padded vs packed forward passes on the default job (SmolLM2-135M, chatterbot, limit 400, max_length 256, batch 8).

  python -m benchmarks.packing --out results/packing.md
  python -m benchmarks.packing --steps 5 model=tiny data.limit=240 data.eval_size=24    # any tokenclean overrides

Counts: every forward pass of the fixed job with those overrides (reference and final training; base and reference
losses on the pool; held-out losses before, with the reference, after), from the job's own data splits and batch
plans: processed token positions (padded: examples x longest; packed: the sum of lengths) over real tokens.
Timing, in this one process, from the same weights: the first --steps training steps of the final stage (every
response token kept) and one scoring pass over the pool, padded and packed alternately (padded, packed, packed,
padded with --rounds 2), so a machine shared with other work slows both alike. Wall and CPU seconds.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace

import numpy as np


def load_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tokenclean.__main__ import conf_dir  # also registers the config schema and the model_tag resolver
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=["tracking=none", *overrides]))


def count(lengths: np.ndarray, batches) -> tuple[int, int]:
    """(padded positions, real tokens) of these forward passes."""
    batches = [b for b in batches if len(b)]
    return sum(len(b) * int(lengths[b].max()) for b in batches), sum(int(lengths[b].sum()) for b in batches)


def stage_seed(cfg, stage: str) -> int:
    from tokenclean.rundir import fingerprint
    return int(fingerprint(cfg.seed, stage)[:8], 16)      # as Job.stage_seed


def job_counts(cfg, data) -> dict:
    from tokenclean.losses import length_batches
    from tokenclean.train import micro_batches, plan_steps

    t = cfg.training
    n_micro = math.ceil(t.batch_size / t.micro_batch_size)
    train = []
    for stage, ex in (("reference", data.warmup), ("final", data.train)):
        for step in plan_steps(len(ex), t, stage_seed(cfg, stage)):
            train += [(ex.input_ids.lengths, b) for b in micro_batches(step, 0, 1, t.micro_batch_size, n_micro)]
    score = [(ex.input_ids.lengths, b) for ex in (data.train, data.train, data.eval, data.eval, data.eval)
             for b in length_batches(ex.input_ids.lengths, t.score_batch_size)]
    out = {}
    for name, passes in (("training steps", train), ("scoring passes", score)):
        pairs = [count(lengths, [b]) for lengths, b in passes]
        out[name] = (len(passes), sum(p for p, _ in pairs), sum(r for _, r in pairs))
    return out


def use_packing(packed: bool) -> None:
    """Point train.fit and token_losses at the packed (as shipped) or the padded layout."""
    import tokenclean.losses as L
    import tokenclean.train as T
    if not hasattr(L, "_shipped_collate"):
        L._shipped_collate = L.collate
    shipped = L._shipped_collate
    L.collate = T.collate = shipped if packed else (lambda *a, packed=False, **k: shipped(*a, **k))


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def time_training(cfg, acc, path, data, steps: int, packed: bool, pad_id: int):
    from tokenclean.models import load_model
    from tokenclean.train import fit, prepare

    use_packing(packed)
    t = replace(cfg.training, max_steps=steps, log_every=10**9, save_every=0)
    p = prepare(acc, load_model(path, cfg.model, cfg.seed), len(data.train), t, stage_seed(cfg, "final"))
    stats, wall, cpu = timed(lambda: fit(acc, p, data.train.input_ids, data.train.target, t, pad_id, desc="train"))
    steps_run = p.steps
    acc.free_memory(p.model, p.optimizer)
    return stats["train_loss"], wall, cpu, steps_run


def time_scoring(cfg, acc, path, data, packed: bool, pad_id: int):
    from tokenclean.losses import TokenLoss, token_losses
    from tokenclean.models import load_model

    use_packing(packed)
    model = acc.prepare(TokenLoss(load_model(path, cfg.model, cfg.seed, lora=False), cfg.training.loss_chunk_size))
    out, wall, cpu = timed(lambda: token_losses(acc, model, data.train.input_ids, data.train.target,
                                                cfg.training.score_batch_size, pad_id, desc="score"))
    acc.free_memory(model)
    return out.values, wall, cpu


def time_full_length(cfg, acc, path, order, reps: int = 3):
    """Forward + backward of one micro-batch of max_length examples: nothing to save by packing, and a packed row
    asks sdpa/eager for attention over all of it under a block-diagonal mask (flash-attention would run varlen)."""
    from tokenclean.losses import TokenLoss, collate
    from tokenclean.models import load_model
    from tokenclean.ragged import Ragged

    n, length = cfg.training.micro_batch_size, cfg.data.max_length
    rng = np.random.default_rng(0)
    ids = Ragged.from_list([rng.integers(10, 1000, length) for _ in range(n)], np.int64)
    tgt = ids.like(np.ones(len(ids.values), bool))
    model = TokenLoss(load_model(path, cfg.model, cfg.seed), cfg.training.loss_chunk_size).train()
    runs = {False: [], True: []}
    for packed in order:
        b = collate(ids, tgt, range(n), packed=packed)

        def step(b=b):
            with acc.autocast():
                model(**b).sum().backward()
            model.zero_grad(set_to_none=True)
        for _ in range(reps):
            runs[packed].append(timed(step)[1:])
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="training steps timed per arm")
    ap.add_argument("--rounds", type=int, default=2, help="1: padded, packed; 2: padded, packed, packed, padded")
    ap.add_argument("--counts-only", action="store_true", help="print the job's token counts, time nothing")
    ap.add_argument("--out", default=None)
    a, overrides = ap.parse_known_args()

    import torch

    from tokenclean.assets import resolve_model
    from tokenclean.dist import make_accelerator
    from tokenclean.losses import length_batches
    from tokenclean.models import load_tokenizer
    from tokenclean.pipelines.job import read_data, tokenize_data
    from tokenclean.train import micro_batches

    torch.manual_seed(0)
    cfg = load_config(overrides)
    path = resolve_model(cfg.model.name_or_path)
    tok = load_tokenizer(path)
    data = tokenize_data(cfg, *read_data(cfg), tok)
    acc = make_accelerator(cfg.training.mixed_precision)
    counts = job_counts(cfg, data)
    if a.counts_only:
        print({k: f"{n} forwards, {padded:,} padded positions, {real:,} real tokens ({padded / real:.2f}x)"
               for k, (n, padded, real) in counts.items()})
        return

    order = [False, True, True, False][:2 * a.rounds] if a.rounds <= 2 else [False, True] * a.rounds
    runs = {"training": {False: [], True: []}, "scoring": {False: [], True: []}}
    results = {}
    for packed in order:
        loss, wall, cpu, steps = time_training(cfg, acc, path, data, a.steps, packed, tok.pad_token_id)
        runs["training"][packed].append((wall, cpu))
        results.setdefault(("training", packed), loss)
        scores, wall, cpu = time_scoring(cfg, acc, path, data, packed, tok.pad_token_id)
        runs["scoring"][packed].append((wall, cpu))
        results.setdefault(("scoring", packed), scores)
        print(f"packed={packed}: {runs['training'][packed][-1]} {runs['scoring'][packed][-1]}", flush=True)

    full = time_full_length(cfg, acc, path, order)
    lengths, t = data.train.input_ids.lengths, cfg.training
    n_micro = math.ceil(t.batch_size / t.micro_batch_size)
    timed_pos = {"training": count(lengths, [b for s in steps for b in micro_batches(s, 0, 1, t.micro_batch_size,
                                                                                        n_micro)]),
                 "scoring": count(lengths, length_batches(lengths, t.score_batch_size))}
    loss_diff = float(np.max(np.abs(np.subtract(results["training", True], results["training", False]))))
    score_diff = float(np.nanmax(np.abs(results["scoring", True] - results["scoring", False])))

    cmd = " ".join(["python -m benchmarks.packing", *sys.argv[1:]])
    lines = [f"Command: `{cmd}`", "",
             f"Data: {cfg.data.train}, limit {cfg.data.limit}, max_length {cfg.data.max_length}: {len(data.train)} "
             f"pool, {len(data.warmup)} warm-up, {len(data.eval)} held-out examples. Model {cfg.model.name_or_path}, "
             f"batch {cfg.training.batch_size} (micro {cfg.training.micro_batch_size}), score batch "
             f"{cfg.training.score_batch_size}, mixed precision {acc.mixed_precision}, "
             f"{torch.get_num_threads()} torch threads on {acc.device}.", "",
             "Every forward pass of the whole fixed job:", "",
             "| passes | forwards | real tokens | padded positions | padded / real | packed positions "
             "| packed / real |",
             "|---|---|---|---|---|---|---|"]
    for name, (n, padded, real) in counts.items():
        lines.append(f"| {name} | {n} | {real:,} | {padded:,} | {padded / real:.2f}x | {real:,} | 1.00x |")
    lines += ["", f"Timed ({' '.join('packed' if p else 'padded' for p in order)}; seconds per arm, mean of "
              f"{len(order) // 2}):", "",
              "| piece | real tokens | padded positions | padded wall s | packed wall s | wall speed-up "
              "| padded CPU s | packed CPU s |", "|---|---|---|---|---|---|---|---|"]
    for name, desc in (("training", f"{a.steps} training steps (final stage)"), ("scoring", "one scoring pass (pool)")):
        padded, real = timed_pos[name]
        (pw, pc), (kw, kc) = (np.mean(runs[name][p], axis=0) for p in (False, True))
        lines.append(f"| {desc} | {real:,} | {padded:,} | {pw:.1f} | {kw:.1f} | {pw / kw:.2f}x | {pc:.1f} | {kc:.1f} |")
    (pw, pc), (kw, kc) = (np.mean(full[p], axis=0) for p in (False, True))
    n, length = t.micro_batch_size, cfg.data.max_length
    lines.append(f"| forward + backward, {n} examples x {length} tokens (no padding to save) | {n * length:,} | "
                 f"{n * length:,} | {pw:.2f} | {kw:.2f} | {pw / kw:.2f}x | {pc:.2f} | {kc:.2f} |")
    lines += ["", f"Same results: largest |packed - padded| step loss {loss_diff:.1e}, per-token scoring loss "
              f"{score_diff:.1e}. Every timed run (wall s, CPU s): "
              + "; ".join(f"{n} {'packed' if p else 'padded'} {[(round(w, 1), round(c, 1)) for w, c in v]}"
                          for n in runs for p, v in runs[n].items())]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
