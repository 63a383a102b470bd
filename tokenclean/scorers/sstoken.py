"""ssToken (Qin et al., ICLR 2026, arXiv 2510.18250; jianke0604/ssToken, scripts/finetune.py): online, per sample,
inside the training loop. Every training forward scores each response token j of each sample by

  score_j = gamma * norm(REL)_j + (1 - gamma) * A_j           (scorer.sstoken.gamma, the reference's --ratio 0.5)
  REL_j   = l_history(x_j) - l_current(x_j)                   (retrospective excess loss; history = the base here)
  norm    = min-max over the sample's response tokens: (REL - min) / (max - min + 1e-8)
  A_j     = the last decoder layer's attention from position j (the token's own position, as query) to the prompt:
            sum over the sample's non-response positions k < j of A[j, k], averaged over the heads

and keeps the top selection.keep_ratio of the sample's response tokens (selection=sample: floor(n keep_ratio) per
sample, ties to the earlier position; the reference code keeps ceil(n data_prop) through torch.topk, one token more
where n keep_ratio is not whole). During the warm-up (scorer.sstoken.warmup, a share of each epoch's examples in
training order: the reference code's hard-coded first 10000 of its 50k pool, every epoch) a sample is scored by A
alone (gamma = 0).

What "the prompt" is: the reference takes the first `prompt_len = number of label -100` positions, which is the
prompt of a single-turn sample; here the keys are every non-response position before j, the same set there and
the reasonable one for multi-turn samples.

History model (scorer.sstoken.history). `base` (the released code): l_history is the base's per-token losses, cached
once before training (as self_online, whose score is this REL without the attention term and without the
per-sample ranking). `ema` and `snapshot` (the paper's other histories) keep a copy of the model beside the one that
trains, with no gradient, and run it (eval mode, no grad) on every training micro-batch for l_history:
  ema       h <- d h + (1 - d) theta after every optimiser step (scorer.sstoken.ema_decay = d; h starts as the base),
            applied at the next step's start, so step s ranks against an average lagging d / (1 - d) steps;
  snapshot  h <- theta at the start of every step s with s % N == 0 (scorer.sstoken.snapshot_every = N): step s ranks
            against the model after N floor(s / N) steps, s mod N steps behind; at a refresh step REL is 0 for every
            token and the scores are (1 - gamma) A (REL's min-max of a constant is 0).
Their cost, exactly: memory, one more copy of the *trainable* weights per rank (frozen ones, e.g. the base under
LoRA, are shared with the training model), in the weights' dtype, and its copy in each resume state; compute, one
no-grad forward per micro-batch (about a third of a training step's compute). Not under DeepSpeed ZeRO-3 (the copy
needs whole weights; refused when the first step starts). The base pass still runs before training (the
declaration caches the base's losses); its losses go unused there.

Attention without eager attention for the whole model. The training forward keeps the model's attention
implementation (sdpa, flash, eager). The last decoder layer's attention module gets a config of its own whose
attention implementation is a recording wrapper (transformers' AttentionInterface): it stores that layer's query and
key states (after RoPE and any q/k norm, exactly the ones the real kernel gets; detached) and calls the real
implementation, so the forward and its gradient are untouched. After the forward, `prompt_attention` recomputes that
one layer's softmax(q k^T scaling) head by head in fp32 (memory: rows x width^2 floats for one head at a time, no
[layers, heads, L, L] tensor), masked as transformers masks a packed batch (causal, within each example, the sliding
window and soft-capping the layer declares). tests/test_sstoken.py checks it against eager attention's
output_attentions.

Normalisation: the house's (train.fit), the sum of the kept tokens' losses over the number kept in the whole
optimiser step, exact under accumulation and across ranks; each sample is ranked alone, so its decision does not
depend on how the step is split and no pre-pass is needed (micro scope whatever scorer.online_scope says). The
reference code averages per micro-batch and per GPU (CrossEntropyLoss(reduction="mean") on the new labels).
Cost per step: the recorded q/k of one layer and one layer's attention recomputed without gradient
(results/performance.md).
"""
from __future__ import annotations

import copy
import math
import sys

import numpy as np

from tokenclean import selection
from tokenclean.config import ConfigError, Method, check
from tokenclean.losses import collate
from tokenclean.ragged import Ragged
from tokenclean.scorers import Scorer
from tokenclean.scorers.online import OnlineSelector, round_to_resolution

RECORDING = "tokenclean_sstoken_record"   # the name the recording wrapper is registered under
NORM_EPS = 1e-8                            # the reference code's min-max denominator guard


