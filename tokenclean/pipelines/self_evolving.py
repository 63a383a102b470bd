"""Self-evolving cleaning (the paper's Algorithm 1): the pool split into chunks; the model that trains round t is
the reference that scores the chunk of round t+1. pipeline.first_reference picks where the first reference comes
from (the reference code has both; DESIGN.md section 1):

  round0 (the reference code at HEAD 29362ab): chunks D_0..D_T
  round 0   train the base on D_0 with every token -> round_0/model  (first, the base's own signals on D_1..D_T,
            once, with the untouched weights: they never change)
  warmup (the run behind the paper's numbers, 0f6e3be): chunks D_1..D_T, every one cleaned
  reference the warm-up model: the base trained on data.warmup with every token -> reference/  (the fixed pipeline's
            reference stage itself, shared through the score cache; the base's signals on the pool come first)

  round t   score D_t with the current model theta_t as the reference (influence: l(base) - l(theta_t)), choose its
            tokens, continue training theta_t on them -> round_t/model  (an online scorer chooses while it trains);
            with first_reference=warmup, theta_1 is the warm-up model and D_1's reference losses are the ones the
            reference stage stored
  output    the last round's model (final/ links to it)
"""
from __future__ import annotations

import gc
import json
import os

import numpy as np

from tokenclean.config import ConfigError, FirstReference, RoundLora, RoundSchedule
from tokenclean.data import Examples
from tokenclean.io import atomic_write_text
from tokenclean.pipelines import artefacts, fixed
from tokenclean.pipelines.job import Job, check_keeps_some
from tokenclean.pipelines.summary import Summary
from tokenclean.train import plan_steps


def run(job: Job) -> tuple[Summary, list]:
    job.evaluate_base_tasks()
    chunks, indices = make_chunks(job)
    warm = job.cfg.pipeline.first_reference == FirstReference.warmup
    first = 1 if warm else 0      # the index of the first round that trains (round t trains chunks[t - first])
    for t in range(max(first, 1), first + len(chunks)):   # the rounds that select (round 0 trains every token)
        check_keeps_some(job.cfg, chunks[t - first].target, f"round {t}'s chunk")
    if warm and not job.run.done("reference"):
        fixed.train_reference(job)
    round_steps = [len(plan_steps(len(c), job.cfg.training, 0)) for c in chunks]
    # What is alive now (modules, data, config) lives to the end: frozen out of the garbage collector, the full
    # collections each round's checkpoint runs (Job.save_model, accelerate's free_memory) scan only what the rounds
    # create, not the whole heap (seconds per round otherwise). Memory only: nothing computed depends on it.
    gc.collect()
    gc.freeze()
    try:
        for t in range(first, first + len(chunks)):
            if not job.run.done(f"round_{t}"):
                train_round(job, t, first, chunks, indices, round_steps)
    finally:
        gc.unfreeze()
    rounds = list(range(first, first + len(chunks)))
    if job.acc.is_main_process and not (job.run.path / "final").exists():
        os.symlink(f"round_{rounds[-1]}/model", job.run.path / "final")
    job.acc.wait_for_everyone()
    return summarize(job, rounds), [(c, artefacts.chunk(t)) for t, c in zip(rounds, chunks)]


def make_chunks(job: Job) -> tuple[list[Examples], list[np.ndarray]]:
    """The chunks of the pool (seeded shuffle, or contiguous) and their pool indices, written to chunks.json."""
    p, n = job.cfg.pipeline, len(job.data.train)
    order = np.random.default_rng(job.cfg.seed).permutation(n) if p.shuffle else np.arange(n)
    if p.chunk_sizes is not None:
        sizes = list(p.chunk_sizes)
    elif p.chunk_fractions is not None:
        sizes = [int(x * n) for x in p.chunk_fractions]
    else:
        sizes = [len(c) for c in np.array_split(np.arange(n), p.chunks)]   # the remainder is spread, not dropped
    if sum(sizes) > n:
        raise ConfigError(f"pipeline.chunk_sizes={sizes} asks for {sum(sizes)} examples; the training pool has {n}: "
                          "ask for fewer, or use pipeline.chunk_fractions")
    if min(sizes) < 1:
        raise ConfigError(f"pipeline.chunks={p.chunks}: the training pool has only {n} examples; use fewer chunks")
    bounds = np.cumsum([0] + sizes)
    indices = [np.sort(order[bounds[i]:bounds[i + 1]]) for i in range(len(sizes))]
    if job.acc.is_main_process:
        atomic_write_text(job.run.path / "chunks.json", json.dumps([c.tolist() for c in indices]))
    return [job.data.train.subset(c) for c in indices], indices


