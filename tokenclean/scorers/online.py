"""Online selection: tokens scored and chosen per training batch from the current model's own losses, while it
trains (Rho-1's excess loss, our online self-evolving score). `OnlineSelector` is the `train.OnlineHook` that
`train.fit` calls each optimiser step. Batch scope (scorer.online_scope):

  step   (default) the tokens of the whole optimiser step (batch_size examples, all micro-batches and ranks) are
         ranked together, so the kept set does not depend on micro_batch_size or the number of processes. When the
         step is one forward on one process, the training forward's own (detached) losses are used: free. Otherwise
         a no-grad pre-pass (eval mode) over the step's micro-batches computes the current losses first (+1 forward
         per step, about a third more compute), ranks are combined with one all-reduce, then the step trains.
         Note: the free path's losses include dropout noise when the model has dropout (LoRA dropout); the
         pre-pass's do not.
  micro  each micro-batch is ranked alone from its training forward's losses: free, but the kept set depends on
         how the step is split. The step's kept count (the loss normaliser) is still exact: for a ratio it is
         known from the token counts before any forward. Not available with selection.method=threshold or soft.

Within the batch, selection.method applies as everywhere: global = top keep_ratio of the batch's tokens (Rho-1's
"rank the tokens in a batch"), sample = top keep_ratio within each example, threshold = score > threshold, soft =
weights (tokenclean/soft_weights.py). Counts and ties follow selection.keep_mask (floor, ties to the earlier
example/position in step order).
"""
from __future__ import annotations

import numpy as np

from tokenclean import selection
from tokenclean.dist import batch_or_placeholder, gather
from tokenclean.losses import collate
from tokenclean.ragged import Ragged
from tokenclean.train import micro_batches

SCORE_RESOLUTION = 2.0 ** -16   # nats (1.5e-5); a power of two, so the rounding itself is exact


def round_to_resolution(scores: np.ndarray) -> np.ndarray:
    """Scores rounded to SCORE_RESOLUTION. The cached and the current losses come from different passes (another
    batch shape, packing or process count) whose float32 rounding differs by ~1e-6 nats. Unrounded, that noise
    decides the ranking wherever the real scores tie: at self_online's first step (current == base exactly, so
    every score is 0 +- 5e-7) a soft rule's scale-free weights were the noise blown up to [0, 1], and they changed
    with the number of processes. Rounded, those scores are exact ties, which the selection rules break by
    position (hard) or weigh alike (soft: 1/2 each)."""
    return np.round(np.asarray(scores, np.float64) / SCORE_RESOLUTION) * SCORE_RESOLUTION


