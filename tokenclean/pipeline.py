"""The orchestrator: fixed-model and self-evolving Token Cleaning as a chain of resumable stages.

One process per rank runs the whole chain (`tokenclean ...` on one device, `accelerate launch -m tokenclean ...`
on many). Every training stage builds its model from an HF checkpoint on disk (the base, or the previous round's
output), so an interrupted run that restarts from the manifest loads exactly what the uninterrupted run loaded and
reaches the same masks and weights. Stages and their outputs, under the run directory:

  fixed:          base_losses (losses/base) -> reference (reference/, losses/reference) -> select (keep)
                  -> final (final/)
  self_evolving:  chunks.json; round_0 trains the base on chunk 0 with every token (base losses of every other
                  chunk are computed first, with the untouched base, once); round_t scores chunk t with
                  l(base) - l(round_{t-1}), selects, continues training -> round_t/model. The last round's model
                  is the output (final/ links to it).

`manifest.json` lists completed stages (written by rank 0, atomically, after the stage's files). A stage listed
there is never redone; a stage not listed is redone from its start, replacing any partial output.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from tokenclean import scorers, selection
from tokenclean.config import Config
from tokenclean.ragged import Ragged, atomic_write_text, fingerprint

log = logging.getLogger("tokenclean")

CONFIG_KEYS_NOT_AFFECTING_RESULTS = ("resume", "tracking", "name")


class Split:
    """A tokenized set of examples: token ids and the response-token mask, as Ragged arrays."""

    def __init__(self, input_ids: Ragged, target: Ragged):
        self.input_ids, self.target = input_ids, target

    def subset(self, idx) -> "Split":
        return Split(self.input_ids.select(idx), self.target.select(idx))

    def __len__(self):
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return int(np.count_nonzero(self.target.values))

    def fingerprint(self) -> str:
        return fingerprint(self.input_ids, self.target)


class Manifest:
    def __init__(self, run_dir: Path, accelerator):
        self.path = run_dir / "manifest.json"
        self.acc = accelerator
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def get(self, stage: str) -> dict:
        return self.data["stages"][stage]

    def complete(self, stage: str, **info) -> None:
        self.data["stages"][stage] = info
        self.save()

    def save(self) -> None:
        if self.acc.is_main_process:
            atomic_write_text(self.path, json.dumps(self.data, indent=1))
        self.acc.wait_for_everyone()


def _slurm_to_torch_env() -> None:
    """Under srun/submitit (one task per GPU, no launcher), derive torch.distributed's variables from SLURM's."""
    env = os.environ
    if "WORLD_SIZE" in env or int(env.get("SLURM_NTASKS", 1)) <= 1 or "SLURM_PROCID" not in env:
        return
    import subprocess
    first = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True,
                           text=True, check=True).stdout.split()[0]
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
               LOCAL_WORLD_SIZE=env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0],
               MASTER_ADDR=env.get("MASTER_ADDR", first),
               MASTER_PORT=env.get("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)))


def make_accelerator(cfg: Config):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    mp = cfg.training.mixed_precision
    if mp == "auto":
        mp = "bf16" if _bf16_supported() else "no"
    # gloo when there is no GPU (DeepSpeed on CPU needs it spelled out); a bounded timeout, so a rank that dies
    # takes the others down with an error instead of leaving them waiting forever
    _slurm_to_torch_env()
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return Accelerator(mixed_precision=mp)
    handler = InitProcessGroupKwargs(backend=None if torch.cuda.is_available() else "gloo",
                                     timeout=timedelta(seconds=int(os.environ.get("TOKENCLEAN_TIMEOUT", 1800))))
    # without a GPU, plain multi-process (DDP) needs cpu=True, else accelerate records DistributedType.NO: no barrier,
    # no gradient sync, every rank trains alone; DeepSpeed needs cpu=False, else accelerate silently runs DDP instead
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    acc = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available() and not use_deepspeed,
                      kwargs_handlers=[handler])
    if acc.distributed_type.value == "NO" or acc.num_processes != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate set up {acc.distributed_type} with "
                           f"{acc.num_processes} process(es): the ranks would not synchronise")
    return acc


def _bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


class Pipeline:
    def __init__(self, cfg: Config, run_dir: Path, config_dict: dict):
        from tokenclean.assets import resolve_model
        from tokenclean.checkpoints import load_tokenizer, model_fingerprint
        from tokenclean.data import read_records, split_indices, tokenize, tokenizer_fingerprint

        self.cfg, self.run_dir = cfg, Path(run_dir)
        d = cfg.data
        # 1. every record is read and validated before any model is loaded
        train_records, skipped = read_records(d.train, d.format, d.on_error, d.limit)
        warmup_records = eval_records = None
        if d.warmup and cfg.pipeline.name == "fixed":
            warmup_records, s = read_records(d.warmup, d.format, d.on_error)
            skipped += s
        if d.eval:
            eval_records, s = read_records(d.eval, d.format, d.on_error)
            skipped += s
        self.n_skipped_records = skipped

        # a built-in model is built (once, cached) before the Accelerator exists: under ZeRO-3 every model
        # construction after it is a collective (deepspeed.zero.Init) that the other ranks would never join. Every
        # rank calls it; a file lock in the cache lets one process per machine build while the others wait.
        self.base_dir = resolve_model(cfg.model.name_or_path)
        self.acc = make_accelerator(cfg)
        self.tokenizer = load_tokenizer(self.base_dir)
        self.base_fp, self.tokenizer_fp = model_fingerprint(self.base_dir), tokenizer_fingerprint(self.tokenizer)

        def tok(records):
            t = tokenize(records, self.tokenizer, d.max_length, d.template)
            self.truncation["examples"] += t.n_truncated
            self.truncation["target_tokens"] += t.n_truncated_targets
            self.truncation["dropped_examples"] += t.n_dropped
            return Split(t.input_ids, t.target_mask)

        self.truncation = {"examples": 0, "target_tokens": 0, "dropped_examples": 0}
        pool = tok(train_records)
        if eval_records is not None:
            self.eval = tok(eval_records)
        elif d.eval_size > 0:
            taken, rest = split_indices(len(pool), d.eval_size, cfg.seed)
            self.eval, pool = pool.subset(taken), pool.subset(rest)
        else:
            self.eval = None
        self.warmup = None
        if cfg.pipeline.name == "fixed":
            if warmup_records is not None:
                self.warmup = tok(warmup_records)
            else:  # the reference learns from records the cleaned model is not trained on (disjoint sets)
                taken, rest = split_indices(len(pool), d.warmup_fraction, cfg.seed + 1)
                self.warmup, pool = pool.subset(taken), pool.subset(rest)
        self.train = pool
        if len(self.train) == 0:
            raise ValueError(f"data.train={d.train!r}: no training example left after the eval/warm-up splits")

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._check_or_reset(config_dict)
        self.manifest = Manifest(self.run_dir, self.acc)
        run_id = self.manifest.data["run_id"]
        from tokenclean.tracking import Tracker
        self.tracker = Tracker(self.run_dir, cfg, config_dict, run_id, enabled=self.acc.is_main_process)
        self.global_step = self.manifest.data.get("global_step", 0)
        if self.acc.is_main_process:
            atomic_write_text(self.run_dir / "config.yaml", _yaml(config_dict))
        self.pad_id = self.tokenizer.pad_token_id
        self._log_data()

    # ----------------------------------------------------------------- run directory
    def _check_or_reset(self, config_dict: dict) -> None:
        """A run directory belongs to one config and one dataset; resume only into the same ones."""
        manifest = self.run_dir / "manifest.json"
        config_fp = fingerprint(json.dumps({k: v for k, v in config_dict.items()
                                            if k not in CONFIG_KEYS_NOT_AFFECTING_RESULTS}, sort_keys=True))
        data_fp = fingerprint(self.train.fingerprint(), self.eval.fingerprint() if self.eval else "",
                              self.warmup.fingerprint() if self.warmup else "")
        # every rank looks before rank 0 may write one: a rank that looked later would take the other branch below
        # and skip its barrier (the collectives then pair up wrongly and the run hangs)
        existed = manifest.exists()
        self.acc.wait_for_everyone()
        if existed:
            old = json.loads(manifest.read_text())
            same = old.get("config_fingerprint") == config_fp and old.get("data_fingerprint") == data_fp
            if self.cfg.resume and not same:
                what = "config" if old.get("config_fingerprint") != config_fp else "data"
                raise RuntimeError(
                    f"{self.run_dir} holds a run made with a different {what}. Resume it with its own config "
                    f"({self.run_dir / 'config.yaml'}), pick another directory (name=...), or start over there "
                    "with resume=false.")
            if not self.cfg.resume:
                self.acc.wait_for_everyone()
                if self.acc.is_main_process:
                    log.warning("resume=false: clearing %s", self.run_dir)
                    for p in self.run_dir.iterdir():
                        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                self.acc.wait_for_everyone()
            elif self.acc.is_main_process:
                log.info("resuming %s: completed stages %s", self.run_dir, ", ".join(old["stages"]) or "none")
        if not existed or not self.cfg.resume:
            if self.acc.is_main_process:
                atomic_write_text(manifest, json.dumps({"config_fingerprint": config_fp, "data_fingerprint": data_fp,
                                                        "run_id": _run_id(self.run_dir), "stages": {}}, indent=1))
            self.acc.wait_for_everyone()

    def _log_data(self) -> None:
        if not self.acc.is_main_process:
            return
        log.info("data: %d train examples (%d response tokens), %d warm-up, %d eval; %d malformed records skipped",
                 len(self.train), self.train.n_targets, len(self.warmup) if self.warmup else 0,
                 len(self.eval) if self.eval else 0, self.n_skipped_records)

    # ----------------------------------------------------------------- building blocks
    def _model(self, path: str, adapter: str | None = None):
        from tokenclean.checkpoints import load_model
        return load_model(path, self.cfg.model, self.cfg.seed, adapter=adapter)

    def _losses(self, model, split: Split, name: str) -> Ragged:
        from tokenclean.losses import token_losses
        return token_losses(self.acc, model, split.input_ids, split.target, self.cfg.training.score_batch_size,
                            self.pad_id, desc=name)

    def _eval(self, model, stage: str, round: int | None = None) -> dict:
        if self.eval is None:
            return {}
        losses = self._losses(model, self.eval, f"eval {stage}")
        v = losses.values[~np.isnan(losses.values)]
        out = {"eval_loss": float(v.mean()), "eval_ppl": float(math.exp(v.mean()))}
        self.tracker.log({f"eval/{k[5:]}": x for k, x in out.items()}, stage=stage, round=round,
                         **{"train/step": self.global_step})
        return out

    def _prepare(self, lm, n_examples: int, stage: str, steps_before: int = 0, steps_total: int | None = None):
        from tokenclean.train import prepare
        return prepare(self.acc, lm, n_examples, self.cfg.training, _stage_seed(self.cfg.seed, stage),
                       steps_before, steps_total)

    def _fit(self, prepared, split: Split, keep: Ragged, stage: str, round: int | None, online=None) -> dict:
        from tokenclean.train import fit
        n_steps = len(prepared.steps)

        def on_step(step, metrics):
            self.global_step += 1
            if step % self.cfg.training.log_every == 0 or step == n_steps - 1:
                self.tracker.log(metrics, stage=stage, round=round, **{"train/step": self.global_step})

        stats = fit(self.acc, prepared, split.input_ids, keep, self.cfg.training, self.pad_id, on_step, desc=stage,
                    online=online)
        self.manifest.data["global_step"] = self.global_step
        return stats

    def _online(self, cached: Ragged, target: Ragged):
        """The per-batch selector of an online scorer (rho: cached reference losses; self_online: base losses)."""
        s = self.cfg.selection
        return scorers.OnlineSelector(self.cfg.scorer.name, cached, target, s.method, s.keep_ratio, s.threshold,
                                      self.cfg.scorer.online_scope)

    def _online_done(self, sel, rel: str) -> tuple[Ragged, Ragged, dict]:
        """Store what an online selector chose (its scores and keep decisions, as when each token was trained)."""
        sel.finish(self.acc)
        scores, keep = sel.scores_ragged(), sel.keep_ragged()
        self._save_ragged(scores, f"{rel}scores")
        self._save_ragged(keep, f"{rel}keep")
        return scores, keep, sel.summary()

    def _free(self, prepared) -> None:
        """Release a training stage's model, optimiser and engine before the next stage builds its own."""
        self.acc.free_memory(prepared.model, prepared.optimizer)
        prepared.model = prepared.optimizer = prepared.scheduler = None   # else this object keeps them alive
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _select(self, scores: Ragged | None, target: Ragged, seed: int) -> Ragged:
        s = self.cfg.selection
        return selection.keep_mask(scores, target, s.method, s.keep_ratio, s.threshold, seed)

    def _save(self, model, out: Path, start_dir: str) -> None:
        from tokenclean.checkpoints import save_checkpoint
        save_checkpoint(self.acc, model, self.tokenizer, out, start_dir, self.cfg.model,
                        keep_adapter=self.cfg.model.lora.enabled)

    def _save_ragged(self, r: Ragged, rel: str, **meta) -> None:
        """Per-token arrays carry the fingerprints of the data and tokenizer (and, for base losses, of the base
        model) they were computed from; `_load_ragged` refuses an array whose fingerprints differ."""
        if self.acc.is_main_process:
            r.save(self.run_dir / rel, {**self._meta(rel), **meta})
        self.acc.wait_for_everyone()

    def _load_ragged(self, rel: str) -> Ragged:
        return Ragged.load(self.run_dir / rel, self._meta(rel), mmap=False)

    def _meta(self, rel: str) -> dict:
        meta = {"data_fingerprint": self.manifest.data["data_fingerprint"], "tokenizer_fingerprint": self.tokenizer_fp}
        if rel.endswith(("losses/base", "base_losses")):
            meta["model_fingerprint"] = self.base_fp
        return meta

    def _round_metrics(self, round: int, scores: Ragged | None, keep: Ragged, target: Ragged, **extra) -> dict:
        m = selection.summary(keep, target)
        if scores is not None:
            v = scores.values[np.asarray(target.values, dtype=bool)]
            m.update(score_mean=float(np.mean(v)), score_std=float(np.std(v)),
                     score_q10=float(np.quantile(v, 0.1)), score_q90=float(np.quantile(v, 0.9)))
            self.tracker.histogram("round/score_histogram", v, round)
        m.update(extra)
        self.tracker.log({f"round/{k}": v for k, v in m.items() if isinstance(v, (int, float))}, round=round)
        return m

    # ----------------------------------------------------------------- pipelines
    def run(self) -> dict:
        t0 = time.perf_counter()
        summary = self.run_fixed() if self.cfg.pipeline.name == "fixed" else self.run_self_evolving()
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        summary["run_dir"] = str(self.run_dir)
        summary["truncation"] = self.truncation
        summary["malformed_records_skipped"] = self.n_skipped_records
        if self.acc.is_main_process:
            self._write_report()
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        self.tracker.finish(_flat(summary))
        return summary

    def _write_report(self) -> None:
        """cleaned.parquet (the cleaned dataset with a `labels` column) and report.html (kept/dropped tokens)."""
        from tokenclean.report import write_cleaned, write_html

        def load(rel):
            return self._load_ragged(rel) if Ragged.exists(self.run_dir / rel) else None

        if self.cfg.pipeline.name == "fixed":
            parts = [(self.train, "")]
        else:
            parts = [(self.train.subset(c), f"round_{t}/") for t, c in enumerate(self._chunks())]
        ids, target, keep, scores, attrs = [], [], [], [], {}
        for split, prefix in parts:
            ids.append(split.input_ids)
            target.append(split.target)
            k = load(prefix + "keep")
            keep.append(k if k is not None else split.target)      # round 0 keeps every response token
            s = load(prefix + "scores")
            scores.append(s if s is not None else split.target.like(np.full(len(split.target.values), np.nan,
                                                                            np.float32)))
            for name in ("kn", "ri", "tr"):
                a = load(f"{prefix}xtf/{name}_noise")
                if a is not None:
                    attrs.setdefault(name.upper(), []).append(a)
        cat = Ragged.concat
        write_cleaned(self.run_dir / "cleaned.parquet", cat(ids), cat(keep))
        write_html(self.run_dir / "report.html", self.tokenizer, cat(ids), cat(target), cat(keep), cat(scores),
                   {k: cat(v) for k, v in attrs.items() if len(v) == len(parts)}, title=str(self.run_dir.name))

    def _needs_scores(self) -> bool:
        return self.cfg.selection.method not in ("all", "random")

    def run_fixed(self) -> dict:
        cfg, m = self.cfg, self.manifest
        scored = self._needs_scores()
        name = cfg.scorer.name
        needs_ref, online = scored and scorers.needs_reference(name), scored and scorers.is_online(name)
        # 1. (scoring only) base losses with the untouched base, then the warm-up reference and its losses
        if needs_ref and not m.done("reference"):
            prepared = self._prepare(self._model(self.base_dir), len(self.warmup), "reference")
            eval_base = self._eval(prepared.model, "base")
            if not m.done("base_losses"):
                t = time.perf_counter()
                self._save_ragged(self._losses(prepared.model, self.train, "base losses"), "losses/base")
                m.complete("base_losses", seconds=round(time.perf_counter() - t, 2))
            stats = self._fit(prepared, self.warmup, self.warmup.target, "reference", None)
            t = time.perf_counter()
            self._save_ragged(self._losses(prepared.model, self.train, "reference losses"), "losses/reference")
            score_seconds = time.perf_counter() - t
            ev = self._eval(prepared.model, "reference")
            self._save(prepared.model, self.run_dir / "reference", self.base_dir)
            self._free(prepared)
            m.complete("reference", train_seconds=round(stats["seconds"], 2), steps=stats["steps"],
                       score_seconds=round(score_seconds, 2), final_train_loss=_last(stats),
                       eval_base=eval_base, eval_reference=ev)
        # 2. scores and the keep mask
        if not m.done("select"):
            scores = keep = None
            if scored and name == "influence":
                base, ref = self._load_ragged("losses/base"), self._load_ragged("losses/reference")
                scores = scorers.influence(base, ref)   # l_base - l_ref
                self._save_ragged(scores, "scores")
            elif scored and name == "xtf":   # base-model attributes, union rule: XTF's own keep ratio
                t = time.perf_counter()
                x = cfg.scorer.xtf
                attrs = scorers.xtf(self.acc, self.base_dir, cfg.model, x, self.train.input_ids, self.train.target,
                                    None, self.tokenizer, cfg.training.score_batch_size, self.pad_id, cfg.seed)
                self._save_ragged(attrs.pop("base_losses"), "losses/base")
                for k, v in attrs.items():
                    self._save_ragged(v, f"xtf/{k}")
                keep = attrs["keep"]
                xtf_info = {f"xtf_{r}_noise": int(np.count_nonzero(attrs[f"{r}_noise"].values)) for r in ("kn", "ri",
                                                                                                         "tr")}
            if online:   # chosen per batch while the final stage trains
                m.complete("select", online=True, tokens_target=self.train.n_targets)
            else:
                keep = self._select(scores, self.train.target, cfg.seed) if keep is None else keep
                self._save_ragged(keep, "keep")
                extra = xtf_info if scored and name == "xtf" else {}
                if extra:
                    extra["score_seconds"] = round(time.perf_counter() - t, 2)
                m.complete("select", **self._round_metrics(0, scores, keep, self.train.target, **extra))
        # 3. fine-tune the base on the cleaned labels
        if not m.done("final"):
            keep = self.train.target if online else self._load_ragged("keep")
            prepared = self._prepare(self._model(self.base_dir), len(self.train), "final")
            eval_base = m.get("reference")["eval_base"] if needs_ref else self._eval(prepared.model, "base")
            sel, online_info = None, {}
            if online:
                if name == "self_online" and not m.done("base_losses"):   # the untouched base, before training
                    t = time.perf_counter()
                    self._save_ragged(self._losses(prepared.model, self.train, "base losses"), "losses/base")
                    m.complete("base_losses", seconds=round(time.perf_counter() - t, 2))
                sel = self._online(self._load_ragged("losses/reference" if name == "rho" else "losses/base"),
                                   self.train.target)
            stats = self._fit(prepared, self.train, keep, "final", None, online=sel)
            if sel is not None:
                _, keep, online_info = self._online_done(sel, "")
                online_info.update(selection.summary(keep, self.train.target))
            ev = self._eval(prepared.model, "final")
            self._save(prepared.model, self.run_dir / "final", self.base_dir)
            self._free(prepared)
            m.complete("final", train_seconds=round(stats["seconds"], 2), steps=stats["steps"],
                       final_train_loss=_last(stats), tokens_per_second=round(stats["tokens_per_second"], 1),
                       eval_base=eval_base, eval_final=ev, **online_info)
        fin, sel = m.get("final"), m.get("select")
        if online:   # online: the keep decisions as each token was trained, counted over every trained occurrence
            sel = {"tokens_target": sel["tokens_target"], "tokens_kept": fin["online_kept_total"],
                   "kept_ratio": fin["online_kept_total"] / max(fin["online_tokens_trained"], 1)}
        out = {"pipeline": "fixed", "tokens_scored": self.train.n_targets if scored else 0,
               "tokens_target": sel["tokens_target"], "tokens_kept": sel["tokens_kept"],
               "kept_ratio": sel["kept_ratio"], "eval_loss_before": fin["eval_base"].get("eval_loss"),
               "eval_loss_after": fin["eval_final"].get("eval_loss"), "checkpoint": str(self.run_dir / "final")}
        if needs_ref:
            out["eval_loss_reference"] = m.get("reference")["eval_reference"].get("eval_loss")
        return out

    # ------------------------------------------------------------------ self-evolving
    def _chunks(self) -> list[np.ndarray]:
        """Indices into the training pool of chunks D_0..D_T (seeded shuffle, or contiguous)."""
        p, n = self.cfg.pipeline, len(self.train)
        order = np.random.default_rng(self.cfg.seed).permutation(n) if p.shuffle else np.arange(n)
        if p.chunk_sizes is None:
            sizes = [len(c) for c in np.array_split(np.arange(n), p.chunks)]   # the remainder is spread, not dropped
        else:
            sizes = [int(x * n) if x < 1 else int(x) for x in p.chunk_sizes]
            if sum(sizes) > n:
                raise ValueError(f"pipeline.chunk_sizes={list(p.chunk_sizes)} asks for {sum(sizes)} examples; "
                                 f"the training pool has {n}")
        if min(sizes) < 1:
            raise ValueError(f"pipeline.chunks={p.chunks}: the training pool has only {n} examples")
        bounds = np.cumsum([0] + sizes)
        return [np.sort(order[bounds[i]:bounds[i + 1]]) for i in range(len(sizes))]

    def run_self_evolving(self) -> dict:
        cfg, m, pc = self.cfg, self.manifest, self.cfg.pipeline
        chunk_idx = self._chunks()
        chunks = [self.train.subset(c) for c in chunk_idx]
        T = len(chunks) - 1
        if self.acc.is_main_process:
            atomic_write_text(self.run_dir / "chunks.json", json.dumps([c.tolist() for c in chunk_idx]))
        from tokenclean.train import plan_steps
        round_steps = [len(plan_steps(len(c), cfg.training, 0)) for c in chunks]
        continuous = pc.schedule == "continuous"
        continue_adapter = cfg.model.lora.enabled and pc.lora == "continue"

        for t in range(T + 1):
            stage, rdir = f"round_{t}", self.run_dir / f"round_{t}"
            if m.done(stage):
                continue
            prev = self.run_dir / f"round_{t - 1}" / "model"
            if t == 0:
                lm, start = self._model(self.base_dir), self.base_dir
            elif continue_adapter:
                lm, start = self._model(self.base_dir, adapter=str(prev / "adapter")), self.base_dir
            else:
                lm, start = self._model(str(prev)), str(prev)
            prepared = self._prepare(lm, len(chunks[t]), stage, steps_before=sum(round_steps[:t]) if continuous else 0,
                                     steps_total=sum(round_steps) if continuous else None)
            info, sel = {}, None
            if t == 0:
                # base losses of every later chunk, once, with the untouched base; round 0 keeps every token
                info["eval_base"] = self._eval(prepared.model, "base", round=0)
                if not m.done("base_losses"):
                    tt = time.perf_counter()
                    rest = np.concatenate(chunk_idx[1:])
                    base = self._losses(prepared.model, self.train.subset(rest), "base losses")
                    for k in range(1, T + 1):
                        lo = sum(len(chunks[j]) for j in range(1, k))
                        self._save_ragged(base.select(range(lo, lo + len(chunks[k]))), f"round_{k}/base_losses")
                    m.complete("base_losses", seconds=round(time.perf_counter() - tt, 2))
                keep, scores = chunks[0].target, None
            elif scorers.is_online(cfg.scorer.name) and self._needs_scores():
                # ours: l_base (cached) - l_current, ranked per batch while this round trains: no reference pass
                sel = self._online(self._load_ragged(f"{stage}/base_losses"), chunks[t].target)
                keep, scores = chunks[t].target, None
            else:
                if not m.done(f"{stage}.select"):
                    tt = time.perf_counter()
                    ref = self._losses(prepared.model, chunks[t], f"round {t} reference losses")
                    base = self._load_ragged(f"{stage}/base_losses")
                    scores = scorers.influence(base, ref)       # l(theta_0) - l(theta_t)
                    keep = self._select(scores, chunks[t].target, _stage_seed(cfg.seed, stage))
                    self._save_ragged(ref, f"{stage}/reference_losses")
                    self._save_ragged(scores, f"{stage}/scores")
                    self._save_ragged(keep, f"{stage}/keep")
                    m.complete(f"{stage}.select", score_seconds=round(time.perf_counter() - tt, 2))
                scores, keep = self._load_ragged(f"{stage}/scores"), self._load_ragged(f"{stage}/keep")
            stats = self._fit(prepared, chunks[t], keep, stage, t, online=sel)
            if sel is not None:
                scores, keep, online_info = self._online_done(sel, f"{stage}/")
                info.update(online_info)
            ev = self._eval(prepared.model, stage, round=t)
            self._save(prepared.model, rdir / "model", start)
            self._free(prepared)
            metrics = self._round_metrics(t, scores, keep, chunks[t].target, eval_loss=ev.get("eval_loss"),
                                          eval_ppl=ev.get("eval_ppl"), train_seconds=round(stats["seconds"], 2),
                                          final_train_loss=_last(stats), steps=stats["steps"])
            m.complete(stage, **metrics, **info)

        rounds = [{"round": t, **m.get(f"round_{t}")} for t in range(T + 1)]
        final = self.run_dir / f"round_{T}" / "model"
        if self.acc.is_main_process and not (self.run_dir / "final").exists():
            os.symlink(f"round_{T}/model", self.run_dir / "final")
        self.acc.wait_for_everyone()
        return {"pipeline": "self_evolving", "rounds": [{k: r.get(k) for k in ("round", "tokens_target", "tokens_kept",
                                                                                 "kept_ratio", "eval_loss")}
                                                         for r in rounds],
                "tokens_scored": sum(r["tokens_target"] for r in rounds[1:]),
                "tokens_target": sum(r["tokens_target"] for r in rounds),
                "tokens_kept": sum(r["tokens_kept"] for r in rounds),
                "kept_ratio": sum(r["tokens_kept"] for r in rounds) / max(sum(r["tokens_target"] for r in rounds), 1),
                "eval_loss_before": rounds[0].get("eval_base", {}).get("eval_loss"),
                "eval_loss_after": rounds[-1].get("eval_loss"), "checkpoint": str(final)}


def _stage_seed(seed: int, stage: str) -> int:
    return int(fingerprint(seed, stage)[:8], 16)


def _last(stats) -> float | None:
    return round(stats["train_loss"][-1], 5) if stats["train_loss"] else None


def _run_id(run_dir: Path) -> str:
    return fingerprint(str(run_dir.resolve()), time.time())[:12]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def _yaml(d: dict) -> str:
    import yaml
    return yaml.safe_dump(d, sort_keys=False)
