"""XTF (Yang et al., 2026, arXiv 2602.14536): three explainable attributes, all from the base model, no reference;
a token is dropped if any attribute in `rules` marks it (union), so the kept ratio is XTF's own. Every open choice
is an option (scorer.xtf.*) with the default below:

  KN  knowledge novelty 1 - p_base(x_j) = 1 - exp(-l_base); noise if KN < kn_threshold (0.05).
  RI  reasoning importance: the attention position j receives, i.e. the attention weights A[q, j] of the queries
      q >= j (itself and every later position of the sequence, prompt excluded by causality), averaged (ri_reduce
      = mean; sum is biased towards early positions, which more queries see) over the heads ri_heads (all) and the
      layers ri_layers (all), read from the eager attention of a forward pass (a copy of the base is loaded with
      attn_implementation=eager for this pass). Noise if RI < Q1 - ri_iqr_k (Q3 - Q1), quartiles (numpy linear
      interpolation) of the RI of the sample's response tokens.
  TR  task relevance 1 - normalised distance(input embedding of x_j, domain centre); centre = the mean input
      embedding over every scored response token (tr_center=data; or of the tokens of tr_words), distance =
      cosine distance (tr_distance), min-max normalised over all scored tokens (tr_scope=global; or per sample).
      Multi-Otsu (skimage.filters.threshold_multiotsu, tr_classes=3 classes, np.digitize against the
      thresholds); noise = the second-lowest class (tr_noise_classes=[1]; class 0 is the lowest TR). With fewer
      distinct values than classes no token is marked (logged).

Stored per run: xtf/kn, xtf/ri, xtf/tr (float) and xtf/kn_noise, xtf/ri_noise, xtf/tr_noise (bool), shown in the
report. The score is the share of the rules that do NOT mark the token (1 = clean by every rule): with
selection=soft it is the token's weight.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from tokenclean.config import ConfigError, check
from tokenclean.dist import gather, not_sharded
from tokenclean.losses import collate, length_batches, rank_batches
from tokenclean.models import load_model
from tokenclean.ragged import Ragged
from tokenclean.scorers import Scored, Scorer, Signals

log = logging.getLogger(__name__)

ATTRIBUTES = ("kn", "ri", "tr")


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


def knowledge_novelty(base_losses: Ragged) -> Ragged:
    """KN = 1 - p_base(x_j) = 1 - exp(-l_base) (NaN outside response tokens)."""
    return base_losses.like((1.0 - np.exp(-np.asarray(base_losses.values, np.float64))).astype(np.float32))


def task_relevance(input_ids: Ragged, target: Ragged, embeddings: np.ndarray, center: np.ndarray | None = None,
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


def rules(kn: Ragged, ri: Ragged, tr: Ragged, target: Ragged, xcfg) -> dict[str, Ragged]:
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

    decoder = getattr(lm, lm.base_model_prefix)
    blocks = decoder.layers
    n_layers = len(blocks)
    chosen = list(range(n_layers)) if layers is None else sorted({int(i) % n_layers for i in layers})
    acc_state = {}

    def hook(_module, _args, output):
        w = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if w is None:
            raise ConfigError("scorer=xtf: the attention module returned no weights; load the model with eager "
                              "attention: model.attn_implementation=eager")
        w = w.float()
        if heads is not None:
            w = w[:, list(heads)]
        w = w.mean(1)                                  # [B, Lq, Lk]
        valid_q = acc_state["attn"].unsqueeze(-1)      # [B, Lq, 1]
        rec = (w * valid_q).sum(1)                     # [B, Lk]: summed over queries (causal: only q >= k)
        acc_state["sum"] = rec if acc_state.get("sum") is None else acc_state["sum"] + rec

    handles = [blocks[i].self_attn.register_forward_hook(hook) for i in chosen]
    was_training = lm.training
    lm.eval()
    mine = []
    try:
        for idx, real in rank_batches(accelerator, length_batches(input_ids.lengths, batch_size), desc):
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
    for i, r in gather(accelerator, mine):
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


def attributes(accelerator, base_dir: str, mcfg, x, input_ids: Ragged, target: Ragged, base_losses: Ragged,
               tokenizer, batch_size: int, pad_id: int, seed: int = 0) -> dict[str, Ragged]:
    """kn, ri, tr (float) and kn_noise, ri_noise, tr_noise, keep (bool), aligned with target, from the base model at
    base_dir (a copy loaded with eager attention) and its per-token losses."""
    with not_sharded(accelerator):   # a whole copy per rank: under ZeRO-3 it would be built sharded, and break
        lm = load_model(base_dir, replace(mcfg, attn_implementation="eager"), seed, lora=False)
    lm.to(accelerator.device)
    kn = knowledge_novelty(base_losses)
    ri = attention_received(accelerator, lm, input_ids, target, batch_size, pad_id, x.ri_layers, x.ri_heads,
                            x.ri_reduce)
    embeddings = lm.get_input_embeddings().weight.detach().float().cpu().numpy()
    center = domain_center(tokenizer, embeddings, x.tr_words) if x.tr_center == "words" else None
    tr = task_relevance(input_ids, target, embeddings, center, x.tr_distance, x.tr_scope)
    del lm
    return {"kn": kn, "ri": ri, "tr": tr, **rules(kn, ri, tr, target, x)}


def score(signals: Signals) -> Scored:
    ex, cfg, tokenizer = signals.examples, signals.cfg, signals.tokenizer
    x = cfg.scorer.xtf
    found = attributes(signals.accelerator, signals.base_dir, cfg.model, x, ex.input_ids, ex.target,
                       signals.base_losses, tokenizer, cfg.training.score_batch_size, tokenizer.pad_token_id, cfg.seed)
    decisions = {k: found[k] for k in ("kn_noise", "ri_noise", "tr_noise", "keep")}
    kn, ri, tr = found["kn"], found["ri"], found["tr"]
    is_t = np.asarray(ex.target.values, bool)
    marks = sum(decisions[f"{r}_noise"].values.astype(np.float32) for r in x.rules)
    clean_share = np.where(is_t, 1.0 - marks / len(x.rules), np.nan).astype(np.float32)
    arrays = {f"xtf/{k}": v for k, v in (("kn", kn), ("ri", ri), ("tr", tr))}
    arrays.update({f"xtf/{k}": v for k, v in decisions.items()})
    info = {f"xtf_{a}_noise": int(np.count_nonzero(decisions[f"{a}_noise"].values)) for a in ATTRIBUTES}
    scores = ex.target.like(clean_share)
    return Scored(scores, keep=decisions["keep"], weights=scores.like(np.nan_to_num(clean_share)), arrays=arrays,
                  info=info)


def validate(cfg) -> None:
    x = cfg.scorer.xtf
    check(len(x.rules) > 0, "scorer.xtf.rules", list(x.rules), "must be a non-empty subset of [kn, ri, tr]")
    check(0 <= x.kn_threshold <= 1, "scorer.xtf.kn_threshold", x.kn_threshold, "must be in [0, 1]")
    check(x.ri_iqr_k >= 0, "scorer.xtf.ri_iqr_k", x.ri_iqr_k, "must be >= 0")
    check(x.tr_center != "words" or bool(x.tr_words), "scorer.xtf.tr_words", x.tr_words,
          "tr_center=words needs a non-empty list of words")
    check(x.tr_classes >= 2, "scorer.xtf.tr_classes", x.tr_classes, "Multi-Otsu needs at least 2 classes")
    check(all(0 <= c < x.tr_classes for c in x.tr_noise_classes), "scorer.xtf.tr_noise_classes",
          list(x.tr_noise_classes), f"classes are 0..{x.tr_classes - 1}")


SCORER = Scorer("xtf", pipelines=("fixed",), score=score, validate=validate, own_rules=True,
                reasons=(("KN", "xtf/kn_noise"), ("RI", "xtf/ri_noise"), ("TR", "xtf/tr_noise")))
