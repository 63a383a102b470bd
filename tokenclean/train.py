"""Masked or weighted SFT on accelerate (single device, DDP, DeepSpeed ZeRO-2/3): only kept response tokens carry
loss, each with its weight (1 for a keep mask; in [0, 1] for soft weights).

The batching is ours, not a DataLoader's, so that the update does not depend on how it is split:
an optimiser step takes `batch_size` examples (a seeded shuffle per epoch); rank r takes every world-th of them and
cuts its share into micro-batches; every rank runs the same number of micro-batches (a rank short of examples runs
an empty one, whose loss is a connected zero). Each micro-batch's loss is its summed token losses divided by the
number of kept tokens in the WHOLE step (all micro-batches, all ranks; for soft weights: the weighted sum over the
sum of the step's weights), then scaled back for the averaging that DDP/DeepSpeed and accumulation do. So micro 8 x
accumulation 1 on one process, 2 x 4, or 2 ranks x 4 all give the same gradient: the mean over the step's kept
tokens.

Resuming and stopping. With `Checkpoints`, fit saves the stage's resumable state every `every` steps: the trainable
weights (LoRA adapters only), the optimiser and schedule, every random stream, the online selector's decisions and
the step index. A rerun of the stage loads the newest and continues with the same plan of steps, so it ends with the
weights an uninterrupted run ends with (bitwise on one process). SIGTERM or SIGINT during training stop every rank
at the next step boundary (the ranks agree through the all-reduce each step does anyway), save the state and exit
with PREEMPTED_EXIT.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from tokenclean.config import TrainingConfig, UserError
from tokenclean.dist import batch_or_placeholder
from tokenclean.io import fsync_tree
from tokenclean.losses import TokenLoss, collate
from tokenclean.ragged import Ragged
from tokenclean.state_files import load_tree, save_tree

log = logging.getLogger(__name__)


def plan_steps(n_examples: int, cfg: TrainingConfig, seed: int) -> list[np.ndarray]:
    """The examples of every optimiser step, in order: a seeded permutation per epoch, cut into batch_size pieces."""
    steps = []
    for epoch in range(cfg.epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n_examples)
        steps += [order[i:i + cfg.batch_size] for i in range(0, n_examples, cfg.batch_size)]
    return steps[: cfg.max_steps] if cfg.max_steps else steps


def micro_batches(step: np.ndarray, rank: int, world: int, micro: int, n_micro: int) -> list[np.ndarray]:
    """This rank's share of a step, as exactly n_micro micro-batches (trailing ones may be empty)."""
    share = step[rank::world]
    parts = [share[i:i + micro] for i in range(0, len(share), micro)]
    return parts + [share[:0]] * (n_micro - len(parts))


def make_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    # torch's AdamW, not DeepSpeed's: those JIT-compile for a minute on a new machine and gain nothing here
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


class OnlineHook(Protocol):
    """Chooses a step's tokens while it trains (tokenclean/scorers/online.py). `fit` then trains on every response
    token of the step's examples (its `keep` argument is the response mask) and lets the hook decide."""

    def begin_step(self, accelerator, model, step: np.ndarray, micro: list, n_micro: int, micro_size: int,
                   input_ids: Ragged, pad_id: int) -> tuple[object, float | None]:
        """Before the step's first forward: (the mask or weights to collate with, the step's loss normaliser, or
        None when the step's only forward decides it in `weigh`)."""

    def weigh(self, idx: np.ndarray, losses: torch.Tensor, n_kept: float | None) -> tuple[torch.Tensor, float]:
        """After each training forward (losses of every position of `idx` that the mask selected, row-major): the
        losses to train on (dropped ones zeroed, or weighted) and the step's normaliser."""

    def finish(self, accelerator) -> None:
        """After the last step: share what every rank decided."""

    # Optional: forward_inputs(accelerator, idx, batch) -> dict of extra keyword arguments for the training forward
    # of examples idx (EKSFT: reference=, a reference model's logits on the batch). The forward then returns
    # (losses, terms: dict of per-position tensors with gradients) and weigh is called as weigh(idx, losses,
    # n_kept, terms): it returns the one tensor whose sum over the step, divided by the step's normaliser, is the
    # step's loss (regularisers beyond the weighted cross-entropy fold into it with their own per-step counts).

    def shared_state(self) -> dict:
        """What a resume state keeps of the decisions so far (the same on every rank)."""

    def rank_state(self) -> dict:
        """What a resume state keeps of this rank's own, not yet shared, decisions."""

    def load_state(self, state: dict) -> None:
        """Continue from shared_state() | rank_state() as saved."""


