"""Self-evolving cleaning (the paper's Algorithm 1): the pool split into chunks D_0..D_T; the model that trains
round t is the reference that scores chunk t+1.

  round 0   train the base on D_0 with every token -> round_0/model  (first, the base's own signals on D_1..D_T,
            once, with the untouched weights: they never change)
  round t   score D_t with the current model theta_t as the reference (influence: l(base) - l(theta_t)), choose its
            tokens, continue training theta_t on them -> round_t/model  (an online scorer chooses while it trains)
  output    the last round's model (final/ links to it)
"""
from __future__ import annotations

import gc
import json
import os

import numpy as np

from tokenclean.data import Examples
from tokenclean.pipelines.job import Job
from tokenclean.rundir import atomic_write_text
from tokenclean.train import plan_steps


def run(job: Job) -> tuple[dict, list]:
    job.evaluate_base_tasks()
    chunks = make_chunks(job)
    round_steps = [len(plan_steps(len(c), job.cfg.training, 0)) for c in chunks]
    # What is alive now (modules, data, config) lives to the end: frozen out of the garbage collector, the full
    # collections each round's checkpoint runs (Job.save_model, accelerate's free_memory) scan only what the rounds
    # create, not the whole heap (seconds per round otherwise). Memory only: nothing computed depends on it.
    gc.collect()
    gc.freeze()
    try:
        for t in range(len(chunks)):
            if not job.run.done(f"round_{t}"):
                train_round(job, t, chunks, round_steps)
    finally:
        gc.unfreeze()
    last = len(chunks) - 1
    if job.acc.is_main_process and not (job.run.path / "final").exists():
        os.symlink(f"round_{last}/model", job.run.path / "final")
    job.acc.wait_for_everyone()
    return summarize(job, last), [(c, f"round_{t}/") for t, c in enumerate(chunks)]


def make_chunks(job: Job) -> list[Examples]:
    """Chunks D_0..D_T of the pool (seeded shuffle, or contiguous), their indices written to chunks.json."""
    p, n = job.cfg.pipeline, len(job.data.train)
    order = np.random.default_rng(job.cfg.seed).permutation(n) if p.shuffle else np.arange(n)
    if p.chunk_sizes is not None:
        sizes = list(p.chunk_sizes)
    elif p.chunk_fractions is not None:
        sizes = [int(x * n) for x in p.chunk_fractions]
    else:
        sizes = [len(c) for c in np.array_split(np.arange(n), p.chunks)]   # the remainder is spread, not dropped
    if sum(sizes) > n:
        raise ValueError(f"pipeline.chunk_sizes={sizes} asks for {sum(sizes)} examples; the training pool has {n}")
    if min(sizes) < 1:
        raise ValueError(f"pipeline.chunks={p.chunks}: the training pool has only {n} examples")
    bounds = np.cumsum([0] + sizes)
    indices = [np.sort(order[bounds[i]:bounds[i + 1]]) for i in range(len(sizes))]
    if job.acc.is_main_process:
        atomic_write_text(job.run.path / "chunks.json", json.dumps([c.tolist() for c in indices]))
    return [job.data.train.subset(c) for c in indices]


def train_round(job: Job, t: int, chunks: list[Examples], round_steps: list[int]) -> None:
    p, stage, chunk = job.cfg.pipeline, f"round_{t}", chunks[t]
    previous = job.run.path / f"round_{t - 1}" / "model"
    continue_adapter = t > 0 and job.cfg.model.lora.enabled and p.lora == "continue"
    start = job.base_dir if t == 0 or continue_adapter else str(previous)
    continuous = p.schedule == "continuous"
    with job.run.stage(stage) as st:
        model = job.train_model(start, stage, len(chunk), adapter=str(previous / "adapter") if continue_adapter
                                else None, steps_before=sum(round_steps[:t]) if continuous else 0,
                                steps_total=sum(round_steps) if continuous else None)
        selector, scores, keep = None, None, chunk.target
        if t == 0:
            st.info["eval_base"] = job.evaluate(model.model, "base", round_index=0)
            job.base_signals(model.model, [(f"round_{k}/base_losses", chunks[k]) for k in range(1, len(chunks))])
        elif job.scored and job.scorer.online:   # ranked per batch while this round trains: no reference pass
            selector = job.online_selector(chunk.target, job.load_array(f"{stage}/base_losses"))
        else:
            scores, keep = select_round(job, model.model, stage, chunk)
        trained = job.fit(model, chunk, keep, stage, round_index=t, online=selector)
        st.info.update(trained)
        if selector is not None:
            st.info.update(job.finish_online(selector, f"{stage}/"))
            scores, keep = job.load_array(f"{stage}/scores"), job.load_array(f"{stage}/keep")
        # the held-out loss and the task accuracy every eval.every-th round and the last (the base: always, above)
        evaluated = t % job.cfg.eval.every == 0 or t == len(chunks) - 1
        ev = job.evaluate(model.model, stage, round_index=t) if evaluated else {}
        job.save_model(model, f"{stage}/model", start)
        if evaluated:
            st.info["tasks"] = job.evaluate_tasks(job.run.path / stage / "model", stage, t)
        st.info.update(job.round_metrics(t, scores, keep, chunk.target, **ev, train_seconds=trained["train_seconds"],
                                         steps=trained["steps"]))


def select_round(job: Job, model, stage: str, chunk: Examples):
    """Score chunk t with the current model as the reference and choose its tokens (once: a resumed round reads
    the stored decision back)."""
    if not job.run.done(f"{stage}.select"):
        with job.run.stage(f"{stage}.select") as st:
            scored = None
            if job.scored:
                reference = None
                if job.scorer.needs_reference:
                    reference = job.losses(model, chunk, f"{stage} reference losses")
                    job.save_array(reference, f"{stage}/reference_losses")
                scored = job.scorer.score(job.signals(chunk, f"{stage}/base_losses", reference))
                st.info.update(scored.info)
            job.save_scored(scored, job.decide(scored, chunk.target, job.stage_seed(stage)), f"{stage}/")
    scores = job.load_array(f"{stage}/scores") if job.run.has_array(f"{stage}/scores") else None
    return scores, job.load_array(f"{stage}/keep")


def summarize(job: Job, last: int) -> dict:
    rounds = [{"round": t, **job.run.get(f"round_{t}")} for t in range(last + 1)]
    kept, target = sum(r["tokens_kept"] for r in rounds), sum(r["tokens_target"] for r in rounds)
    weight = sum(r.get("weight_sum", r["tokens_kept"]) for r in rounds)   # soft weights (a whole round weighs 1)
    out = {"pipeline": "self_evolving",
           "rounds": [{**{k: r.get(k) for k in ("round", "tokens_target", "tokens_kept", "kept_ratio", "eval_loss")},
                       **({"weight_sum": r["weight_sum"]} if "weight_sum" in r else {})} for r in rounds],
           "tokens_scored": sum(r["tokens_target"] for r in rounds[1:]), "tokens_target": target,
           "tokens_kept": kept, "kept_ratio": weight / max(target, 1),
           **({"weight_sum": weight} if any("weight_sum" in r for r in rounds) else {}),
           "eval_loss_before": rounds[0].get("eval_base", {}).get("eval_loss"),
           "eval_loss_after": rounds[-1].get("eval_loss"), "checkpoint": str(job.run.path / f"round_{last}/model")}
    if job.cfg.eval.tasks:
        out["tasks"] = {"base": job.run.get("base_tasks")["tasks"], "final": rounds[-1]["tasks"],
                        "rounds": {r["round"]: r["tasks"] for r in rounds if r.get("tasks")}}
    return out
