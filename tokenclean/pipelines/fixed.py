"""Fixed-model cleaning: one scoring pass over the pool with a fixed reference, then fine-tune the base.

  1. reference  fine-tune the base on the warm-up set with every token -> reference/  (only for scorers that compare
                with a reference; the base's own losses on the pool come first, from the same weights in memory)
  2. select     score the pool once and choose its tokens -> scores, keep  (an online scorer chooses while step 3
                trains instead; a baseline needs no scores)
  3. final      fine-tune the base on the cleaned labels -> final/  (skipped with pipeline.train_final=false: a
                score-only run, whose cleaned.parquet another trainer trains on)
"""
from __future__ import annotations

import dataclasses
import time

from tokenclean import selection
from tokenclean.pipelines.artefacts import POOL
from tokenclean.pipelines.job import Job, check_keeps_some
from tokenclean.pipelines.summary import Summary

# training keys that never change the reference's weights (logging, resumable states): not in its cache key
BOOKKEEPING = ("log_every", "save_every", "keep_checkpoints")


def run(job: Job) -> tuple[Summary, list]:
    check_keeps_some(job.cfg, job.data.train.target, "the pool")   # before the reference trains
    job.evaluate_base_tasks()
    if job.scored and job.scorer.needs_reference and not job.run.done("reference"):
        train_reference(job)
    if not job.run.done("select"):
        select(job)
    if job.cfg.pipeline.train_final and not job.run.done("final"):
        train_final(job)
    return summarize(job), [(job.data.train, POOL)]


def train_reference(job: Job) -> None:
    """The reference, its losses on the pool and its metrics, or the same from the score cache: they depend on the
    base, the warm-up set, the pool, the held-out set and the training recipe, never on the selection (nor on the
    pipeline: self-evolving with first_reference=warmup trains the same one).)."""
    d, cfg = job.data, job.cfg
    base_parts = [(POOL, d.train)]   # the base's own signals on the pool, before the first update

    def train() -> dict:
        info = {}
        model = job.train_model(job.base_dir, "reference", len(d.warmup))
        info["eval_base"] = job.evaluate(model.model, "base")
        job.base_signals(model.model, base_parts)
        info.update(job.fit(model, d.warmup, d.warmup.target, "reference"))
        started = time.perf_counter()
        job.save_array(job.losses(model.model, d.train, "reference losses"), POOL.reference_losses)
        info["score_seconds"] = round(time.perf_counter() - started, 2)
        info["eval_reference"] = job.evaluate(model.model, "reference")
        job.save_model(model, "reference", job.base_dir)
        return info

    training = {k: v for k, v in dataclasses.asdict(cfg.training).items() if k not in BOOKKEEPING}
    inputs = job.cache_inputs(warmup=d.warmup.fingerprint(), pool=d.train.fingerprint(),
                              eval=d.eval.fingerprint() if d.eval else None, seed=cfg.seed, training=training)
    with job.run.stage("reference") as st:
        st.info.update(job.cached_stage("reference", inputs, {"reference_losses": POOL.reference_losses},
                                        ("reference",), train))
        if st.info.get("cached"):
            job.global_step += st.info["steps"]   # as if trained here: later stages log on the same step axis
            job.run.data["global_step"] = job.global_step
            job.base_signals(lambda: job.scoring_model(job.base_dir), base_parts)   # unless cached too
        st.info["tasks"] = job.evaluate_tasks(job.run.path / "reference", "reference")


def select(job: Job) -> None:
    d, scorer = job.data, job.scorer
    with job.run.stage("select") as st:
        if job.scored and scorer.online:      # chosen per batch while the final stage trains
            st.info.update(online=True, tokens_target=d.train.n_targets)
            return
        scored = None
        if job.scored:
            if (scorer.uses_base or scorer.base_entropy) and not job.run.done("base_losses"):
                job.base_signals(lambda: job.scoring_model(job.base_dir), [(POOL, d.train)])
            reference = job.load_array(POOL.reference_losses) if scorer.needs_reference else None
            scored = scorer.score(job.signals(d.train, POOL, reference))
            st.info.update(scored.info)
        keep = job.decide(scored, d.train.target, job.cfg.seed)
        job.save_scored(scored, keep, POOL)
        st.info.update(job.round_metrics(0, scored and scored.scores, keep, d.train.target))


def train_final(job: Job) -> None:
    d, scorer, run = job.data, job.scorer, job.run
    online = job.scored and scorer.online
    with run.stage("final") as st:
        model = job.train_model(job.base_dir, "final", len(d.train))
        st.info["eval_base"] = run.get("reference")["eval_base"] if run.done("reference") else \
            job.evaluate(model.model, "base")
        selector = None
        if online:
            if scorer.cached == "base":   # the base's losses come from these weights, before the first update
                job.base_signals(model.model, [(POOL, d.train)])
            selector = job.online_selector(d.train.target, POOL)
        st.info.update(job.fit(model, d.train, d.train.target if online else job.load_array(POOL.keep), "final",
                               online=selector, names=POOL))
        if selector is not None:
            st.info.update(job.finish_online(selector, POOL))
            st.info.update(selection.summary(job.load_array(POOL.keep), d.train.target))
        st.info["eval_final"] = job.evaluate(model.model, "final")
        job.save_model(model, "final", job.base_dir)
        st.info["tasks"] = job.evaluate_tasks(job.run.path / "final", "final")


def summarize(job: Job) -> Summary:
    run = job.run
    fin, sel = run.get("final") if run.done("final") else None, run.get("select")
    if sel.get("online"):   # the decisions as each token was trained, counted over every trained occurrence
        kept, soft = fin["online_kept_total"], "weight_sum" in fin   # soft weights: kept is their sum
        sel = {"tokens_target": sel["tokens_target"], "tokens_kept": fin["tokens_kept"] if soft else kept,
               "kept_ratio": kept / max(fin["online_tokens_trained"], 1), **({"weight_sum": kept} if soft else {})}
    reference = run.get("reference") if run.done("reference") else None
    eval_base = fin["eval_base"] if fin else reference["eval_base"] if reference else {}
    out = Summary("fixed", tokens_scored=job.data.train.n_targets if job.scored else 0,
                  tokens_target=sel["tokens_target"], tokens_kept=sel["tokens_kept"], kept_ratio=sel["kept_ratio"],
                  weight_sum=sel.get("weight_sum"), eval_loss_before=eval_base.get("eval_loss"),
                  eval_loss_after=fin["eval_final"].get("eval_loss") if fin else None,
                  checkpoint=str(run.path / "final") if fin else None, final_trained=fin is not None)
    if reference:
        out.eval_loss_reference = reference["eval_reference"].get("eval_loss")
    if job.cfg.eval.tasks:
        out.tasks = {"base": run.get("base_tasks")["tasks"], **({"final": fin["tasks"]} if fin else {})}
        if reference:
            out.tasks["reference"] = reference["tasks"]
    return out