def normaliser(n_kept) -> float:
    """The step's kept tokens (or weight sum); 1 when nothing is kept, so an all-masked step trains on nothing."""
    return n_kept if n_kept > 0 else 1


@dataclass
class Prepared:
    """A model and optimiser prepared by accelerate for one training stage, with the plan of its steps."""
    model: torch.nn.Module          # the TokenLoss wrapper, as DDP / DeepSpeed engine / plain module
    optimizer: torch.optim.Optimizer
    scheduler: object
    steps: list
    n_micro: int
    is_deepspeed: bool


def warmup_steps(cfg: TrainingConfig, total: int) -> int:
    """LR warm-up steps of a stage of `total` optimiser steps (training.warmup_rounding). At 8-15 steps per stage the
    two counts differ by the one step that ceil spends at LR 0."""
    exact = cfg.warmup_ratio * total
    return math.ceil(exact) if cfg.warmup_rounding == "ceil" else int(exact)


def prepare(accelerator, lm: torch.nn.Module, n_examples: int, cfg: TrainingConfig, seed: int,
            steps_before: int = 0, steps_total: int | None = None) -> Prepared:
    """Wrap `lm` for training. steps_before/steps_total place this stage inside a longer learning-rate schedule
    (self-evolving rounds sharing one schedule); by default the schedule spans this stage alone."""
    world = accelerator.num_processes
    n_micro = math.ceil(math.ceil(cfg.batch_size / world) / cfg.micro_batch_size)
    steps = plan_steps(n_examples, cfg, seed)
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if is_deepspeed:
        # accelerate fills these from a DataLoader, and we have none; clipping is DeepSpeed's job under DeepSpeed
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
        ds["gradient_accumulation_steps"] = n_micro
        ds["train_batch_size"] = cfg.micro_batch_size * n_micro * world
        ds["gradient_clipping"] = cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0
        if ds.get("zero_optimization", {}).get("stage") == 3:  # else ZeRO-3 saves empty weight files
            ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        accelerator.state.deepspeed_plugin.gradient_accumulation_steps = n_micro

    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(lm, "enable_input_require_grads"):
            lm.enable_input_require_grads()
    model = TokenLoss(lm, cfg.loss_chunk_size, cfg.loss_kernel)
    optimizer = make_optimizer(model, cfg)
    total = steps_total or len(steps)
    scheduler = get_scheduler("constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule, optimizer,
                              num_warmup_steps=warmup_steps(cfg, total), num_training_steps=total)
    for _ in range(steps_before):
        scheduler.step()
    model, optimizer = accelerator.prepare(model, optimizer)
    return Prepared(model, optimizer, scheduler, steps, n_micro, is_deepspeed)


# -- resumable state -------------------------------------------------------------------------------------------------
PREEMPTED_EXIT = 75   # EX_TEMPFAIL (sysexits.h): stopped on request with the state saved; rerun the same command


class Preempted(SystemExit):
    """Raised on every rank once SIGTERM/SIGINT stopped training and its state is saved. A SystemExit, so that
    nothing on the way up takes it for a failure (no stage is recorded, no traceback) and the process exits with
    PREEMPTED_EXIT."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT)
        self.message = message


@dataclass
class Checkpoints:
    """Where fit keeps a stage's resumable state: <dir>/step_000040/ every `every` steps (0: only when stopped by a
    signal), the newest `keep` of them. extra(): the caller's own counters, saved with each state for the record."""
    dir: Path
    every: int = 0
    keep: int = 2
    extra: Callable[[], dict] = dict


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _trainable(accelerator, p: Prepared) -> dict:
    return {n: t for n, t in accelerator.unwrap_model(p.model).named_parameters() if t.requires_grad}