def train_round(job: Job, t: int, first: int, chunks: list[Examples], indices: list[np.ndarray],
                round_steps: list[int]) -> None:
    p, stage, k = job.cfg.pipeline, f"round_{t}", t - first     # k: the chunk this round trains
    names = artefacts.chunk(t)
    chunk = chunks[k]
    previous = job.run.path / ("reference" if t == first else f"round_{t - 1}/model")
    continue_adapter = t > 0 and job.cfg.model.lora.enabled and p.lora == RoundLora["continue"]
    start = job.base_dir if t == 0 or continue_adapter else str(previous)
    continuous = p.schedule == RoundSchedule.continuous
    with job.run.stage(stage) as st:
        model = job.train_model(start, stage, len(chunk), adapter=str(previous / "adapter") if continue_adapter
                                else None, steps_before=sum(round_steps[:k]) if continuous else 0,
                                steps_total=sum(round_steps) if continuous else None)
        selector, scores, keep = None, None, chunk.target
        for kind in ("losses", "entropy") if first else ():   # this chunk's rows of the pool's base signals
            pool_rel, rel = artefacts.POOL.base(kind), names.base(kind)
            if job.run.has_array(pool_rel) and not job.run.has_array(rel):
                job.save_array(job.load_array(pool_rel).select(indices[k]), rel)
        if t == 0:
            st.info["eval_base"] = job.evaluate(model.model, "base", round_index=0)
            job.base_signals(model.model, [(artefacts.chunk(r), chunks[r]) for r in range(1, len(chunks))])
        elif job.scored and job.scorer.online:   # ranked per batch while this round trains: no reference pass
            selector = job.online_selector(chunk.target, names, reference=previous)   # theta_t, for a scorer
            #                                                                    that reads it while training
        else:
            # the warm-up model's losses on this chunk, as the reference stage stored them (not recomputed)
            stored = job.load_array(artefacts.POOL.reference_losses).select(indices[k]) if t == first else None
            scores, keep = select_round(job, model.model, t, chunk, stored)
        trained = job.fit(model, chunk, keep, stage, round_index=t, online=selector, names=names)
        st.info.update(trained)
        if selector is not None:
            st.info.update(job.finish_online(selector, names))
            scores, keep = job.load_array(names.scores), job.load_array(names.keep)
        # the held-out loss and the task accuracy every eval.every-th round and the last (the base: always, above)
        evaluated = t % job.cfg.eval.every == 0 or k == len(chunks) - 1
        ev = job.evaluate(model.model, stage, round_index=t) if evaluated else {}
        job.save_model(model, f"{stage}/model", start)
        if evaluated:
            st.info["tasks"] = job.evaluate_tasks(job.run.path / stage / "model", stage, t)
        st.info.update(job.round_metrics(t, scores, keep, chunk.target, **ev, train_seconds=trained["train_seconds"],
                                         steps=trained["steps"]))


def select_round(job: Job, model, t: int, chunk: Examples, stored_reference=None):
    """Score chunk t with the current model as the reference (or the `stored_reference` losses) and choose its
    tokens (once: a resumed round reads the stored decision back)."""
    stage, names = f"round_{t}", artefacts.chunk(t)
    if not job.run.done(f"{stage}.select"):
        with job.run.stage(f"{stage}.select") as st:
            scored = None
            if job.scored:
                reference = stored_reference
                if job.scorer.needs_reference:
                    if reference is None:
                        reference = job.losses(model, chunk, f"{stage} reference losses")
                    job.save_array(reference, names.reference_losses)
                scored = job.scorer.score(job.signals(chunk, names, reference))
                st.info.update(scored.info)
            job.save_scored(scored, job.decide(scored, chunk.target, job.stage_seed(stage)), names)
    scores = job.load_array(names.scores) if job.run.has_array(names.scores) else None
    return scores, job.load_array(names.keep)


def summarize(job: Job, trained: list[int]) -> Summary:
    rounds = [{"round": t, **job.run.get(f"round_{t}")} for t in trained]
    last = trained[-1]
    kept, target = sum(r["tokens_kept"] for r in rounds), sum(r["tokens_target"] for r in rounds)
    weight = sum(r.get("weight_sum", r["tokens_kept"]) for r in rounds)   # soft weights (a whole round weighs 1)
    out = Summary(
        "self_evolving", tokens_scored=sum(r["tokens_target"] for r in rounds if r["round"] > 0), tokens_target=target,
        tokens_kept=kept, kept_ratio=weight / max(target, 1),
        weight_sum=weight if any("weight_sum" in r for r in rounds) else None,
        eval_loss_before=(job.run.get("reference") if trained[0] else rounds[0]).get("eval_base", {}).get("eval_loss"),
        eval_loss_after=rounds[-1].get("eval_loss"), checkpoint=str(job.run.path / f"round_{last}/model"),
        first_reference=str(job.cfg.pipeline.first_reference),
        rounds=[{**{k: r.get(k) for k in ("round", "tokens_target", "tokens_kept", "kept_ratio", "eval_loss")},
                 **({"weight_sum": r["weight_sum"]} if "weight_sum" in r else {})} for r in rounds])
    if job.cfg.eval.tasks:
        out.tasks = {"base": job.run.get("base_tasks")["tasks"], "final": rounds[-1]["tasks"],
                     "rounds": {r["round"]: r["tasks"] for r in rounds if r.get("tasks")}}
    return out
