"""Token scorers: which response tokens are worth learning. One implementation per idea.

  name          score (higher = keep)                     needs                  where it ranks
  ------------  ----------------------------------------  ---------------------  --------------------------------
  influence     l_base - l_ref             (Token Cleaning) base + reference      offline, by selection.method:
                                                                                  global (the paper), sample (the
                                                                                  reference code's "rho" baseline)
  rho           l_current - l_ref          (Rho-1)          cached l_ref          online, per training batch
  self_online   l_base - l_current         (ours)           cached l_base         online, per training batch
  xtf           KN, RI, TR union rule      (XTF)            base model only       offline, rules (own keep ratio)
  (baselines)   selection=random, selection=all            nothing                offline

Online scorers (rho, self_online) cache one per-token loss once (the fixed reference's for Rho-1, the untouched
base's for ours) and take the other from the current model while it trains: `OnlineSelector` is the hook that
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
         known from the token counts before any forward. Not available with selection.method=threshold.

Within the batch, selection.method applies as everywhere: global = top keep_ratio of the batch's tokens (Rho-1's
"rank the tokens in a batch"), sample = top keep_ratio within each example, threshold = score > threshold. Counts
and ties follow selection.keep_mask (floor, ties to the earlier example/position in step order).

XTF (arXiv 2602.14536), everything from the base model, no reference; every open choice is an option
(scorer.xtf.*) with the default below:
  KN  knowledge novelty 1 - p_base(x_j) = 1 - exp(-l_base); noise if KN < kn_threshold (0.05).
  RI  reasoning importance: the attention position j receives, i.e. the attention weights A[q, j] of the queries
      q >= j (itself and every later position of the sequence, prompt excluded by causality), averaged (ri_reduce
      = mean; sum is biased towards early positions, which more queries see) over the heads ri_heads (all) and the
      layers ri_layers (all), read from the eager attention of a forward pass (the model is loaded with
      attn_implementation=eager for this pass). Noise if RI < Q1 - ri_iqr_k (Q3 - Q1), quartiles (numpy linear
      interpolation) of the RI of the sample's response tokens.
  TR  task relevance 1 - normalised distance(input embedding of x_j, domain centre); centre = the mean input
      embedding over every scored response token (tr_center=data; or of the tokens of tr_words), distance =
      cosine distance (tr_distance), min-max normalised over all scored tokens (tr_scope=global; or per sample).
      Multi-Otsu (skimage.filters.threshold_multiotsu, tr_classes=3 classes, np.digitize against the
      thresholds); noise = the second-lowest class (tr_noise_classes=[1]; class 0 is the lowest TR). With fewer
      distinct values than classes no token is marked (logged).
  A token is dropped if any attribute in `rules` marks it (union). The per-attribute scores and decisions are
  stored in the run directory (xtf/kn, xtf/ri, xtf/tr float; xtf/kn_noise, xtf/ri_noise, xtf/tr_noise bool).
"""
from __future__ import annotations

import logging

import numpy as np

from tokenclean import selection
from tokenclean.ragged import Ragged

log = logging.getLogger(__name__)

NAMES = ("influence", "rho", "self_online", "xtf")
ONLINE = ("rho", "self_online")
NEEDS_REFERENCE = ("influence", "rho")
FIXED_ONLY = ("rho", "xtf")


def is_online(name: str) -> bool:
    return name in ONLINE


def needs_reference(name: str) -> bool:
    """The fixed pipeline trains a warm-up reference for these."""
    return name in NEEDS_REFERENCE


