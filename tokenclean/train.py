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
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from accelerate.utils import DistributedType
from tqdm.auto import tqdm
from transformers import get_scheduler

from tokenclean.config import TrainingConfig
from tokenclean.dist import batch_or_placeholder
from tokenclean.losses import TokenLoss, collate
from tokenclean.ragged import Ragged

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
    model = TokenLoss(lm, cfg.loss_chunk_size)
    optimizer = make_optimizer(model, cfg)
    total = steps_total or len(steps)
    scheduler = get_scheduler("constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule, optimizer,
                              num_warmup_steps=math.ceil(cfg.warmup_ratio * total), num_training_steps=total)
    for _ in range(steps_before):
        scheduler.step()
    model, optimizer = accelerator.prepare(model, optimizer)
    return Prepared(model, optimizer, scheduler, steps, n_micro, is_deepspeed)


def fit(accelerator, p: Prepared, input_ids: Ragged, keep: Ragged, cfg: TrainingConfig, pad_id: int,
        on_step=None, desc: str = "train", online: OnlineHook | None = None) -> dict:
    """Run every planned step on the kept tokens (`keep`: a bool mask, or float weights). on_step(step, metrics)
    is called on every rank after each step.

    online (`keep` is then the response mask of the candidates): each step's kept tokens are chosen from the
    current model while training (Rho-1, online self-evolving); the loss is still normalised exactly."""
    world, rank = accelerator.num_processes, accelerator.process_index
    model, optimizer, scheduler = p.model, p.optimizer, p.scheduler
    model.train()
    # the averaging over ranks (DDP, DeepSpeed) and DeepSpeed's 1/accumulation are undone here
    scale = world * (p.n_micro if p.is_deepspeed else 1)
    kept_per_example = keep.row_sums()

    stats = {"steps": len(p.steps), "train_loss": [], "tokens": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    bar = tqdm(p.steps, desc=desc, disable=not accelerator.is_local_main_process, unit="step")
    for step_i, step in enumerate(bar):
        n_kept = kept_per_example[step].sum().item()
        loss_sum = torch.zeros((), device=accelerator.device)
        micro, mask_src = micro_batches(step, rank, world, cfg.micro_batch_size, p.n_micro), keep
        if online is not None:   # n_kept None: the step's only forward decides it (online.weigh)
            mask_src, n_kept = online.begin_step(accelerator, model, step, micro, p.n_micro, cfg.micro_batch_size,
                                                 input_ids, pad_id)
        for m_i, idx in enumerate(micro):
            batch = batch_or_placeholder(lambda i, m=mask_src: collate(input_ids, m, i, pad_id), idx, step[:1])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            weights = batch.pop("weights", None)
            sync = m_i == p.n_micro - 1
            if p.is_deepspeed:
                # accelerate's backward marks an accumulation boundary and steps the DeepSpeed engine whenever
                # sync_gradients is set, which it is unless told otherwise: only the step's last micro-batch may
                accelerator.gradient_state._set_sync_gradients(sync)
            ctx = accelerator.no_sync(model) if not sync and not p.is_deepspeed else contextlib.nullcontext()
            with ctx:
                with accelerator.autocast():
                    losses = model(**batch)
                if weights is not None:
                    losses = losses * weights
                if online is not None:
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
        step_loss = accelerator.reduce(loss_sum, "sum").item() / normaliser(n_kept)
        stats["train_loss"].append(step_loss)
        stats["tokens"] += n_kept
        if accelerator.is_local_main_process:
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if on_step is not None:
            metrics = {"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0], "train/kept_tokens": n_kept}
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            on_step(step_i, metrics)
    stats["seconds"] = time.perf_counter() - t0
    stats["tokens_per_second"] = stats["tokens"] / max(stats["seconds"], 1e-9)
    return stats


def train(accelerator, lm, input_ids: Ragged, keep: Ragged, cfg: TrainingConfig, seed: int, pad_id: int,
          on_step=None, desc: str = "train"):
    """prepare + fit in one call. Returns (Prepared, stats)."""
    p = prepare(accelerator, lm, len(input_ids), cfg, seed)
    return p, fit(accelerator, p, input_ids, keep, cfg, pad_id, on_step, desc)
