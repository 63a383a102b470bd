"""EKSFT, Entropy-KL selective fine-tuning (MINE-USTC/EKSFT, a LLaMA-Factory fork: src/llamafactory/train/eksft/
trainer.py): online, per optimiser step. Each response token j has, from the current model's prediction p_j and the
reference's q_j,

  KL_j = KL(p_j || q_j) = sum_v p_v (log p_v - log q_v)          H_j = -sum_v p_v log p_v

Each criterion flags the top floor(n x top_k_ratio) of the n response tokens ranked together (scorer.eksft.
top_k_ratio, 0.2; largest_kl / largest_entropy: the largest, or the smallest): the step's tokens (selection=
global, the house's default) or each example's (selection=sample: what the reference script does, one example per
device and micro-batch). The tokens of `criterion` (kl | entropy | union, the reference script's | intersection)
are removed from the cross-entropy, and the step's loss is

  mean_kept(CE) - lambda_H' mean_{H-flagged}(H_j / log V) + lambda_KL' mean_{KL-flagged}(R_j)

  R_j = sum_v p_v (p_v - log q_v)   kl_form=reference_code (default: the reference code computes its KL
                                     regulariser with the probabilities where the log-probabilities belong; it
                                     equals sum_v p_v^2 + KL_j + H_j)
  R_j = KL_j                         kl_form=kl
  lambda_H' = lambda_H (1 + adapt) if that entropy mean < target_entropy, else lambda_H (1 - adapt); lambda_KL' =
  lambda_KL (1 + adapt) if that KL mean > target_kl, else (1 - adapt). As in the reference code, each step starts
  from the configured lambdas again (its adjustment re-reads them: it never accumulates). adapt=0: the lambdas as
  given. The regularisers act on the flagged tokens of their own criterion whatever `criterion` removes (as the
  reference code: the entropy one on the entropy-flagged, the KL one on the KL-flagged); lambda 0 switches one off.
  Defaults: the reference script's (0.2, union, lambdas 0.05), the reference code's targets (0.5, 2.0).

As house weights: a kept token's CE weighs 1, an H-flagged token's H_j weighs -lambda_H' c / (n_H log V), a KL-
flagged token's R_j weighs lambda_KL' c / n_KL, c = n_kept (1 if none), and train.fit divides the step's sum by
n_kept: each mean is over the whole step (all micro-batches and ranks), exact under accumulation and across
processes. Ties go to the earlier example and position (selection's rule); KL and H are rounded to 2^-16 before
ranking (online.SCORE_RESOLUTION), so a 2-process run ranks as one process does.

Memory: TokenLoss(reference=...) computes the terms chunk by chunk (training.loss_chunk_size positions): the
reference's decoder runs once per micro-batch without gradient and only its last hidden states at the response
positions are kept; both models' logits exist for one chunk at a time, and the current one's are recomputed in
backward (checkpointed). The reference code materialises both models' full [batch, length, V] logits three times
(two no-grad forwards, then the training one). Measured by `python -m benchmarks.eksft_cost` (results/performance.md, at
5f11493; one forward and backward, 2 x 256 tokens, 308 response positions, hidden size 32): the peak memory added is
0.53x the full logits' at a 49k and at a 262k vocabulary when one chunk holds every response position (409 vs 774
MB, 2147 vs 4088 MB: response positions only), 0.27x and 0.12x with 64-position chunks (212 MB, 477 MB). Per
optimiser step on the tiny model it costs 1.5x plain SFT when the step is one forward and 2.0x with a pre-pass
(the reference's forward on every micro-batch, the current model's no-grad pass on top).
The fused LM-head kernel is not used on this path (it returns losses only). The reference is a whole copy on every
rank (not sharded under ZeRO-3).

Where it deviates from the reference code, on purpose:
- The reference code scores the logits at position t, i.e. the prediction of token t+1, and removes token t
  (labels at t, unshifted, against logits that the loss shifts): the flagged distribution and the removed token
  are one position apart. Here each response token is scored by the distribution that predicts it, and that token
  leaves the CE and carries the regularisers.
- It takes each mean per micro-batch and per GPU (and k per micro-batch); here per optimiser step (or per example
  with selection=sample). Its no-grad scoring forward runs in training mode; here the pre-pass (when the step
  spans several forwards) runs in eval mode, and a step that is one forward ranks that forward's own values.
- Its normalised entropy uses log(p + 1e-12); here log_softmax (the difference is below 1e-11 per token).

Reference model: the fixed pipeline's warm-up model (needs_reference), whole in memory while the final model
trains; in self-evolving round t >= 1 the round's reference theta_t, i.e. the model the round starts from (round 0
trains every token). The reference code's reference is a frozen copy of the model being trained (its starting
weights), so the self-evolving rounds match it per round (KL is 0 at a round's first step and grows), while the
fixed pipeline measures the distance to the warm-up model instead (the base itself as reference is not offered:
needs_reference is static and would still train the warm-up model). The fixed pipeline's reference stage also
computes the base's and the reference's losses on the pool, which EKSFT does not read (one forward over the pool
each; shared with every other arm through the score cache).

Stored: `scores` (-KL, or +KL with largest_kl=false; -H for criterion=entropy), `keep` (kept in the CE when last
trained), and eksft/kl, eksft/entropy, eksft/flag_kl, eksft/flag_entropy beside them.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from tokenclean import selection
from tokenclean.config import EKSFTCriterion, EKSFTKLForm, Method, check
from tokenclean.dist import batch_or_placeholder
from tokenclean.losses import collate
from tokenclean.ragged import Ragged
from tokenclean.scorers import Scorer
from tokenclean.scorers.online import round_to_resolution
from tokenclean.train import normaliser


class Decision:
    """One ranking group's decision (positions in order) and the weights of its three terms."""

    def __init__(self, pos, kl, entropy, flag_kl, flag_entropy, keep, w_ce, w_h, w_k, lambdas):
        self.pos, self.kl, self.entropy = pos, kl, entropy
        self.flag_kl, self.flag_entropy, self.keep = flag_kl, flag_entropy, keep
        self.w_ce, self.w_h, self.w_k, self.lambdas = w_ce, w_h, w_k, lambdas
        self.n_kept = int(keep.sum())