def validate_scorer(cfg, check, one_of) -> None:
    """The scorer's part of config.validate (check/one_of raise ConfigError naming the override)."""
    sc, s = cfg.scorer, cfg.selection
    one_of("scorer.name", sc.name, list(NAMES))
    one_of("scorer.online_scope", sc.online_scope, ["step", "micro"])
    if s.method in ("random", "all"):
        return  # a baseline: no scorer runs
    if sc.name in FIXED_ONLY:
        check(cfg.pipeline.name == "fixed", "pipeline.name", cfg.pipeline.name,
              f"scorer={sc.name} runs in the fixed pipeline only (its reference/base signals do not evolve by "
              "rounds); use pipeline=fixed, or scorer=influence|self_online for self-evolving cleaning")
    if is_online(sc.name):
        one_of("selection.method", s.method, ["global", "sample", "threshold", "random", "all"])
        check(not (s.method == "threshold" and sc.online_scope == "micro"), "scorer.online_scope", sc.online_scope,
              "selection.method=threshold needs online_scope=step (the step's kept count, the loss normaliser, "
              "must be known before the first backward)")
    x = sc.xtf
    if sc.name == "xtf":
        check(len(x.rules) > 0 and set(x.rules) <= {"kn", "ri", "tr"}, "scorer.xtf.rules", list(x.rules),
              "must be a non-empty subset of [kn, ri, tr]")
        check(0 <= x.kn_threshold <= 1, "scorer.xtf.kn_threshold", x.kn_threshold, "must be in [0, 1]")
        one_of("scorer.xtf.ri_reduce", x.ri_reduce, ["mean", "sum"])
        check(x.ri_iqr_k >= 0, "scorer.xtf.ri_iqr_k", x.ri_iqr_k, "must be >= 0")
        one_of("scorer.xtf.tr_center", x.tr_center, ["data", "words"])
        check(x.tr_center != "words" or bool(x.tr_words), "scorer.xtf.tr_words", x.tr_words,
              "tr_center=words needs a non-empty list of words")
        one_of("scorer.xtf.tr_distance", x.tr_distance, ["cosine", "l2"])
        one_of("scorer.xtf.tr_scope", x.tr_scope, ["global", "sample"])
        check(x.tr_classes >= 2, "scorer.xtf.tr_classes", x.tr_classes, "Multi-Otsu needs at least 2 classes")
        check(all(0 <= c < x.tr_classes for c in x.tr_noise_classes), "scorer.xtf.tr_noise_classes",
              list(x.tr_noise_classes), f"classes are 0..{x.tr_classes - 1}")


# ----------------------------------------------------------------------------------------------------------------
# offline scores


def influence(base: Ragged, ref: Ragged) -> Ragged:
    """Token Cleaning: l_base - l_ref (NaN outside response tokens)."""
    assert base.same_layout(ref)
    return base.like(np.asarray(base.values, np.float32) - np.asarray(ref.values, np.float32))


# ----------------------------------------------------------------------------------------------------------------
# online selection (Rho-1, ours)