def save_state(accelerator, p: Prepared, ck: Checkpoints, step: int, stats: dict, online=None) -> Path:
    """Save the state after `step` steps as <dir>/step_<step>/: written under a temporary name by every rank, each
    rank's files fsynced, then published by one rename (a reader sees a whole state or none) and the oldest
    pruned. Leaves the random streams as they were, so saving never changes what training does next."""
    rank, main = accelerator.process_index, accelerator.is_main_process
    final = ck.dir / f"step_{step:06d}"
    tmp = ck.dir / f".{final.name}.tmp"
    rng = rng_state()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)   # left by a process killed while saving
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if p.is_deepspeed:   # collective: every rank writes its shards of the weights and optimiser (DeepSpeed's own
        # format, torch.save files that DeepSpeed itself loads back; everything else here is JSON + safetensors)
        p.model.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False, exclude_frozen_parameters=True)
    elif main:           # every rank holds the same weights and optimiser state
        save_file({n: t.detach().cpu().contiguous() for n, t in _trainable(accelerator, p).items()},
                  str(tmp / "model.safetensors"))
        save_tree(p.optimizer.state_dict(), tmp / "optimizer")
    if main:
        save_tree({"step": step, "n_steps": len(p.steps), "world": accelerator.num_processes, "stats": stats,
                   "scheduler": p.scheduler.state_dict(), "extra": ck.extra(),
                   "online": online.shared_state() if online is not None else None}, tmp / "trainer")
    save_tree({"rng": rng, "online": online.rank_state() if online is not None else None}, tmp / f"rank_{rank}")
    fsync_tree(tmp)
    accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fd = os.open(ck.dir, os.O_RDONLY)   # the rename itself must survive a crash
        os.fsync(fd)
        os.close(fd)
        for old in sorted(ck.dir.glob("step_*"))[:-ck.keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    set_rng_state(rng)
    return final


def load_state(accelerator, p: Prepared, ck: Checkpoints, online=None) -> tuple[int, dict | None]:
    """Load the newest saved state into p (and the online selector): (steps done, the stats so far), or (0, None)
    when there is none."""
    from accelerate.utils import broadcast_object_list
    saved = sorted(ck.dir.glob("step_*")) if accelerator.is_main_process else None
    saved = broadcast_object_list([saved])[0] if accelerator.num_processes > 1 else saved   # one choice for all
    if not saved:
        return 0, None
    path = saved[-1]
    trainer = load_tree(path / "trainer")
    if trainer["world"] != accelerator.num_processes or trainer["n_steps"] != len(p.steps):
        if accelerator.is_main_process:
            log.warning("%s was saved by %d processes (plan of %d steps); this run has %d (%d steps): starting the "
                        "stage over", path, trainer["world"], trainer["n_steps"], accelerator.num_processes,
                        len(p.steps))
        return 0, None
    if p.is_deepspeed:
        p.model.load_checkpoint(str(path), tag="deepspeed", load_lr_scheduler_states=False,
                                load_module_strict=not any(not t.requires_grad for t in p.model.parameters()))
    else:
        weights = load_file(str(path / "model.safetensors"))
        params = _trainable(accelerator, p)
        assert weights.keys() == params.keys(), f"{path}: other trainable parameters than this model's"
        with torch.no_grad():
            for n, t in params.items():
                t.copy_(weights[n])
        p.optimizer.load_state_dict(load_tree(path / "optimizer"))
    p.scheduler.load_state_dict(trainer["scheduler"])
    for group, lr in zip(p.scheduler.optimizer.param_groups, p.scheduler.get_last_lr()):
        group["lr"] = lr
    mine = load_tree(path / f"rank_{accelerator.process_index}")
    if online is not None:
        online.load_state({**trainer["online"], **mine["online"]})
    set_rng_state(mine["rng"])   # last: nothing above may draw from the restored streams
    if accelerator.is_main_process:
        log.info("resuming %s after step %d of %d (%s)", ck.dir.name.removesuffix(".state"), trainer["step"],
                 len(p.steps), path)
    return trainer["step"], trainer["stats"]


def remove_states(accelerator, ck: Checkpoints) -> None:
    """Drop a stage's saved states once nothing needs to resume it."""
    if accelerator.is_main_process:
        shutil.rmtree(ck.dir, ignore_errors=True)
    accelerator.wait_for_everyone()


class StopSignals:
    """While training, SIGTERM and SIGINT ask for a stop at the next step boundary instead of killing the process.
    A second SIGINT interrupts at once (Ctrl-C twice); a repeated SIGTERM is ignored: under accelerate launch,
    torchrun passes SLURM's SIGTERM on to a worker that got it already. A signal that arrives after the last
    boundary is delivered again on exit, as if we had never caught it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, verbose: bool = True):
        self.received, self.previous, self.verbose = None, {}, verbose

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # Python allows handlers there only
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, sig, frame) -> None:
        if sig == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(sig)
            if self.verbose:
                print(f"tokenclean: {self.received.name} received: stopping at the end of this training step",
                      file=sys.stderr, flush=True)

    def __exit__(self, exc_type, *_):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.received is not None and exc_type is None:
            signal.raise_signal(self.received)


def fit(accelerator, p: Prepared, input_ids: Ragged, keep: Ragged, cfg: TrainingConfig, pad_id: int,
        on_step=None, desc: str = "train", online: OnlineHook | None = None,
        checkpoints: Checkpoints | None = None) -> dict:
    """Run every planned step on the kept tokens (`keep`: a bool mask, or float weights). on_step(step, metrics)
    is called on every rank after each step.

    online (`keep` is then the response mask of the candidates): each step's kept tokens are chosen from the
    current model while training (Rho-1, online self-evolving); the loss is still normalised exactly.

    checkpoints: resume from the newest state saved there, save one every `every` steps, and stop (saved) on
    SIGTERM/SIGINT by raising Preempted (see the module's docstring)."""
    with StopSignals(accelerator.is_main_process) if checkpoints else contextlib.nullcontext() as stop:
        return _fit(accelerator, p, input_ids, keep, cfg, pad_id, on_step, desc, online, checkpoints, stop)


def _fit(accelerator, p, input_ids, keep, cfg, pad_id, on_step, desc, online, checkpoints, stop) -> dict:
    world, rank = accelerator.num_processes, accelerator.process_index
    model, optimizer, scheduler = p.model, p.optimizer, p.scheduler
    model.train()
    # the averaging over ranks (DDP, DeepSpeed) and DeepSpeed's 1/accumulation are undone here
    scale = world * (p.n_micro if p.is_deepspeed else 1)
    kept_per_example = keep.row_sums()

    stats = {"steps": len(p.steps), "train_loss": [], "tokens": 0, "seconds": 0.0}
    start, saved = load_state(accelerator, p, checkpoints, online) if checkpoints else (0, None)
    stats.update(saved or {})
    t0 = time.perf_counter() - stats["seconds"]
    bar = tqdm(p.steps[start:], desc=desc, disable=not accelerator.is_local_main_process, unit="step",
               initial=start, total=len(p.steps))
    for step_i, step in enumerate(bar, start):
        n_kept = kept_per_example[step].sum().item()
        loss_sum = torch.zeros((), device=accelerator.device)
        micro, mask_src = micro_batches(step, rank, world, cfg.micro_batch_size, p.n_micro), keep
        if online is not None:   # n_kept None: the step's only forward decides it (online.weigh)
            mask_src, n_kept = online.begin_step(accelerator, model, step, micro, p.n_micro, cfg.micro_batch_size,
                                                 input_ids, pad_id)
        for m_i, idx in enumerate(micro):
            batch = batch_or_placeholder(lambda i, m=mask_src: collate(input_ids, m, i, packed=True), idx, step[:1])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            weights = batch.pop("weights", None)
            sync = m_i == p.n_micro - 1
            if p.is_deepspeed:
                # accelerate's backward marks an accumulation boundary and steps the DeepSpeed engine whenever
                # sync_gradients is set, which it is unless told otherwise: only the step's last micro-batch may
                accelerator.gradient_state._set_sync_gradients(sync)
            ctx = accelerator.no_sync(model) if not sync and not p.is_deepspeed else contextlib.nullcontext()
            extra = online.forward_inputs(accelerator, idx, batch) if hasattr(online, "forward_inputs") else {}
            with ctx:
                with accelerator.autocast():
                    losses = model(**batch, **extra)
                terms = None
                if extra:
                    losses, terms = losses
                if weights is not None:
                    losses = losses * weights
                if terms is not None:
                    losses, n_kept = online.weigh(idx, losses, n_kept, terms)
                elif online is not None:
                    losses, n_kept = online.weigh(idx, losses, n_kept)
                loss = losses.sum() * (scale / normaliser(n_kept))
                accelerator.backward(loss)
            loss_sum += losses.detach().sum()
        grad_norm = None
        if cfg.max_grad_norm > 0 and not p.is_deepspeed:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # the step's loss and whether any rank was asked to stop, in the one all-reduce a step does
        asked = float(stop is not None and stop.received is not None)
        loss_sum, asked = accelerator.reduce(torch.stack([loss_sum, loss_sum.new_tensor(asked)]), "sum").tolist()
        step_loss = loss_sum / normaliser(n_kept)
        if not math.isfinite(step_loss):   # every rank sees the same reduced loss, so every rank stops here
            raise Diverged(f"training diverged: the loss is {step_loss} at step {step_i + 1} of {len(p.steps)} of "
                           f"{desc} (training.lr={cfg.lr}, training.max_grad_norm={cfg.max_grad_norm}). Lower "
                           "training.lr, keep clipping on (training.max_grad_norm=1.0), or train in float32 "
                           "(training.mixed_precision=no); then rerun with resume=false")
        stats["train_loss"].append(step_loss)
        stats["tokens"] += n_kept
        if accelerator.is_local_main_process:
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if on_step is not None:
            metrics = {"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0], "train/kept_tokens": n_kept}
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            on_step(step_i, metrics)
        if checkpoints and (asked or (checkpoints.every and (step_i + 1) % checkpoints.every == 0)):
            stats["seconds"] = time.perf_counter() - t0
            path = save_state(accelerator, p, checkpoints, step_i + 1, stats, online)
            if asked:
                where = f"step {step_i + 1} of {len(p.steps)} of {desc}"
                if accelerator.is_main_process:
                    by = stop.received.name if stop.received else "a signal to another rank"
                    print(f"tokenclean: stopped by {by} after {where}; its state is saved in {path}. Run the same "
                          f"command again to resume (exit code {PREEMPTED_EXIT}).", file=sys.stderr, flush=True)
                raise Preempted(f"stopped after {where}")
    stats["seconds"] = time.perf_counter() - t0
    stats["tokens_per_second"] = stats["tokens"] / max(stats["seconds"], 1e-9)
    return stats


class Diverged(UserError):
    """The training loss became nan or infinite: the weights are no longer worth saving."""


def train(accelerator, lm, input_ids: Ragged, keep: Ragged, cfg: TrainingConfig, seed: int, pad_id: int,
          on_step=None, desc: str = "train"):
    """prepare + fit in one call. Returns (Prepared, stats)."""
    p = prepare(accelerator, lm, len(input_ids), cfg, seed)
    return p, fit(accelerator, p, input_ids, keep, cfg, pad_id, on_step, desc)