def decide(kl, entropy, collision, counts, cfg, method: str, vocab: int) -> Decision:
    """The decision over tokens given in example order (counts per example) from their KL_j, H_j and sum_v p_v^2
    (float64 arrays): the flags, the kept tokens and each token's weight on its CE, H_j and R_j (module docstring)."""
    e = cfg.scorer.eksft
    kl, entropy = round_to_resolution(kl), round_to_resolution(entropy)
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    group = Ragged(np.ones(len(kl), bool), offsets)
    by = "sample" if method == "sample" else "global"

    def top(score, largest):
        return selection.select(group.like(score if largest else -score), group, by, e.top_k_ratio).values

    flag_kl, flag_h = top(kl, e.largest_kl), top(entropy, e.largest_entropy)
    removed = {"kl": flag_kl, "entropy": flag_h, "union": flag_kl | flag_h,
               "intersection": flag_kl & flag_h}[str(e.criterion)]
    keep = ~removed
    log_v = math.log(vocab)
    r = np.asarray(collision, np.float64) + kl + entropy if e.kl_form == EKSFTKLForm.reference_code else kl
    mean_h = float((entropy[flag_h] / log_v).mean()) if flag_h.any() else 0.0
    mean_k = float(r[flag_kl].mean()) if flag_kl.any() else 0.0
    lam_h = e.lambda_entropy * (1 + e.adapt if mean_h < e.target_entropy else 1 - e.adapt)
    lam_k = e.lambda_kl * (1 + e.adapt if mean_k > e.target_kl else 1 - e.adapt)
    c = normaliser(int(keep.sum()))
    w_h = np.where(flag_h, -lam_h * c / (max(int(flag_h.sum()), 1) * log_v), 0.0)
    w_k = np.where(flag_kl, lam_k * c / max(int(flag_kl.sum()), 1), 0.0)
    return Decision(None, kl, entropy, flag_kl, flag_h, keep, keep.astype(np.float64), w_h, w_k,
                    (lam_h, lam_k, mean_h, mean_k))


