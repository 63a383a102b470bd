"""What every pipeline runs in: `setup` (read and validate the data, build the accelerator, tokenize, open the run
directory) -> a pipeline (fixed.py, self_evolving.py) -> `finish` (report, summary). The `Job` holds the run's
state and the building blocks the pipelines are written in: train a model, compute per-token losses, store arrays,
evaluate, select. The algorithms themselves live in the pipelines.

Every training stage builds its model from an HF checkpoint on disk (the base, or the previous stage's output), so
an interrupted run that restarts from the manifest loads exactly what the uninterrupted run loaded and reaches the
same masks and weights.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import math
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list

from tokenclean import evaluation, scorers, selection
from tokenclean.assets import resolve_model
from tokenclean.cache import ScoreCache
from tokenclean.config import BASELINES, Config, ConfigError, Method
from tokenclean.data import Examples, tokenizer_fingerprint
from tokenclean.dist import gather, make_accelerator, not_sharded, slurm_to_torch_env
from tokenclean.io import atomic_write_text, cache_root, fingerprint
from tokenclean.losses import TokenLoss, token_losses
from tokenclean.models import load_model, load_tokenizer, model_fingerprint, save_checkpoint
from tokenclean.pipelines.artefacts import Arrays, carries_base_fingerprint
from tokenclean.pipelines.inputs import check_eval_tasks, check_warmup, data_inputs, read_data, tokenize_data
from tokenclean.pipelines.summary import Summary
from tokenclean.ragged import Ragged
from tokenclean.report import write_cleaned, write_html
from tokenclean.rundir import RunDir
from tokenclean.scorers.online import OnlineSelector
from tokenclean.timers import Timers
from tokenclean.tracking import Tracker
from tokenclean.train import Checkpoints, fit, prepare, remove_states

log = logging.getLogger("tokenclean")


def selection_override(cfg: Config) -> str:
    """The override that decides how many tokens a stage keeps, for messages."""
    s = cfg.selection
    if s.method not in BASELINES and scorers.get(cfg.scorer.name).own_rules:
        return f"scorer={cfg.scorer.name} (its own rules)"
    if s.method == Method.threshold:
        return f"selection.threshold={s.threshold}"
    return f"selection.keep_ratio={s.keep_ratio}"


def check_keeps_some(cfg: Config, target: Ragged, where: str) -> None:
    """Before anything trains: a count rule (global, random: floor(n x keep_ratio) of the n response tokens; sample:
    the same per example) that would keep no token of `target` is refused. Rules whose count is known only once
    scored (threshold, a scorer's own rules) are checked on the decision itself (Job.fit)."""
    s = cfg.selection
    if s.method not in (Method["global"], Method.sample, Method.random) or (
            s.method not in BASELINES and scorers.get(cfg.scorer.name).own_rules):
        return
    n = target.row_sums() if s.method == Method.sample else target.row_sums().sum()
    if int(selection.kept_count(n, s.keep_ratio).sum()) == 0:
        per = " of any example (method=sample counts per example)" if s.method == Method.sample else ""
        raise ConfigError(f"{selection_override(cfg)} keeps no token{per} of the {int(target.row_sums().sum()):,} "
                          f"response tokens of {where}: nothing to train on. Keep more (a larger "
                          "selection.keep_ratio), or give that stage more data")


def stage_seed(seed: int, stage: str) -> int:
    """The seed of one stage's random choices (its step plan, a random selection): the run's seed and the stage's
    name, so stages never share a stream and a resumed stage draws what it drew before."""
    return int(fingerprint(seed, stage)[:8], 16)


def timed(part: str, unless_in: tuple[str, ...] = ()):
    """A Job method whose time counts as `part` of the run (Job.timers, summary.json's "timers")."""
    def wrap(method):
        @functools.wraps(method)
        def timed_method(self, *args, **kwargs):
            with self.timers.part(part, unless_in):
                return method(self, *args, **kwargs)
        return timed_method
    return wrap


class Job:
    def __init__(self, cfg: Config, run_dir: Path, config_dict: dict, timers: Timers):
        self.timers = timers
        self.cfg, self.scorer = cfg, scorers.get(cfg.scorer.name)
        check_warmup(cfg)
        slurm_to_torch_env()
        check_eval_tasks(cfg)
        self.scored = cfg.selection.method not in BASELINES   # the baselines run no scorer
        records, skipped = read_data(cfg)
        # a built-in model is built (once, cached) before the Accelerator exists: under ZeRO-3 every model
        # construction after it is a collective (deepspeed.zero.Init) that the other ranks would never join. Every
        # rank calls it; a file lock in the cache lets one process per machine build while the others wait.
        self.base_dir = resolve_model(cfg.model.name_or_path)
        self.acc = make_accelerator(cfg.training.mixed_precision)
        self.tokenizer = load_tokenizer(self.base_dir)
        self.pad_id = self.tokenizer.pad_token_id
        self.base_fp, self.tokenizer_fp = model_fingerprint(self.base_dir), tokenizer_fingerprint(self.tokenizer)
        self.data = tokenize_data(cfg, records, skipped, self.tokenizer)
        d = self.data
        data_fp = fingerprint(d.train.fingerprint(), d.eval.fingerprint() if d.eval else "",
                              d.warmup.fingerprint() if d.warmup else "")
        inputs = {"model": {"path": str(self.base_dir), "fingerprint": self.base_fp},
                  "tokenizer": {"path": str(self.base_dir), "fingerprint": self.tokenizer_fp},
                  **data_inputs(cfg, records)}
        self.run = RunDir(run_dir, self.acc, config_dict, data_fp, cfg.resume,
                          verify_array=lambda path: Ragged.verify(path, hashes=False), inputs=inputs)
        self.tracker = Tracker(self.run.path, cfg, config_dict, self.run.data["run_id"],
                               enabled=self.acc.is_main_process)
        self.global_step = self.run.data.get("global_step", 0)
        self.started = time.perf_counter()
        if self.acc.is_main_process:
            log.info("data: %d train examples (%d response tokens), %d warm-up, %d eval; %d malformed records "
                     "skipped", len(d.train), d.train.n_targets, len(d.warmup) if d.warmup else 0,
                     len(d.eval) if d.eval else 0, d.skipped_records)

    # -- models ------------------------------------------------------------------------------------------------------
    @timed("load")
    def train_model(self, path: str, stage: str, n_examples: int, adapter: str | None = None,
                    steps_before: int = 0, steps_total: int | None = None):
        """A model from `path`, prepared for training a stage of n_examples (train.Prepared)."""
        lm = load_model(path, self.cfg.model, self.cfg.seed, adapter=adapter)
        return prepare(self.acc, lm, n_examples, self.cfg.training, self.stage_seed(stage), steps_before, steps_total)

    def scoring_model(self, path: str):
        """A whole copy of the model at `path` on this rank's device, for forward passes only."""
        with not_sharded(self.acc):
            lm = load_model(path, self.cfg.model, self.cfg.seed, lora=False)
        return TokenLoss(lm, self.cfg.training.loss_chunk_size, self.cfg.training.loss_kernel).to(self.acc.device)

    @timed("train")
    def fit(self, prepared, examples: Examples, keep: Ragged, stage: str, round_index: int | None = None,
            online=None, names: Arrays | None = None) -> dict:
        """Train a stage, resuming from its last saved state (<run>/<stage>.state/, train.Checkpoints) if an earlier
        run of it was stopped or killed; its saved states are removed once its training is done.

        A scorer that trains its decision with weights of its own (Scorer.step_weights: Forgetting) gets them
        wherever the decision drops a response token; the weights each token carried are stored at
        names.train_weights."""
        t, n_steps, start = self.cfg.training, len(prepared.steps), self.global_step
        weigher = None
        if online is None:
            self.check_trainable(keep, examples, prepared.steps, stage)
            drops = keep.values.dtype == bool and bool((examples.target.values & ~keep.values).any())
            if self.scored and self.scorer.step_weights is not None and drops:
                assert names is not None, f"stage {stage}: where its training weights go"
                online = weigher = self.scorer.step_weights(self.cfg, keep, examples.target, n_steps)
                keep = examples.target        # the hook weighs every response token of each step itself

        def on_step(step, metrics):
            self.global_step = start + step + 1   # from the step index: right in a stage resumed half-way too
            if step % t.log_every == 0 or step == n_steps - 1:
                self.tracker.log(metrics, stage=stage, round=round_index, **{"train/step": self.global_step})

        checkpoints = Checkpoints(self.run.path / f"{stage}.state", t.save_every, t.keep_checkpoints,
                                  extra=lambda: {"global_step": self.global_step})
        stats = fit(self.acc, prepared, examples.input_ids, keep, t, self.pad_id, on_step, desc=stage, online=online,
                    checkpoints=checkpoints)
        remove_states(self.acc, checkpoints)
        self.global_step = start + n_steps
        self.run.data["global_step"] = self.global_step
        last = round(float(stats["train_loss"][-1]), 5) if stats["train_loss"] else None
        info = {"train_seconds": round(stats["seconds"], 2), "steps": stats["steps"], "final_train_loss": last,
                "tokens_per_second": round(float(stats["tokens_per_second"]), 1)}
        if weigher is not None:
            self.save_array(weigher.weights_ragged(), names.train_weights)
            info.update(weigher.summary())
        return info

    def check_trainable(self, keep: Ragged, examples: Examples, steps: list, stage: str) -> None:
        """A stage's decision keeps something: none kept is refused (naming the override), steps that would see no
        kept token are a warning with their count (they train on nothing: the optimiser steps on zero gradients)."""
        per_example = keep.row_sums()
        if per_example.sum() <= 0:
            raise ConfigError(f"{selection_override(self.cfg)} keeps no token of the {examples.n_targets:,} response "
                              f"tokens in stage {stage!r}: nothing to train on. Keep more, or choose another rule "
                              "(selection.method)")
        empty = sum(1 for step in steps if per_example[step].sum() <= 0)
        if empty and self.acc.is_main_process:
            log.warning("stage %s: %d of %d optimiser steps see no kept token (%s keeps %s of the stage's response "
                        "tokens); those steps train on nothing", stage, empty, len(steps), selection_override(self.cfg),
                        f"{per_example.sum():,.0f}")

    @timed("checkpoint")
    def save_model(self, prepared, rel: str, start_dir: str) -> None:
        """Write the stage's model as an HF checkpoint (LoRA merged), then free its model and optimiser."""
        save_checkpoint(self.acc, prepared.model, self.tokenizer, self.run.path / rel, start_dir, self.cfg.model,
                        keep_adapter=self.cfg.model.lora.enabled)
        self.acc.free_memory(prepared.model, prepared.optimizer)
        prepared.model = prepared.optimizer = prepared.scheduler = None   # else this object keeps them alive
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def stage_seed(self, stage: str) -> int:
        return stage_seed(self.cfg.seed, stage)

    # -- per-token arrays --------------------------------------------------------------------------------------------
    @timed("reference_pass", unless_in=("eval", "base_pass"))
    def losses(self, model, examples: Examples, desc: str, entropy: bool = False):
        return token_losses(self.acc, model, examples.input_ids, examples.target,
                            self.cfg.training.score_batch_size, self.pad_id, desc=desc, entropy=entropy)

    @timed("base_pass")
    def base_signals(self, model, parts: list[tuple[Arrays, Examples]]) -> None:
        """The one producer of base-model signals: per-token losses of the untouched base (and its predictive
        entropies, when the scorer reads them) on every part, once per run (stage base_losses), stored at each
        part's base_losses (and base_entropy). `model` may be a function that builds it: a hit in the score cache
        (tokenclean/cache.py) then loads no model."""
        if self.run.done("base_losses"):
            return
        entropy = self.scorer.base_entropy and self.scored
        kinds = ("losses", "entropy") if entropy else ("losses",)
        arrays = {f"part{i}.{kind}": names.base(kind) for i, (names, _) in enumerate(parts) for kind in kinds}
        t = self.cfg.training
        # every part is scored in one pass (its batches mix the parts), so the key is the parts, in order
        inputs = self.cache_inputs(parts=[p.fingerprint() for _, p in parts], entropy=entropy,
                                   score_batch_size=t.score_batch_size, loss_chunk_size=t.loss_chunk_size,
                                   loss_kernel=str(t.loss_kernel))   # fused and chunked round differently on GPU

        def compute() -> dict:
            every = Examples(Ragged.concat([p.input_ids for _, p in parts]),
                             Ragged.concat([p.target for _, p in parts]))
            out = self.losses(model if isinstance(model, torch.nn.Module) else model(), every, "base losses",
                              entropy=entropy)
            out = out if isinstance(out, tuple) else (out,)
            lo = 0
            for names, part in parts:
                rows = range(lo, lo + len(part))
                for kind, array in zip(kinds, out):
                    self.save_array(array.select(rows), names.base(kind))
                lo += len(part)
            return {}

        with self.run.stage("base_losses") as st:
            st.info.update(self.cached_stage("base_losses", inputs, arrays, (), compute))

    def signals(self, examples: Examples, names: Arrays, reference: Ragged | None = None) -> scorers.Signals:
        """What an offline scorer reads for `examples`: the stored base signals, the reference's losses, and what a
        scorer that runs models of its own needs (XTF)."""
        def stored(rel):
            return self.load_array(rel) if self.run.has_array(rel) else None

        return scorers.Signals(
            examples, base_losses=stored(names.base_losses), base_entropy=stored(names.base_entropy),
            reference_losses=reference,
            cfg=self.cfg, accelerator=self.acc, tokenizer=self.tokenizer, base_dir=self.base_dir)

    def save_array(self, array: Ragged, rel: str) -> None:
        self.run.save_array(array, rel, self.array_meta(rel))

    def load_array(self, rel: str) -> Ragged:
        return Ragged.load(self.run.path / rel, self.array_meta(rel), mmap=False)

    def array_meta(self, rel: str) -> dict:
        """Per-token arrays carry the fingerprints of the data and tokenizer they were computed from (and, for the
        base's own signals, of the base model); an array whose fingerprints differ is refused on load."""
        meta = {"data_fingerprint": self.run.data["data_fingerprint"], "tokenizer_fingerprint": self.tokenizer_fp}
        if carries_base_fingerprint(rel):
            meta["model_fingerprint"] = self.base_fp
        return meta

    # -- decisions ---------------------------------------------------------------------------------------------------
    @timed("select")
    def decide(self, scored: scorers.Scored | None, target: Ragged, seed: int) -> Ragged:
        """The keep mask (or soft weights) from a scorer's answer: its own decision where it has one (XTF's rules),
        else selection.method over its scores. The baselines (all, random) need no scores."""
        s = self.cfg.selection
        if scored is not None and s.method == Method.soft and scored.weights is not None:
            return scored.weights
        if scored is not None and s.method != Method.soft and scored.keep is not None:
            return scored.keep
        return selection.select(scored.scores if scored else None, target, s.method, s.keep_ratio, s.threshold,
                                s.temperature, seed)

    def online_selector(self, target: Ragged, names: Arrays, reference: str | Path | None = None):
        """The online scorer's per-batch selector over `target`, with the losses its declaration caches (stored at
        `names`: the base's, the reference's, or none) and its own rule where it has one. A scorer that needs the
        scorer with a hook of its own (Scorer.online_hook) gets it, and with Scorer.reference_model a whole copy of
        the stage's reference (`reference`: its checkpoint; default the fixed pipeline's warm-up model)."""
        s, scorer = self.cfg.selection, self.scorer
        cached = {"base": names.base_losses, "reference": names.reference_losses, None: None}[scorer.cached]
        cached = self.load_array(cached) if cached else None
        if scorer.online_hook is not None:   # a hook of its own (ssToken, EKSFT)
            model = None
            if scorer.reference_model:
                with self.timers.part("load"):
                    model = self.scoring_model(str(reference or self.run.path / "reference"))
                model.eval().requires_grad_(False)
            return scorer.online_hook(self.cfg, target, cached, model)
        rule = scorer.online_rule(self.cfg) if scorer.online_rule is not None else None
        return OnlineSelector(scorer.online_score, cached, target, s.method,
                              s.keep_ratio, s.threshold, self.cfg.scorer.online_scope, s.temperature, rule=rule)

    def finish_online(self, selector, names: Arrays) -> dict:
        """Store what an online selector chose (its scores and decisions, as when each token was trained)."""
        selector.finish(self.acc)
        self.save_array(selector.scores_ragged(), names.scores)
        self.save_array(selector.keep_ragged(), names.keep)
        for rel, array in selector.arrays().items():
            self.save_array(array, names.scorer_array(rel))
        return selector.summary()

    @timed("select")
    def save_scored(self, scored: scorers.Scored | None, keep: Ragged, names: Arrays) -> None:
        """The decision (keep mask or weights) and what the scorer produced."""
        for rel, array in (scored.arrays.items() if scored else ()):
            self.save_array(array, names.scorer_array(rel))
        if scored is not None and scored.scores is not None:
            self.save_array(scored.scores, names.scores)
        self.save_array(keep, names.keep)

    # -- metrics -----------------------------------------------------------------------------------------------------
    @timed("eval")
    def evaluate(self, model, stage: str, round_index: int | None = None) -> dict:
        """Held-out loss over every response token (a diagnostic: it counts the tokens cleaning drops on purpose)."""
        if self.data.eval is None:
            return {}
        losses = self.losses(model, self.data.eval, f"eval {stage}")
        v = losses.values[~np.isnan(losses.values)]
        out = {"eval_loss": float(v.mean()), "eval_ppl": float(math.exp(v.mean()))}
        self.tracker.log({f"eval/{k[5:]}": x for k, x in out.items()}, stage=stage, round=round_index,
                         **{"train/step": self.global_step})
        return out

    @timed("eval")
    def evaluate_tasks(self, checkpoint, label: str, round_index: int | None = None) -> dict:
        """Task accuracy of the HF checkpoint at `checkpoint` with lm-evaluation-harness on local data (eval.tasks;
        {} when there are none). Every rank takes part (lm-eval splits the requests over the ranks, each with a
        whole copy of the model); the scores go to metrics.jsonl / wandb with `round` as their x-axis."""
        e = self.cfg.eval
        if not e.tasks:
            return {}
        dtype = "bfloat16" if self.acc.mixed_precision == "bf16" and torch.cuda.is_available() else "float32"
        with not_sharded(self.acc):
            scores = evaluation.evaluate(str(checkpoint), list(e.tasks), limit=e.limit, num_fewshot=e.num_fewshot,
                                         batch_size=e.batch_size, device=str(self.acc.device), dtype=dtype,
                                         seed=self.cfg.seed, include_path=e.include_path, data_root=e.data_root)
        scores = gather(self.acc, [scores if self.acc.is_main_process else None])[0]
        self.tracker.log({f"task/{t}/{k}": v for t, r in scores.items() for k, v in r.items() if k != "n"},
                         stage=label, round=round_index, **{"train/step": self.global_step})
        return scores

    def evaluate_base_tasks(self) -> None:
        """The base model's task accuracy, once per run (stage base_tasks), beside every later one."""
        if self.cfg.eval.tasks and not self.run.done("base_tasks"):
            with self.run.stage("base_tasks") as st:
                st.info["tasks"] = self.evaluate_tasks(self.base_dir, "base", 0)

    def round_metrics(self, round_index: int, scores: Ragged | None, keep: Ragged, target: Ragged, **extra) -> dict:
        m = selection.summary(keep, target)
        if scores is not None:
            v = scores.values[np.asarray(target.values, dtype=bool)]
            m.update(score_mean=float(np.mean(v)), score_std=float(np.std(v)),
                     score_q10=float(np.quantile(v, 0.1)), score_q90=float(np.quantile(v, 0.9)))
            self.tracker.histogram("round/score_histogram", v, round_index)
        m.update(extra)
        self.tracker.log({f"round/{k}": v for k, v in m.items() if isinstance(v, (int, float))}, round=round_index)
        return m


    # -- the score cache (tokenclean/cache.py) -----------------------------------------------------------------------
    def cache_inputs(self, **inputs) -> dict:
        """A cache key's inputs: `inputs` and what every cached stage depends on: the base model and tokenizer, the
        model group, tokenization, and the compute environment (precision, device, processes, library versions),
        since any of them can change the bits."""
        def installed(package):
            try:
                return version(package)
            except PackageNotFoundError:
                return None

        model = {k: v for k, v in dataclasses.asdict(self.cfg.model).items() if k != "name_or_path"}  # base_fp names it
        device = self.acc.device
        env = {"mixed_precision": str(self.acc.mixed_precision), "distributed": str(self.acc.distributed_type),
               "processes": self.acc.num_processes,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}",
               "versions": {p: installed(p) for p in ("torch", "transformers", "peft", "accelerate", "deepspeed")}}
        return {"base_model": self.base_fp, "tokenizer": self.tokenizer_fp, "model": model,
                "data": {"max_length": self.cfg.data.max_length, "template": self.cfg.data.template}, "env": env,
                **inputs}

    def cached_stage(self, kind: str, inputs: dict, arrays: dict[str, str], dirs: tuple[str, ...], compute) -> dict:
        """compute() writes `arrays` (entry name -> rel path) and `dirs` (rel paths) in the run directory and returns
        the stage's info; unless the score cache holds an entry for `inputs`: then its files are linked into the run
        directory instead and its stored info is returned. Either way the info records `cached` and `cache_key`.
        Rank 0 alone reads and writes the cache and tells the others what it found."""
        if not self.cfg.cache:
            return compute()
        cache, run, main = ScoreCache(cache_root() / "scores"), self.run.path, self.acc.is_main_process
        key = cache.key(kind, inputs)
        info = None
        if main:
            dest = {**{f"{name}.": f"{run / rel}." for name, rel in arrays.items()},
                    **{f"{rel}/": f"{run / rel}/" for rel in dirs}}
            info = cache.restore(key, dest)
        if self.acc.num_processes > 1:
            info = broadcast_object_list([info])[0]
        if info is not None:
            for rel in arrays.values():   # each array's sidecar, written last, holds this run's fingerprints
                if main:
                    Ragged.write_meta(run / rel, self.array_meta(rel))
                if self.run.running:      # listed with the stage, as save_array does
                    self.run.running[-1].arrays.append(rel)
            self.acc.wait_for_everyone()
            return {**info, "cached": True, "cache_key": key.name}
        info = compute()
        if main:
            files = {f"{name}.{part}.npy": run / f"{rel}.{part}.npy" for name, rel in arrays.items()
                     for part in ("values", "offsets")}
            files.update({f"{rel}/{f.relative_to(run / rel)}": f for rel in dirs
                          for f in sorted((run / rel).rglob("*")) if f.is_file()})
            try:
                cache.put(key, files, info)
            except OSError as e:   # e.g. a read-only shared cache: this run's results stand without it
                log.warning("score cache: could not store %s: %s", key.name, e)
        return {**info, "cached": False, "cache_key": key.name}