class OnlineSelector:
    """Per-batch token selection during training: implements `train.OnlineHook` (begin_step, then weigh per
    forward).

    score(cached, current) -> scores: the scorer's rule over one cached per-token loss aligned with `target` (e.g.
    the reference's for Rho-1, the base's for self_online; None for a scorer of the current model alone, ProFit)
    and the current model's losses (float64 arrays). rule(scores) -> keep, when given: the scorer's own decision
    (ProFit's p >= tau) instead of selection.method; its count is known once scored, so scope=step. The
    training forward computes losses on every target position (fit is given `target` as its mask); weigh() zeroes
    the dropped ones (or weights them, method=soft). Records, per target token, the score and decision of the last
    time it was trained (`scores`, `keep`) and how much it was kept (`kept_times`, summed over epochs)."""

    def __init__(self, score, cached: Ragged | None, target: Ragged, method: str = "global", keep_ratio: float = 0.6,
                 threshold: float | None = None, scope: str = "step", temperature: float = 0.5, rule=None):
        assert cached is None or cached.same_layout(target)
        assert method in ("global", "sample", "threshold", "soft"), method
        assert scope in ("step", "micro")
        assert rule is None or scope == "step", "a rule of its own counts its tokens only once scored"
        self.score_fn, self.method, self.keep_ratio, self.threshold = score, method, keep_ratio, threshold
        self.scope, self.temperature = scope, temperature
        self.rule = rule           # the scorer's own decision, keep = rule(scores), instead of selection.method
        # a scorer that reads the current model alone (ProFit) caches nothing: its score function gets NaN there
        self.cached = np.full(len(target.values), np.nan, np.float32) if cached is None else \
            np.asarray(cached.values, np.float32)
        self.target = target
        self.is_target = np.asarray(target.values, bool)
        self.n_target = target.row_sums()
        n = len(self.is_target)
        self.scores = np.full(n, np.nan, np.float32)
        soft = method == "soft"
        self.keep = np.zeros(n, np.float32 if soft else bool)
        self.kept_times = np.zeros(n, np.float64 if soft else np.int32)
        self.prepasses = 0
        self.trained = 0           # target-token occurrences trained (over epochs)
        self._events = []          # micro scope, several ranks: (step, positions, scores, keep) to share at the end
        self._step_i = -1
        self._plan = None
        self._world = 1

    # -- scoring and ranking on one batch ------------------------------------------------------------------------
    def _positions(self, idx) -> np.ndarray:
        """Flat positions of the target tokens of examples idx, in the order TokenLoss returns their losses."""
        parts = [self.target.offsets[int(i)] + np.flatnonzero(self.is_target[self.target.offsets[int(i)]:
                                                                             self.target.offsets[int(i) + 1]])
                 for i in idx]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def rank(self, idx, current: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions, scores, keep) for the target tokens of examples idx given their current losses, ranked
        together by selection.method (ties to the earlier example in idx, then the earlier position)."""
        pos = self._positions(idx)
        assert len(pos) == len(current), (len(pos), len(current))
        s = round_to_resolution(self.score_fn(self.cached[pos].astype(np.float64), np.asarray(current, np.float64)))
        if self.rule is not None:
            return pos, s, np.asarray(self.rule(s), bool)
        counts = self.n_target[np.asarray(idx, np.int64)] if len(idx) else np.zeros(0, np.int64)
        offsets = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        batch_target = Ragged(np.ones(len(s), bool), offsets)
        keep = selection.select(batch_target.like(s), batch_target, self.method, self.keep_ratio, self.threshold,
                                self.temperature).values
        return pos, s, keep

    def _record(self, pos, s, keep) -> None:
        self.trained += len(pos)
        self.scores[pos] = s
        self.keep[pos] = keep
        self.kept_times[pos] += keep

    def kept_count(self, idx) -> int:
        """Tokens a ratio rule keeps out of examples idx ranked together (exact, before any forward)."""
        counts = self.n_target[np.asarray(idx, np.int64)]
        if self.method == "global":
            return int(selection.kept_count(counts.sum(), self.keep_ratio))
        return int(selection.kept_count(counts, self.keep_ratio).sum())

    # -- the train.fit hook ---------------------------------------------------------------------------------------
    def begin_step(self, accelerator, model, step, micro: list, n_micro: int, micro_size: int, input_ids: Ragged,
                   pad_id: int):
        """Called before the step's first forward. Returns (mask source for collate, n_kept or None); None means
        the step's only forward will set it (weigh returns it)."""
        self._step_i += 1
        world = self._world = accelerator.num_processes
        if self.scope == "micro":
            all_micro = [m for r in range(world) for m in micro_batches(step, r, world, micro_size, n_micro)]
            self._plan = ("micro", None)
            return self.target, sum(self.kept_count(m) for m in all_micro if len(m))
        if world == 1 and n_micro == 1:        # the step is this one forward: rank its own losses
            self._plan = ("single", np.asarray(step))
            return self.target, None
        keep = self._prepass(accelerator, model, np.asarray(step), micro, input_ids, pad_id)
        self._plan = ("step", None)
        total = sum(float(v.sum(dtype=np.float64)) for v in keep.values())
        return keep, total if self.method == "soft" else int(total)

    def weigh(self, idx, losses, n_kept):
        """Called after each training forward with its per-token losses (all target positions of idx, row-major).
        Returns (losses with dropped tokens zeroed, n_kept)."""
        import torch
        mode, step = self._plan
        if mode == "step" or len(idx) == 0:
            return (losses if len(idx) else losses * 0), n_kept
        current = losses.detach().float().cpu().numpy()
        pos, s, keep = self.rank(idx, current)
        if mode == "single":
            n_kept = float(keep.sum(dtype=np.float64)) if self.method == "soft" else int(keep.sum())
            self._record(pos, s, keep)
        elif self._world > 1:
            self._events.append((self._step_i, pos, s.astype(np.float32), keep))
        else:
            self._record(pos, s, keep)
        w = torch.from_numpy(keep).to(device=losses.device, dtype=losses.dtype)
        return losses * w, n_kept

    def _prepass(self, accelerator, model, step, micro, input_ids, pad_id) -> dict:
        """No-grad current losses of the whole step (eval mode), shared by all ranks; rank them; return the keep
        mask of every example of the step (dict example -> bool row), for collate."""
        import torch

        self.prepasses += 1
        counts = self.n_target[step]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        where = {int(e): k for k, e in enumerate(step)}
        buf = torch.zeros(int(counts.sum()), dtype=torch.float32)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for idx in micro:
                batch = batch_or_placeholder(lambda i: collate(input_ids, self.target, i, packed=True), idx, step[:1])
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.autocast():
                    cur = model(**batch).float().cpu()
                if len(idx) == 0:
                    continue
                k0 = 0
                for i in idx:
                    k, n = where[int(i)], int(self.n_target[int(i)])
                    buf[starts[k]:starts[k] + n] = cur[k0:k0 + n]
                    k0 += n
        model.train(was_training)
        if accelerator.num_processes > 1:      # each rank filled its own examples, zeros elsewhere: a sum is exact
            buf = accelerator.reduce(buf.to(accelerator.device), "sum").cpu()
        pos, s, keep = self.rank(step, buf.numpy())
        self._record(pos, s, keep)
        rows = {}
        for i in step:
            lo, hi = self.target.offsets[int(i)], self.target.offsets[int(i) + 1]
            row = np.zeros(hi - lo, self.keep.dtype)
            sel = pos[(pos >= lo) & (pos < hi)]
            row[sel - lo] = self.keep[sel]
            rows[int(i)] = row
        return rows

    def finish(self, accelerator) -> None:
        """Share the micro-scope decisions of every rank (replayed in step order), so every rank holds them all."""
        if accelerator.num_processes == 1 or self.scope != "micro":
            return
        events = sorted(gather(accelerator, self._events), key=lambda e: e[0])
        for _, pos, s, keep in events:
            self._record(pos, s, keep)
        self._events = []

    # -- resume state (train.save_state) ------------------------------------------------------------------------
    def shared_state(self) -> dict:
        return {"scores": self.scores, "keep": self.keep, "kept_times": self.kept_times, "prepasses": self.prepasses,
                "trained": self.trained, "step_i": self._step_i}

    def rank_state(self) -> dict:
        return {"events": self._events}

    def load_state(self, state: dict) -> None:
        self.scores, self.keep, self.kept_times = state["scores"], state["keep"], state["kept_times"]
        self.prepasses, self.trained, self._step_i = state["prepasses"], state["trained"], state["step_i"]
        self._events = [tuple(e) for e in state["events"]]

    # -- results ----------------------------------------------------------------------------------------------------
    def scores_ragged(self) -> Ragged:
        return self.target.like(self.scores.copy())

    def keep_ragged(self) -> Ragged:
        return self.target.like(self.keep.copy())

    def arrays(self) -> dict:
        """Per-token arrays of the scorer's own to store beside the scores (rel -> Ragged): none here."""
        return {}

    def summary(self) -> dict:
        seen = ~np.isnan(self.scores) & self.is_target
        return {"online_tokens_seen": int(seen.sum()), "online_tokens_trained": int(self.trained),
                "online_kept_total": self.kept_times.sum().item(), "online_prepasses": self.prepasses}