class EKSFTHook:
    """The train.OnlineHook of one EKSFT stage: ranks each step's tokens by KL to `reference` (a TokenLoss, eval,
    no gradient) and by entropy, and weighs the cross-entropy and the two regularisers (module docstring)."""

    def __init__(self, cfg, target: Ragged, reference):
        self.cfg, self.target, self.reference = cfg, target, reference
        self.method = str(cfg.selection.method)
        self.vocab = int(reference.causal_lm().get_output_embeddings().weight.shape[0])
        self.is_target = np.asarray(target.values, bool)
        self.n_target = target.row_sums()
        n = len(self.is_target)
        self.kl, self.entropy = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
        self.keep, self.flag_kl, self.flag_entropy = (np.zeros(n, bool) for _ in range(3))
        self.kept_times = np.zeros(n, np.int32)
        self.trained, self.prepasses, self._step_i = 0, 0, -1
        self.lambdas = []           # (lambda_H', lambda_KL', mean normalised H, mean R) of every step trained
        self._plan, self._rows, self._refs = None, {}, {}

    def _positions(self, idx) -> np.ndarray:
        parts = [self.target.offsets[int(i)] + np.flatnonzero(self.is_target[self.target.offsets[int(i)]:
                                                                             self.target.offsets[int(i) + 1]])
                 for i in idx]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def rank(self, idx, kl, entropy, collision) -> Decision:
        """The decision over the target tokens of examples idx ranked together, recorded."""
        d = decide(np.asarray(kl, np.float64), np.asarray(entropy, np.float64), collision,
                   self.n_target[np.asarray(idx, np.int64)], self.cfg, self.method, self.vocab)
        d.pos = self._positions(idx)
        assert len(d.pos) == len(d.kl)
        self.trained += len(d.pos)
        self.kl[d.pos], self.entropy[d.pos] = d.kl, d.entropy
        self.keep[d.pos], self.flag_kl[d.pos], self.flag_entropy[d.pos] = d.keep, d.flag_kl, d.flag_entropy
        self.kept_times[d.pos] += d.keep
        self.lambdas.append(d.lambdas)
        return d

    # -- the train.fit hook ---------------------------------------------------------------------------------------
    def begin_step(self, accelerator, model, step, micro, n_micro, micro_size, input_ids, pad_id):
        self._step_i += 1
        self._refs, self._rows = {}, {}
        if accelerator.num_processes == 1 and n_micro == 1:   # the step is one forward: rank its own values
            self._plan = "single"
            return self.target, None
        self._plan = "step"
        self.prepasses += 1
        step = np.asarray(step)
        counts = self.n_target[step]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        where = {int(e): k for k, e in enumerate(step)}
        buf = torch.zeros(3, int(counts.sum()), dtype=torch.float64)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for idx in micro:
                batch = batch_or_placeholder(lambda i: collate(input_ids, self.target, i, packed=True), idx, step[:1])
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                ref = self.reference.reference_logits(**batch)
                with accelerator.autocast():
                    _, terms = model(**batch, reference=ref)
                if len(idx) == 0:
                    continue
                self._refs[tuple(int(i) for i in idx)] = ref    # the training forward reuses the reference's pass
                vals = torch.stack([terms["kl"], terms["entropy"], terms["collision"]]).double().cpu()
                k0 = 0
                for i in idx:
                    k, n = where[int(i)], int(self.n_target[int(i)])
                    buf[:, starts[k]:starts[k] + n] = vals[:, k0:k0 + n]
                    k0 += n
        model.train(was_training)
        if accelerator.num_processes > 1:      # each rank filled its own examples, zeros elsewhere: a sum is exact
            buf = accelerator.reduce(buf.to(accelerator.device), "sum").cpu()
        d = self.rank(step, *buf.numpy())
        for k, e in enumerate(step):
            sl = slice(starts[k], starts[k] + counts[k])
            self._rows[int(e)] = (d.w_ce[sl], d.w_h[sl], d.w_k[sl])
        return self.target, d.n_kept

    def forward_inputs(self, accelerator, idx, batch) -> dict:
        ref = self._refs.pop(tuple(int(i) for i in idx), None) if len(idx) else None
        return {"reference": ref if ref is not None else self.reference.reference_logits(**batch)}

    def weigh(self, idx, losses, n_kept, terms):
        h, kl, collision = terms["entropy"], terms["kl"], terms["collision"]
        r = collision + kl + h if self.cfg.scorer.eksft.kl_form == EKSFTKLForm.reference_code else kl
        if len(idx) == 0:                      # a placeholder forward: in the graph, adding exactly 0
            return losses * 0 + (h + r) * 0, n_kept
        if self._plan == "single":
            d = self.rank(idx, *(t.detach().double().cpu().numpy() for t in (kl, h, collision)))
            w_ce, w_h, w_k, n_kept = d.w_ce, d.w_h, d.w_k, d.n_kept
        else:
            rows = [self._rows[int(i)] for i in idx]
            w_ce, w_h, w_k = (np.concatenate([r_[k] for r_ in rows]) for k in range(3))

        def t(w):
            return torch.from_numpy(np.asarray(w)).to(device=losses.device, dtype=losses.dtype)
        return losses * t(w_ce) + h * t(w_h) + r * t(w_k), n_kept

    def finish(self, accelerator) -> None:
        pass                                   # every rank ranked every step itself

    def shared_state(self) -> dict:
        return {"kl": self.kl, "entropy": self.entropy, "keep": self.keep, "flag_kl": self.flag_kl,
                "flag_entropy": self.flag_entropy, "kept_times": self.kept_times, "trained": self.trained,
                "prepasses": self.prepasses, "step_i": self._step_i,
                "lambdas": np.asarray(self.lambdas, np.float64).reshape(-1, 4)}

    def rank_state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        for k in ("kl", "entropy", "keep", "flag_kl", "flag_entropy", "kept_times"):
            setattr(self, k, np.asarray(state[k]).copy())
        self.trained, self.prepasses, self._step_i = int(state["trained"]), int(state["prepasses"]), \
            int(state["step_i"])
        self.lambdas = [tuple(float(x) for x in row) for row in np.asarray(state["lambdas"]).reshape(-1, 4)]

    # -- results ----------------------------------------------------------------------------------------------------
    def scores_ragged(self) -> Ragged:
        e = self.cfg.scorer.eksft
        if e.criterion == EKSFTCriterion.entropy:
            s = -self.entropy if e.largest_entropy else self.entropy
        else:
            s = -self.kl if e.largest_kl else self.kl
        return self.target.like(s.astype(np.float32))

    def keep_ragged(self) -> Ragged:
        return self.target.like(self.keep.copy())

    def arrays(self) -> dict:
        return {"eksft/kl": self.target.like(self.kl.copy()), "eksft/entropy": self.target.like(self.entropy.copy()),
                "eksft/flag_kl": self.target.like(self.flag_kl.copy()),
                "eksft/flag_entropy": self.target.like(self.flag_entropy.copy())}

    def summary(self) -> dict:
        seen = ~np.isnan(self.kl) & self.is_target
        last = self.lambdas[-1] if self.lambdas else (None,) * 4
        return {"online_tokens_seen": int(seen.sum()), "online_tokens_trained": int(self.trained),
                "online_kept_total": int(self.kept_times.sum()), "online_prepasses": self.prepasses,
                "eksft_flagged_kl": int(self.flag_kl.sum()), "eksft_flagged_entropy": int(self.flag_entropy.sum()),
                "eksft_lambda_entropy_last": last[0], "eksft_lambda_kl_last": last[1]}


def online_hook(cfg, target: Ragged, cached, reference) -> EKSFTHook:
    return EKSFTHook(cfg, target, reference)


def validate(cfg) -> None:
    e = cfg.scorer.eksft
    check(0 <= e.top_k_ratio <= 1, "scorer.eksft.top_k_ratio", e.top_k_ratio, "a share of the tokens: in [0, 1]")
    check(e.lambda_entropy >= 0, "scorer.eksft.lambda_entropy", e.lambda_entropy, "must be >= 0 (0 = off)")
    check(e.lambda_kl >= 0, "scorer.eksft.lambda_kl", e.lambda_kl, "must be >= 0 (0 = off)")
    check(0 <= e.adapt < 1, "scorer.eksft.adapt", e.adapt, "the per-step factor 1 +- adapt: in [0, 1)")
    check(cfg.selection.method in (Method["global"], Method.sample), "selection.method", cfg.selection.method,
          "scorer=eksft flags the top scorer.eksft.top_k_ratio by KL and entropy, ranked over the step (selection="
          "global) or within each example (selection=sample)")


SCORER = Scorer("eksft", needs_reference=True, uses_base=False, online=True, own_rules=True, cached=None,
                online_hook=online_hook, reference_model=True, validate=validate)