def setup(cfg: Config, run_dir: Path, config_dict: dict) -> Job:
    timers = Timers()
    with timers.part("setup"):
        return Job(cfg, run_dir, config_dict, timers)


def finish(job: Job, summary: Summary, parts: list[tuple[Examples, Arrays]]) -> Summary:
    """Write cleaned.parquet and report.html over `parts` (examples, the names of their arrays), summary.json,
    and close the tracker."""
    d = job.data
    summary.seconds, summary.run_dir = round(time.perf_counter() - job.started, 1), str(job.run.path)
    summary.pool = {"examples": len(d.train), "warmup_source": d.warmup_source,
                    "warmup_examples": len(d.warmup) if d.warmup is not None else None}
    summary.truncation, summary.malformed_records_skipped = d.truncation, d.skipped_records
    with job.timers.part("report"):
        if job.acc.is_main_process:
            write_reports(job, parts)
    summary.timers = job.timers.summary()
    written = summary.to_json()
    if job.acc.is_main_process:
        atomic_write_text(job.run.path / "summary.json", json.dumps(written, indent=1))
    job.tracker.finish(flat(written))
    job.acc.wait_for_everyone()     # every rank leaves together, so none tears its process group down mid-collective
    return summary


def write_reports(job: Job, parts: list[tuple[Examples, Arrays]]) -> None:
    """cleaned.parquet (the decisions as labels) and report.html (every token, coloured by its decision)."""
    def stored(rel, default):
        return job.load_array(rel) if job.run.has_array(rel) else default

    ids, target, keep, cleaned, scores, records, reasons = [], [], [], [], [], [], {}
    for examples, names in parts:
        ids.append(examples.input_ids)
        records.append(examples.record_indices)
        target.append(examples.target)
        keep.append(stored(names.keep, examples.target))   # e.g. round 0: every response token
        cleaned.append(stored(names.train_weights, keep[-1]))   # signed weights where training weighed the decision
        nan = np.full(len(examples.target.values), np.nan, np.float32)
        scores.append(stored(names.scores, examples.target.like(nan)))
        for label, rel in job.scorer.reasons if job.scored else ():
            if job.run.has_array(names.scorer_array(rel)):
                reasons.setdefault(label, []).append(job.load_array(names.scorer_array(rel)))
    cat = Ragged.concat
    if any(k.values.dtype != bool for k in keep):   # soft weights: a round kept whole weighs 1
        keep = [k.like(np.asarray(k.values, np.float32)) for k in keep]
    if any(c.values.dtype != bool for c in cleaned):
        cleaned = [c.like(np.asarray(c.values, np.float32)) for c in cleaned]
    write_cleaned(job.run.path / "cleaned.parquet", cat(ids), cat(target), cat(cleaned),
                  np.concatenate(records))
    write_html(job.run.path / "report.html", job.tokenizer, cat(ids), cat(target), cat(keep), cat(scores),
               {k: cat(v) for k, v in reasons.items() if len(v) == len(parts)}, title=job.run.path.name)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out
