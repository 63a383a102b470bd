"""Fixed-model cleaning: one scoring pass over the pool with a fixed reference, then fine-tune the base.

  1. reference  fine-tune the base on the warm-up set with every token -> reference/  (only for scorers that compare
                with a reference; the base's own losses on the pool come first, from the same weights in memory)
  2. select     score the pool once and choose its tokens -> scores, keep  (an online scorer chooses while step 3
                trains instead; a baseline needs no scores)
  3. final      fine-tune the base on the cleaned labels -> final/
"""
from __future__ import annotations

import time

from tokenclean import selection
from tokenclean.pipelines.job import Job

BASE = "losses/base"


def run(job: Job) -> tuple[dict, list]:
    if job.scored and job.scorer.needs_reference and not job.run.done("reference"):
        train_reference(job)
    if not job.run.done("select"):
        select(job)
    if not job.run.done("final"):
        train_final(job)
    return summarize(job), [(job.data.train, "")]


def train_reference(job: Job) -> None:
    d = job.data
    with job.run.stage("reference") as st:
        model = job.train_model(job.base_dir, "reference", len(d.warmup))
        st.info["eval_base"] = job.evaluate(model.model, "base")
        job.base_signals(model.model, [(BASE, d.train)])
        st.info.update(job.fit(model, d.warmup, d.warmup.target, "reference"))
        started = time.perf_counter()
        job.save_array(job.losses(model.model, d.train, "reference losses"), "losses/reference")
        st.info["score_seconds"] = round(time.perf_counter() - started, 2)
        st.info["eval_reference"] = job.evaluate(model.model, "reference")
        job.save_model(model, "reference", job.base_dir)


def select(job: Job) -> None:
    d, scorer = job.data, job.scorer
    with job.run.stage("select") as st:
        if job.scored and scorer.online:      # chosen per batch while the final stage trains
            st.info.update(online=True, tokens_target=d.train.n_targets)
            return
        scored = None
        if job.scored:
            if (scorer.uses_base or scorer.base_entropy) and not job.run.done("base_losses"):
                job.base_signals(job.scoring_model(job.base_dir), [(BASE, d.train)])
            scored = scorer.score(job.signals(d.train, BASE, "losses/reference" if scorer.needs_reference else None))
            st.info.update(scored.info)
        keep = job.decide(scored, d.train.target, job.cfg.seed)
        job.save_scored(scored, keep, "")
        st.info.update(job.round_metrics(0, scored and scored.scores, keep, d.train.target))


def train_final(job: Job) -> None:
    d, scorer, run = job.data, job.scorer, job.run
    online = job.scored and scorer.online
    with run.stage("final") as st:
        model = job.train_model(job.base_dir, "final", len(d.train))
        st.info["eval_base"] = run.get("reference")["eval_base"] if run.done("reference") else \
            job.evaluate(model.model, "base")
        selector = None
        if online:   # the base's losses come from these weights, before the first update
            job.base_signals(model.model, [(BASE, d.train)])
            selector = job.online_selector(d.train.target, job.load_array(
                BASE if scorer.cached == "base" else "losses/reference"))
        st.info.update(job.fit(model, d.train, d.train.target if online else job.load_array("keep"), "final",
                               online=selector))
        if selector is not None:
            st.info.update(job.finish_online(selector, ""))
            st.info.update(selection.summary(job.load_array("keep"), d.train.target))
        st.info["eval_final"] = job.evaluate(model.model, "final")
        job.save_model(model, "final", job.base_dir)


def summarize(job: Job) -> dict:
    run = job.run
    fin, sel = run.get("final"), run.get("select")
    if sel.get("online"):   # the decisions as each token was trained, counted over every trained occurrence
        sel = {"tokens_target": sel["tokens_target"], "tokens_kept": fin["online_kept_total"],
               "kept_ratio": fin["online_kept_total"] / max(fin["online_tokens_trained"], 1)}
    out = {"pipeline": "fixed", "tokens_scored": job.data.train.n_targets if job.scored else 0,
           "tokens_target": sel["tokens_target"], "tokens_kept": sel["tokens_kept"], "kept_ratio": sel["kept_ratio"],
           "eval_loss_before": fin["eval_base"].get("eval_loss"),
           "eval_loss_after": fin["eval_final"].get("eval_loss"), "checkpoint": str(run.path / "final")}
    if run.done("reference"):
        out["eval_loss_reference"] = run.get("reference")["eval_reference"].get("eval_loss")
    return out