def normalised_rel(rel: np.ndarray) -> np.ndarray:
    """The reference's per-sample min-max of REL over the sample's response tokens."""
    rel = np.asarray(rel, np.float64)
    if len(rel) == 0:
        return rel
    return (rel - rel.min()) / (rel.max() - rel.min() + NORM_EPS)


def sample_scores(rel: np.ndarray, attention: np.ndarray, gamma: float) -> np.ndarray:
    """One sample's ssToken scores: gamma norm(REL) + (1 - gamma) A (gamma = 0 during the warm-up)."""
    return gamma * normalised_rel(rel) + (1.0 - gamma) * np.asarray(attention, np.float64)


# -- the attention term ------------------------------------------------------------------------------------------------
def prompt_attention(q, k, position_ids, prompt_keys, scaling: float, softcap=None, window=None):
    """A[j] = mean over heads of sum_k softmax_k(q_j . k_k scaling)[k] over the keys k that are prompt positions,
    for every position j of a packed batch; fp32, no gradient.

    q [R, H, W, d], k [R, H_kv, W, d] (the layer's states after RoPE); position_ids [R, W] (restarting at 0 for each
    example; a row's padding continues its last example, whose queries never see it); prompt_keys [R, W] bool.
    Masked as transformers masks a packed batch: key k <= query j, both in the same example, and j - k < window
    when the layer has a sliding window. Returns [R, W]."""
    import torch

    with torch.no_grad():
        q, k = q.float(), k.float()
        R, H, W, _ = q.shape
        groups = H // k.shape[1]
        seg = torch.cumsum(position_ids == 0, dim=1)
        j = torch.arange(W, device=q.device)
        allowed = (j[None, :] <= j[:, None])[None] & (seg[:, :, None] == seg[:, None, :])
        if window:
            allowed &= (j[:, None] - j[None, :] < int(window))[None]
        keys = prompt_keys.to(q.device, torch.float32)[:, None, :]
        total = torch.zeros(R, W, dtype=torch.float32, device=q.device)
        for h in range(H):
            s = q[:, h] @ k[:, h // groups].transpose(-1, -2) * scaling
            if softcap:
                s = torch.tanh(s / softcap) * softcap
            p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
            total += (p * keys).sum(-1)
        return total / H


class LastLayerAttention:
    """Records the query and key states of the last decoder layer's attention in every forward of a TokenLoss (and
    the batch's position_ids, from a pre-hook on it), without changing what the forward computes."""

    def __init__(self, token_loss):
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        lm = token_loss.causal_lm()
        decoder = getattr(lm, lm.base_model_prefix)
        layers = getattr(decoder, "layers", None)
        attn = getattr(layers[-1], "self_attn", None) if layers is not None and len(layers) else None
        if attn is None or not hasattr(attn, "config"):
            raise ConfigError(f"scorer=sstoken: {type(lm).__name__} has no decoder.layers[-1].self_attn with a config "
                              "(the attention term reads its query and key states); use another scorer")
        self.module, self.config = attn, attn.config
        real = attn.config._attn_implementation or "sdpa"
        eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
        self.real = ALL_ATTENTION_FUNCTIONS.get_interface(real, eager) if real != "eager" else eager
        if self.real is None:
            raise ConfigError(f"scorer=sstoken: no attention function {real!r} for {type(attn).__name__}")
        AttentionInterface.register(RECORDING, _recording_attention)
        own = copy.copy(attn.config)        # this module alone calls the recorder; the mask is the model's own
        own._attn_implementation = RECORDING
        attn.config = own
        attn._tokenclean_sstoken = self
        self.q = self.k = self.position_ids = None
        self.scaling, self.softcap, self.window = None, None, None
        self.hook = token_loss.register_forward_pre_hook(self._batch, with_kwargs=True)

    def _batch(self, _module, args, kwargs):
        self.position_ids = kwargs.get("position_ids")
        self.q = self.k = None

    def remove(self) -> None:
        self.module.config = self.config
        del self.module._tokenclean_sstoken
        self.hook.remove()

    def take(self):
        """The last forward's states and batch: (q, k, position_ids) with q, k as [rows, heads, width, d]."""
        if self.q is None or self.position_ids is None:
            raise ConfigError("scorer=sstoken: the last attention layer was not called through transformers' "
                              "attention interface in this forward (or the batch was not packed); use another scorer")
        q, k, pos = self.q, self.k, self.position_ids
        if q.shape[0] != pos.shape[0]:      # flash-attention: TokenLoss flattened the rows into one
            rows, width = pos.shape
            q = q.reshape(q.shape[1], rows, width, -1).transpose(0, 1)
            k = k.reshape(k.shape[1], rows, width, -1).transpose(0, 1)
        return q, k, pos


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    rec = module._tokenclean_sstoken
    rec.q, rec.k = query.detach(), key.detach()
    rec.scaling = kwargs.get("scaling") if kwargs.get("scaling") is not None else query.shape[-1] ** -0.5
    rec.softcap = kwargs.get("softcap")
    rec.window = kwargs.get("sliding_window")
    return rec.real(module, query, key, value, attention_mask, **kwargs)


def batch_attention(rec: LastLayerAttention, target: Ragged, idx) -> np.ndarray:
    """The attention term of every response token of examples idx (in TokenLoss's loss order) from the last
    forward over them (a packed batch: examples in order, each starting where position_ids is 0)."""
    import torch

    q, k, pos = rec.take()
    pos_np = pos.cpu().numpy()
    starts = np.argwhere(pos_np == 0)            # row-major: the examples' (row, column) in idx order
    assert len(starts) >= len(idx), (len(starts), len(idx))
    prompt = np.zeros(pos_np.shape, bool)
    for (r, c), i in zip(starts, idx):
        t = np.asarray(target[int(i)], bool)
        prompt[r, c:c + len(t)] = ~t
    term = prompt_attention(q, k, pos, torch.from_numpy(prompt), rec.scaling, rec.softcap, rec.window).cpu().numpy()
    out = []
    for (r, c), i in zip(starts, idx):
        t = np.asarray(target[int(i)], bool)
        out.append(term[r, c + 1 + np.flatnonzero(t[1:])])
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


# -- the online hook ---------------------------------------------------------------------------------------------------
class SsTokenSelector(OnlineSelector):
    """OnlineSelector (micro scope, per-sample top keep_ratio) whose score is ssToken's, from each training forward's
    own losses and its last layer's attention. Warm-up: the examples at positions p < warmup * n of each epoch's
    order (n = the stage's examples, batch_size per step) are scored by the attention alone."""

    def __init__(self, cached: Ragged | None, target: Ragged, keep_ratio: float, gamma: float, warmup: float,
                 batch_size: int, history: str = "base", snapshot_every: int = 100, ema_decay: float = 0.99):
        super().__init__(None, cached, target, "sample", keep_ratio, None, "micro")
        self.gamma, self.warmup, self.batch_size = gamma, warmup, batch_size
        assert history in ("base", "snapshot", "ema"), history
        self.history_kind, self.snapshot_every, self.ema_decay = str(history), snapshot_every, ema_decay
        self.history = None          # snapshot / ema: the history model (a TokenLoss without gradient)
        self._pairs = []             # (trainable parameter, its copy in the history model)
        self._saved_history = None   # a resumed run's history weights, until the copy exists
        self._history_losses = None
        self._acc = self.input_ids = None
        self.steps_per_epoch = max(1, math.ceil(len(target) / batch_size))
        self.recorder = None
        self._warm = {}
        self._attention = None
        self.warmup_samples = 0     # samples scored by attention alone (over epochs)

    def warm(self, step_i: int, step) -> dict:
        """example -> whether it is scored by attention alone at 0-based step step_i."""
        first = (step_i % self.steps_per_epoch) * self.batch_size
        limit = self.warmup * len(self.target)
        return {int(e): first + k < limit for k, e in enumerate(step)}

    def begin_step(self, accelerator, model, step, micro, n_micro, micro_size, input_ids, pad_id):
        if self.recorder is None:
            token_loss = accelerator.unwrap_model(model)
            if self.history_kind != "base":
                self._copy_history(token_loss)       # before the recorder: the copy records nothing
            self.recorder = LastLayerAttention(token_loss)
        out = super().begin_step(accelerator, model, step, micro, n_micro, micro_size, input_ids, pad_id)
        self._warm = self.warm(self._step_i, step)
        self._acc, self.input_ids = accelerator, input_ids
        if self.history is not None and self._step_i > 0:
            self._update_history()
        return out

    def _copy_history(self, token_loss) -> None:
        import torch
        if any(hasattr(p, "ds_id") for p in token_loss.parameters()):
            raise ConfigError(f"scorer.sstoken.history={self.history_kind!r}: the history copy needs whole weights, "
                              "not DeepSpeed ZeRO-3 shards; use DDP or ZeRO-2, or scorer.sstoken.history=base")
        self.history = copy.deepcopy(token_loss).eval()
        self._pairs = []
        for p, h in zip(token_loss.parameters(), self.history.parameters()):
            h.requires_grad_(False)
            if p.requires_grad:
                self._pairs.append((p, h))
            else:
                h.data = p.data                        # frozen: shared, not copied
        if self._saved_history is not None:
            with torch.no_grad():
                for (_, h), saved in zip(self._pairs, self._saved_history):
                    h.copy_(saved)
            self._saved_history = None

    def _update_history(self) -> None:
        import torch
        with torch.no_grad():
            if self.history_kind == "ema":
                for p, h in self._pairs:
                    h.mul_(self.ema_decay).add_(p.detach(), alpha=1.0 - self.ema_decay)
            elif self._step_i % self.snapshot_every == 0:
                for p, h in self._pairs:
                    h.copy_(p.detach())

    def _history_forward(self, idx) -> np.ndarray:
        """The history model's losses on the response tokens of examples idx, batched as fit batched them."""
        import torch
        batch = {k: v.to(self._acc.device) for k, v in collate(self.input_ids, self.target, idx, packed=True).items()}
        with torch.no_grad(), self._acc.autocast():
            return self.history(**batch).float().cpu().numpy().astype(np.float64)

    def weigh(self, idx, losses, n_kept):
        if len(idx):
            self._attention = batch_attention(self.recorder, self.target, idx)
            self.warmup_samples += sum(self._warm[int(i)] for i in idx)
            self._history_losses = self._history_forward(idx) if self.history is not None else None
        return super().weigh(idx, losses, n_kept)

    def rank(self, idx, current):
        pos = self._positions(idx)
        assert len(pos) == len(current) == len(self._attention), (len(pos), len(current), len(self._attention))
        past = self._history_losses if self.history is not None else self.cached[pos].astype(np.float64)
        rel = round_to_resolution(past - np.asarray(current, np.float64))
        s = np.empty(len(pos), np.float64)
        lo = 0
        for i in idx:
            n = int(self.n_target[int(i)])
            g = 0.0 if self._warm.get(int(i), False) else self.gamma
            s[lo:lo + n] = sample_scores(rel[lo:lo + n], self._attention[lo:lo + n], g)
            lo += n
        s = round_to_resolution(s)
        counts = self.n_target[np.asarray(idx, np.int64)]
        offsets = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        batch_target = Ragged(np.ones(len(s), bool), offsets)
        keep = selection.select(batch_target.like(s), batch_target, "sample", self.keep_ratio).values
        return pos, s, keep

    def finish(self, accelerator) -> None:
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None
        self.history, self._pairs = None, []
        super().finish(accelerator)

    def shared_state(self) -> dict:
        return {**super().shared_state(), "warmup_samples": self.warmup_samples,
                "history": [h.detach().cpu().clone() for _, h in self._pairs]}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.warmup_samples = int(state["warmup_samples"])
        self._saved_history = list(state["history"]) or None

    def summary(self) -> dict:
        return {**super().summary(), "sstoken_warmup_samples": int(self.warmup_samples)}


def online_hook(cfg, target: Ragged, cached: Ragged | None, reference=None) -> SsTokenSelector:
    s = cfg.scorer.sstoken
    return SsTokenSelector(cached, target, cfg.selection.keep_ratio, s.gamma, s.warmup, cfg.training.batch_size,
                           str(s.history), s.snapshot_every, s.ema_decay)


def validate(cfg) -> None:
    s = cfg.scorer.sstoken
    check(0 <= s.gamma <= 1, "scorer.sstoken.gamma", s.gamma, "the weight of norm(REL) against attention: in [0, 1]")
    check(0 <= s.warmup <= 1, "scorer.sstoken.warmup", s.warmup, "a share of each epoch's examples: in [0, 1]")
    check(s.snapshot_every >= 1, "scorer.sstoken.snapshot_every", s.snapshot_every, "a step count: at least 1")
    check(0 <= s.ema_decay < 1, "scorer.sstoken.ema_decay", s.ema_decay, "the EMA's decay: in [0, 1)")
    check(cfg.selection.method == Method.sample, "selection.method", cfg.selection.method,
          "scorer=sstoken keeps the top selection.keep_ratio of each sample (its REL is normalised per sample); "
          "use selection=sample")


SCORER = Scorer("sstoken", online=True, cached="base", online_hook=online_hook, validate=validate)