class OnlineSelector:
    """Per-batch token selection during training; the hook `train.fit` calls (begin_step, then weigh per forward).

    cached: per-token losses aligned with `target` (the reference's for kind=rho, the base's for self_online).
    Score of token j: rho: l_current - l_ref; self_online: l_base - l_current. The training forward must compute
    losses on every target position (fit is given `target` as its keep mask); weigh() zeroes the dropped ones.
    Records, per target token, the score and decision of the last time it was trained (`scores`, `keep`) and how
    often it was kept (`kept_times`, over epochs)."""

    def __init__(self, kind: str, cached: Ragged, target: Ragged, method: str = "global", keep_ratio: float = 0.6,
                 threshold: float | None = None, scope: str = "step"):
        assert kind in ONLINE and cached.same_layout(target)
        assert method in ("global", "sample", "threshold"), method
        assert scope in ("step", "micro")
        self.kind, self.method, self.keep_ratio, self.threshold, self.scope = kind, method, keep_ratio, threshold, scope
        self.cached = np.asarray(cached.values, np.float32)
        self.target = target
        self.is_target = np.asarray(target.values, bool)
        self.n_target = target.row_sums()
        n = len(self.is_target)
        self.scores = np.full(n, np.nan, np.float32)
        self.keep = np.zeros(n, bool)
        self.kept_times = np.zeros(n, np.int32)
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

    def score(self, pos: np.ndarray, current: np.ndarray) -> np.ndarray:
        c = self.cached[pos].astype(np.float64)
        cur = np.asarray(current, np.float64)
        return cur - c if self.kind == "rho" else c - cur

    def rank(self, idx, current: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions, scores, keep) for the target tokens of examples idx given their current losses, ranked
        together by selection.method (ties to the earlier example in idx, then the earlier position)."""
        pos = self._positions(idx)
        assert len(pos) == len(current), (len(pos), len(current))
        s = self.score(pos, current)
        counts = self.n_target[np.asarray(idx, np.int64)] if len(idx) else np.zeros(0, np.int64)
        offsets = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        batch_target = Ragged(np.ones(len(s), bool), offsets)
        keep = selection.keep_mask(batch_target.like(s), batch_target, self.method, self.keep_ratio,
                                   self.threshold).values
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
        from tokenclean.train import micro_batches
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
        return keep, int(sum(np.count_nonzero(v) for v in keep.values()))

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
            n_kept = int(keep.sum())
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

        from tokenclean.losses import collate
        self.prepasses += 1
        counts = self.n_target[step]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        where = {int(e): k for k, e in enumerate(step)}
        buf = torch.zeros(int(counts.sum()), dtype=torch.float32)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for idx in micro:
                empty = len(idx) == 0
                batch = collate(input_ids, self.target, idx if not empty else step[:1], pad_id)
                if empty:
                    batch["mask"][:] = False
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.autocast():
                    cur = model(**batch).float().cpu()
                if empty:
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
            row = np.zeros(hi - lo, bool)
            sel = pos[(pos >= lo) & (pos < hi)]
            row[sel - lo] = self.keep[sel]
            rows[int(i)] = row
        return rows

    def finish(self, accelerator) -> None:
        """Share the micro-scope decisions of every rank (replayed in step order), so every rank holds them all."""
        if accelerator.num_processes == 1 or self.scope != "micro":
            return
        from accelerate.utils import gather_object
        events = sorted(gather_object(self._events), key=lambda e: e[0])
        for _, pos, s, keep in events:
            self._record(pos, s, keep)
        self._events = []

    # -- results ----------------------------------------------------------------------------------------------------
    def scores_ragged(self) -> Ragged:
        return self.target.like(self.scores.copy())

    def keep_ragged(self) -> Ragged:
        return self.target.like(self.keep.copy())

    def summary(self) -> dict:
        seen = ~np.isnan(self.scores) & self.is_target
        return {"online_tokens_seen": int(seen.sum()), "online_tokens_trained": int(self.trained),
                "online_kept_total": int(self.kept_times.sum()), "online_prepasses": self.prepasses}


# ----------------------------------------------------------------------------------------------------------------
# XTF


def iqr_low(values: np.ndarray, k: float = 1.0) -> np.ndarray:
    """True where a value is below Q1 - k (Q3 - Q1) of `values` (numpy's linear-interpolation quartiles)."""
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return np.zeros(0, bool)
    q1, q3 = np.percentile(v, [25, 75])
    return v < q1 - k * (q3 - q1)


def otsu_classes(values: np.ndarray, classes: int = 3) -> np.ndarray | None:
    """Multi-Otsu class of every value (0 = lowest), or None when there are fewer distinct values than classes."""
    from skimage.filters import threshold_multiotsu
    v = np.asarray(values, np.float64)
    if len(np.unique(v)) < classes:
        return None
    try:
        thresholds = threshold_multiotsu(v, classes=classes)
    except ValueError:  # skimage: "the number of thresholds ... cannot be found" on degenerate histograms
        return None
    return np.digitize(v, bins=thresholds)


def xtf_knowledge_novelty(base_losses: Ragged) -> Ragged:
    """KN = 1 - p_base(x_j) = 1 - exp(-l_base) (NaN outside response tokens)."""
    return base_losses.like((1.0 - np.exp(-np.asarray(base_losses.values, np.float64))).astype(np.float32))


def xtf_task_relevance(input_ids: Ragged, target: Ragged, embeddings: np.ndarray, center: np.ndarray | None = None,
                       distance: str = "cosine", scope: str = "global") -> Ragged:
    """TR = 1 - minmax(distance(E[x_j], centre)) on response tokens (NaN elsewhere); centre defaults to the mean
    embedding over every response token (each occurrence counts)."""
    is_t = np.asarray(target.values, bool)
    ids = np.asarray(input_ids.values, np.int64)[is_t]
    E = np.asarray(embeddings, np.float64)
    if center is None:
        center = E[ids].mean(0) if len(ids) else np.zeros(E.shape[1])
    center = np.asarray(center, np.float64)
    if distance == "cosine":
        norms = np.linalg.norm(E, axis=1) * max(np.linalg.norm(center), 1e-12)
        d_vocab = 1.0 - (E @ center) / np.maximum(norms, 1e-12)
    else:
        d_vocab = np.linalg.norm(E - center, axis=1)
    d = d_vocab[ids]
    out = np.full(len(is_t), np.nan, np.float64)
    if scope == "global":
        out[is_t] = 1.0 - _minmax(d)
    else:
        ex = target.example_ids()[is_t]
        tr = np.empty(len(d))
        for e in np.unique(ex):
            m = ex == e
            tr[m] = 1.0 - _minmax(d[m])
        out[is_t] = tr
    return target.like(out.astype(np.float32))


def _minmax(d: np.ndarray) -> np.ndarray:
    if len(d) == 0:
        return d
    lo, hi = d.min(), d.max()
    return np.zeros_like(d) if hi - lo < 1e-12 else (d - lo) / (hi - lo)


def xtf_rules(kn: Ragged, ri: Ragged, tr: Ragged, target: Ragged, xcfg) -> dict[str, Ragged]:
    """The three noise decisions and their union, from the attribute scores. Returns bool Raggeds kn_noise,
    ri_noise, tr_noise and keep (= target and not any noise of the rules in xcfg.rules)."""
    is_t = np.asarray(target.values, bool)
    n = len(is_t)
    kn_noise = np.zeros(n, bool)
    kn_noise[is_t] = np.asarray(kn.values, np.float64)[is_t] < xcfg.kn_threshold
    ri_noise = np.zeros(n, bool)
    riv = np.asarray(ri.values, np.float64)
    for e in range(len(target)):
        lo, hi = target.offsets[e], target.offsets[e + 1]
        p = lo + np.flatnonzero(is_t[lo:hi])
        ri_noise[p] = iqr_low(riv[p], xcfg.ri_iqr_k)
    tr_noise = np.zeros(n, bool)
    trv = np.asarray(tr.values, np.float64)
    groups = [np.flatnonzero(is_t)] if xcfg.tr_scope == "global" else [
        target.offsets[e] + np.flatnonzero(is_t[target.offsets[e]:target.offsets[e + 1]]) for e in range(len(target))]
    skipped = 0
    for p in groups:
        cls = otsu_classes(trv[p], xcfg.tr_classes) if len(p) else None
        if cls is None:
            skipped += len(p) > 0
            continue
        tr_noise[p] = np.isin(cls, list(xcfg.tr_noise_classes))
    if skipped:
        log.warning("xtf: %d token group(s) have fewer distinct TR values than tr_classes=%d; no TR noise marked "
                    "there", skipped, xcfg.tr_classes)
    decisions = {"kn": kn_noise, "ri": ri_noise, "tr": tr_noise}
    noise = np.zeros(n, bool)
    for r in xcfg.rules:
        noise |= decisions[r]
    return {"kn_noise": target.like(kn_noise), "ri_noise": target.like(ri_noise), "tr_noise": target.like(tr_noise),
            "keep": target.like(is_t & ~noise)}


def attention_received(accelerator, lm, input_ids: Ragged, target: Ragged, batch_size: int, pad_id: int,
                       layers=None, heads=None, reduce: str = "mean", desc: str = "xtf attention") -> Ragged:
    """RI of every response token: the attention its position receives from the queries q >= j of its sequence,
    averaged over `heads` and `layers` (mean over those queries, or their sum). `lm` is a plain causal LM loaded
    with attn_implementation=eager (its attention modules must return their weights). NaN outside response
    tokens. Batches are dealt round-robin to the ranks and gathered, as in losses.token_losses."""
    import torch

    from tokenclean.losses import _gather, collate, rank_batches
    decoder = getattr(lm, lm.base_model_prefix)
    blocks = decoder.layers
    n_layers = len(blocks)
    chosen = list(range(n_layers)) if layers is None else sorted({int(l) % n_layers for l in layers})
    acc_state = {}

    def hook(_module, _args, output):
        w = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if w is None:
            raise RuntimeError("xtf: the attention module returned no weights; load the model with "
                               "attn_implementation=eager (model.attn_implementation=eager)")
        w = w.float()
        if heads is not None:
            w = w[:, list(heads)]
        w = w.mean(1)                                  # [B, Lq, Lk]
        valid_q = acc_state["attn"].unsqueeze(-1)      # [B, Lq, 1]
        rec = (w * valid_q).sum(1)                     # [B, Lk]: summed over queries (causal: only q >= k)
        acc_state["sum"] = rec if acc_state.get("sum") is None else acc_state["sum"] + rec

    handles = [blocks[l].self_attn.register_forward_hook(hook) for l in chosen]
    was_training = lm.training
    lm.eval()
    mine = []
    try:
        for idx, real in rank_batches(accelerator, input_ids.lengths, batch_size, desc):
            batch = collate(input_ids, target, idx, pad_id)
            attn = batch["attention_mask"].to(accelerator.device)
            acc_state.update(attn=attn.float(), sum=None)
            with torch.no_grad(), accelerator.autocast():
                decoder(input_ids=batch["input_ids"].to(accelerator.device), attention_mask=attn, use_cache=False)
            if not real:
                continue
            total = (acc_state["sum"] / len(chosen)).cpu().numpy()
            lengths = attn.sum(1).cpu().numpy()
            for k, i in enumerate(idx):
                n = int(lengths[k])
                r = total[k, :n].astype(np.float64)
                if reduce == "mean":
                    r = r / (n - np.arange(n))         # queries q >= j: n - j of them
                mine.append((int(i), r.astype(np.float32)))
    finally:
        for h in handles:
            h.remove()
        lm.train(was_training)
    values = np.full(len(target.values), np.nan, np.float32)
    is_t = np.asarray(target.values, bool)
    for i, r in _gather(accelerator, mine):
        lo, hi = target.offsets[i], target.offsets[i + 1]
        values[lo:hi] = np.where(is_t[lo:hi], r, np.nan)
    return target.like(values)


def domain_center(tokenizer, embeddings: np.ndarray, words) -> np.ndarray:
    """Mean input embedding of the tokens of `words` (each word tokenized with and without a leading space)."""
    ids = []
    for w in words:
        for v in (w, " " + w):
            ids += tokenizer(v, add_special_tokens=False)["input_ids"]
    return np.asarray(embeddings, np.float64)[np.asarray(ids, np.int64)].mean(0)


def xtf(accelerator, base_path: str, mcfg, xcfg, input_ids: Ragged, target: Ragged, base_losses: Ragged | None,
        tokenizer, batch_size: int, pad_id: int, seed: int = 0) -> dict[str, Ragged]:
    """Every XTF attribute and decision for a split, from the base model at base_path (loaded with eager
    attention) and its per-token losses (computed here when base_losses is None). Returns kn, ri, tr (float),
    kn_noise, ri_noise, tr_noise, keep (bool) and base_losses, all aligned with target."""
    from dataclasses import replace

    from tokenclean.checkpoints import _not_sharded, load_model
    from tokenclean.losses import TokenLoss, token_losses
    with _not_sharded(accelerator):   # a whole copy per rank: under ZeRO-3 it would be built sharded, and break
        lm = load_model(base_path, replace(mcfg, attn_implementation="eager"), seed, lora=False)
    lm.to(accelerator.device)
    if base_losses is None:
        base_losses = token_losses(accelerator, TokenLoss(lm), input_ids, target, batch_size, pad_id, "base losses")
    kn = xtf_knowledge_novelty(base_losses)
    ri = attention_received(accelerator, lm, input_ids, target, batch_size, pad_id, xcfg.ri_layers, xcfg.ri_heads,
                            xcfg.ri_reduce)
    E = lm.get_input_embeddings().weight.detach().float().cpu().numpy()
    center = domain_center(tokenizer, E, xcfg.tr_words) if xcfg.tr_center == "words" else None
    tr = xtf_task_relevance(input_ids, target, E, center, xcfg.tr_distance, xcfg.tr_scope)
    del lm
    out = {"kn": kn, "ri": ri, "tr": tr, "base_losses": base_losses}
    out.update(xtf_rules(kn, ri, tr, target, xcfg))
    return out
