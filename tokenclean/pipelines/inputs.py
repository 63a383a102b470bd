"""A run's inputs, read and checked before any model loads: which data files an arm reads (the warm-up set only where
it trains on one), their identity for the run directory, and the tokenized splits (pool, warm-up, held-out eval)
that depend on `cfg.data` and the seed alone, so every arm of a comparison trains on the same pool."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenclean import evaluation, scorers
from tokenclean.config import BASELINES, Config, ConfigError, FirstReference, PipelineName
from tokenclean.data import Examples, read_conversations, split_indices, tokenize


@dataclass
class Data:
    train: Examples                 # the pool that is cleaned and trained on
    warmup: Examples | None         # the warm-up set a reference learns from (data.warmup, or carved from the pool)
    eval: Examples | None           # held out: loss before and after
    truncation: dict
    skipped_records: int
    warmup_source: str = "none"     # "file" (data.warmup) | "carved" (data.warmup_fraction/size) | "none"


def uses_warmup(cfg: Config) -> bool:
    """Whether this arm trains a model on the warm-up set: the fixed pipeline's reference (for a scorer that compares
    with one), or self-evolving's first reference with first_reference=warmup. Baselines never do."""
    warm = cfg.pipeline.name == PipelineName.self_evolving and cfg.pipeline.first_reference == FirstReference.warmup
    if cfg.selection.method in BASELINES or cfg.pipeline.name == PipelineName.self_evolving:
        return warm
    return scorers.get(cfg.scorer.name).needs_reference


def check_warmup(cfg: Config) -> None:
    """An arm that trains on a warm-up set has one: a file, or a split carved from the pool."""
    d = cfg.data
    if uses_warmup(cfg) and d.warmup is None and d.warmup_fraction is None and d.warmup_size is None:
        who = ("pipeline.first_reference=warmup" if cfg.pipeline.name == PipelineName.self_evolving
               else f"scorer={cfg.scorer.name} in the fixed pipeline")
        raise ConfigError(f"data.warmup=null: {who} trains its reference on a warm-up set; pass data.warmup=FILE (the "
                          "paper's separate 10k), or carve one from the pool with data.warmup_fraction=0.2 (then carve "
                          "it in every arm you compare, so they train on the same pool)")


def read_data(cfg: Config) -> tuple[dict, int]:
    """Every record, read and validated before any model loads: {"train"|"warmup"|"eval": Conversations (compact,
    streamed from the file)}, skipped. The warm-up file is read only by an arm that trains on it."""
    d, records, skipped = cfg.data, {}, 0
    sources = {"train": d.train, "warmup": d.warmup if uses_warmup(cfg) else None, "eval": d.eval}
    for split, source in sources.items():
        if source is not None:
            records[split], s = read_conversations(source, d.format, d.on_error,
                                                   d.limit if split == "train" else None)
            skipped += s
    if d.sample is not None:
        records["train"] = sample(records["train"], d.sample, d.sample_seed)
    return records, skipped


def sample(conversations, n: int, seed: int):
    """A random n of `conversations` drawn with `seed` alone, in their file order (all of them if there are fewer)."""
    if n >= len(conversations):
        return conversations
    return conversations.take(np.sort(np.random.default_rng(seed).choice(len(conversations), n, replace=False)))


def data_inputs(cfg: Config, records: dict) -> dict:
    """Each data file the run read, for its run directory's identity: {"data.train"|...: path, size in bytes (of a
    file; None for a folder or a built-in set), the records read and their fingerprint}."""
    sources = {"train": cfg.data.train, "warmup": cfg.data.warmup, "eval": cfg.data.eval}
    out = {}
    for split, conversations in records.items():
        path = Path(sources[split])
        out[f"data.{split}"] = {"path": sources[split], "bytes": path.stat().st_size if path.is_file() else None,
                                "records": len(conversations), "fingerprint": conversations.fingerprint()}
    return out


def tokenize_data(cfg: Config, records: dict, skipped: int, tokenizer) -> Data:
    """Tokenize, then hold out the eval set and (data.warmup_fraction / warmup_size) the warm-up set from the pool
    when they are not given as files. Which examples form the pool depends on `cfg.data` and the seed alone, never on
    the pipeline or the scorer: every arm of a comparison trains on the same pool."""
    d, truncation = cfg.data, {"examples": 0, "target_tokens": 0, "dropped_examples": 0}

    def tok(recs) -> Examples:
        t = tokenize(recs, tokenizer, d.max_length, d.template)
        truncation["examples"] += t.n_truncated
        truncation["target_tokens"] += t.n_truncated_targets
        truncation["dropped_examples"] += t.n_dropped
        return t

    pool, eval_set, warmup, source = tok(records["train"]), None, None, "none"
    if "eval" in records:
        eval_set = tok(records["eval"])
    elif d.eval_fraction is not None or d.eval_size > 0:
        if d.eval_fraction is None and d.eval_size >= len(pool):
            raise ConfigError(f"data.eval_size={d.eval_size}: the pool has only {len(pool)} examples; hold out fewer "
                              "(data.eval_size=N), a fraction (data.eval_fraction=0.1), or pass data.eval=FILE")
        taken, rest = split_indices(len(pool), d.eval_fraction or d.eval_size, cfg.seed)
        eval_set, pool = pool.subset(taken), pool.subset(rest)
    if "warmup" in records:
        warmup, source = tok(records["warmup"]), "file"
    elif d.warmup is None and (d.warmup_size is not None or d.warmup_fraction is not None):   # a file wins
        if d.warmup_size is not None and d.warmup_size >= len(pool):
            raise ConfigError(f"data.warmup_size={d.warmup_size}: the pool has only {len(pool)} examples left after "
                              "the held-out split; carve fewer, or pass data.warmup=FILE")
        # carved for every arm, used or not: the reference learns from records the cleaned model is not trained on
        taken, rest = split_indices(len(pool), d.warmup_size or d.warmup_fraction, cfg.seed + 1)
        warmup, pool, source = pool.subset(taken), pool.subset(rest), "carved"
    if len(pool) == 0:
        raise ConfigError(f"data.train={d.train!r}: no training example left after the eval/warm-up splits; hold out "
                          "fewer (data.eval_size, data.warmup_fraction) or pass them as files (data.eval, data.warmup)")
    return Data(pool, warmup, eval_set, truncation, skipped, source)


def check_eval_tasks(cfg: Config) -> None:
    """A task with no offline data fails here, before any model loads, saying how to point it at local files."""
    if cfg.eval.tasks:
        try:
            evaluation.check_tasks(list(cfg.eval.tasks), cfg.eval.include_path, cfg.eval.data_root)
        except evaluation.EvalError as e:
            raise ConfigError(f"eval.tasks={list(cfg.eval.tasks)}: {e}") from None
