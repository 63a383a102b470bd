"""Which scorer finds the injected tokens? Every scorer scores the noisy training set of benchmarks/injection.py (the
truth known per token); writes results/scorers*.md (+ .csv, .json, .png).

  python -m benchmarks.detection --model smollm2 --n-train 160 --n-warmup 80 --out results/scorers
  python -m benchmarks.detection --model tiny --n-train 160 --n-warmup 80 --out results/scorers_tiny
  python -m benchmarks.detection --model tiny-chitchat --n-train 160 --n-warmup 80 --out results/scorers_tiny_chitchat

Metrics over response tokens, "noise" = injected: ROC-AUC of each scorer's noise score (minus its keep score),
overall and per kind (that kind against clean tokens), and precision / recall of the set the scorer drops at its
configured ratio (recall per kind too), plus the share of clean tokens dropped. Every scorer of tokenclean/scorers/
is a row (influence, rho, self_online, xtf, entropy, profit, forgetting, eksft, sstoken), beside the baselines
(selection=all, selection=random).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks import injection
from benchmarks.common import MODELS, code_commit, command, provenance
from benchmarks.injection import KINDS

log = logging.getLogger("benchmarks.detection")


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, s))


def detection_metrics(noise: np.ndarray | None, dropped: np.ndarray, truth: np.ndarray) -> dict:
    """noise: noise score per response token (higher = more likely injected; None = no score), dropped: bool per
    response token, truth: kind code per response token. Returns AUC / precision / recall overall and per kind."""
    inj = truth > 0
    m = {"dropped": float(dropped.mean()), "auc": _auc(inj, noise) if noise is not None else float("nan"),
         "precision": float((dropped & inj).sum() / max(dropped.sum(), 1)) if dropped.any() else float("nan"),
         "recall": float((dropped & inj).sum() / max(inj.sum(), 1)),
         "clean_dropped": float((dropped & ~inj).sum() / max((~inj).sum(), 1))}
    for k, kind in enumerate(KINDS[1:], 1):
        sel = (truth == 0) | (truth == k)
        m[f"auc_{kind}"] = _auc(truth[sel] == k, noise[sel]) if noise is not None else float("nan")
        m[f"recall_{kind}"] = float(dropped[truth == k].mean()) if (truth == k).any() else float("nan")
    return m


def detect(model: str = "tiny", source: str = "builtin:chatterbot", n_train: int = 300, n_warmup: int = 200,
           n_eval: int = 0, data_seed: int = 0, seed: int = 42, keep_ratio: float = 0.6, max_length: int = 256,
           out: str | None = None, self_evolving_ref: bool = True, command: str = "") -> list[dict]:
    """Score the noisy training set with every scorer; return one metrics row per scorer (and write out.md/csv/png
    when out is given)."""
    from tokenclean import scorers, selection
    from tokenclean.dist import make_accelerator
    from tokenclean.losses import TokenLoss, token_losses
    from tokenclean.models import load_model
    from tokenclean.scorers import influence, profit, xtf
    from tokenclean.scorers.eksft import EKSFTHook
    from tokenclean.scorers.online import OnlineSelector
    from tokenclean.scorers.rho import excess_loss
    from tokenclean.scorers.self_online import learned_since_base
    from tokenclean.scorers.sstoken import SsTokenSelector
    from tokenclean.train import fit, prepare

    t_all, commit = time.perf_counter(), code_commit()
    D = injection.build_data(model, source, n_train, n_warmup, n_eval, data_seed, max_length)
    cfg, tok, T, W, truth = D["cfg"], D["tokenizer"], D["T"], D["W"], D["truth"]
    acc = make_accelerator(cfg.training.mixed_precision)
    pad, bs, tcfg = tok.pad_token_id, cfg.training.score_batch_size, cfg.training
    target = T.target
    is_t = np.asarray(target.values, bool)
    tr = np.asarray(truth.values)[is_t]
    timings = {}

    def lm():
        return load_model(D["base_dir"], cfg.model, seed, lora=cfg.model.lora.enabled)

    def losses_of(model_, name):
        t0 = time.perf_counter()
        r = token_losses(acc, model_, T.input_ids, target, bs, pad, desc=name)
        timings[name] = time.perf_counter() - t0
        return r

    def trained_on(split, keep, name, online=None):
        t0 = time.perf_counter()
        p = prepare(acc, lm(), len(split.input_ids), tcfg, seed)
        stats = fit(acc, p, split.input_ids, keep, tcfg, pad, desc=name, online=online)
        timings[name] = time.perf_counter() - t0
        return p, stats

    base_model = acc.prepare(TokenLoss(load_model(D["base_dir"], cfg.model, seed, lora=False)))
    t0 = time.perf_counter()   # the base losses and the base's predictive entropy, in one pass (as the pipelines do)
    base, base_entropy = token_losses(acc, base_model, T.input_ids, target, bs, pad, desc="base losses",
                                      entropy=True)
    timings["base losses + entropy"] = time.perf_counter() - t0
    del base_model
    p, _ = trained_on(W, W.target, "reference (clean warm-up)")
    ref = losses_of(p.model, "reference losses")
    ref_model = acc.unwrap_model(p.model).eval().requires_grad_(False)   # EKSFT's reference, whole
    del p
    infl = influence.influence(base, ref)

    rows = []

    def add(name, noise_flat, keep_flat, note=""):
        dropped = ~np.asarray(keep_flat, bool)[is_t]
        noise = None if noise_flat is None else np.asarray(noise_flat, np.float64)[is_t]
        rows.append({"scorer": name, "note": note, **detection_metrics(noise, dropped, tr)})

    sel = lambda s, method: selection.keep_mask(s, target, method, keep_ratio, None, seed).values  # noqa: E731
    add("full (selection=all)", None, selection.keep_mask(None, target, "all").values, "keeps every token")
    add("random (selection=random)", np.random.default_rng(seed).random(len(is_t)),
        selection.keep_mask(None, target, "random", keep_ratio, None, seed).values, "a seeded uniform score")
    add("influence, global (fixed)", -infl.values, sel(infl, "global"), "l_base - l_ref, clean warm-up reference")
    add("rho offline = influence, sample", -infl.values, sel(infl, "sample"),
        "same score, ranked within each sample (reference code's rho)")
    add("forgetting = influence, global", -infl.values, sel(infl, "global"),
        "influence's decision; what it drops is unlearned (weight -lambda(step)), not ignored (scorer=forgetting)")

    neg_h = scorers.get("entropy").score(scorers.Signals(examples=T, base_entropy=base_entropy)).scores
    add("entropy (-H_base), global", -neg_h.values, sel(neg_h, "global"),
        "the base's predictive entropy; no reference (scorer=entropy)")

    if self_evolving_ref:   # the self-evolving round-1 reference: the base trained on a NOISY chunk (all tokens)
        from tokenclean.data import tokenize
        noisy_warm, _ = injection.inject(D["warmup"], tok, data_seed + 1, 0.4, kinds=KINDS[1:5])
        NW = tokenize(noisy_warm, tok, max_length)
        p, _ = trained_on(NW, NW.target, "reference (noisy chunk)")
        ref_n = losses_of(p.model, "noisy-reference losses")
        del p
        infl_n = influence.influence(base, ref_n)
        add("influence, self-evolving round-1 ref", -infl_n.values, sel(infl_n, "global"),
            "l_base - l_theta1, theta1 trained on a noisy chunk (no greedy kind)")

    t0 = time.perf_counter()
    x = cfg.scorer.xtf
    attrs = xtf.attributes(acc, D["base_dir"], cfg.model, x, T.input_ids, target, base, tok, bs, pad, seed)
    timings["xtf attributes"] = time.perf_counter() - t0
    add("xtf (union KN/RI/TR)", (~attrs["keep"].values).astype(float), attrs["keep"].values,
        "XTF's own ratio; AUC of the binary decision")
    add("xtf KN only", -attrs["kn"].values, ~attrs["kn_noise"].values, "1 - p_base; noise if < 0.05")
    add("xtf RI only", -attrs["ri"].values, ~attrs["ri_noise"].values, "attention received; IQR rule per sample")
    add("xtf TR only", -attrs["tr"].values, ~attrs["tr_noise"].values, "embedding relevance; 2nd Multi-Otsu class")
    low = xtf.rules(attrs["kn"], attrs["ri"], attrs["tr"], target, replace(x, tr_noise_classes=[0]))
    add("xtf (union, TR noise = lowest class)", (~low["keep"].values).astype(float), low["keep"].values,
        "scorer.xtf.tr_noise_classes=[0] instead of the paper's second-lowest class")

    for kind, cached in (("rho", ref), ("self_online", base)):
        online = OnlineSelector(excess_loss if kind == "rho" else learned_since_base, cached, target, "global",
                                keep_ratio, None, cfg.scorer.online_scope)
        trained_on(T, target, f"online {kind}", online=online)
        name = "rho online (l_cur - l_ref)" if kind == "rho" else "self_online (l_base - l_cur)"
        add(name, -online.scores, online.keep, "per training batch, score when the token was trained")

    online = OnlineSelector(profit.probability, None, target, scope="step", rule=profit.rule(cfg))
    trained_on(T, target, "online profit", online=online)
    add("profit (p_cur >= tau)", -online.scores, online.keep,
        f"per training batch, its own threshold tau={cfg.scorer.profit.tau}; AUC of -p when the token was trained")

    hook = EKSFTHook(cfg, target, ref_model)
    trained_on(T, target, "online eksft", online=hook)
    e = cfg.scorer.eksft
    add("eksft (top KL to ref or entropy)", hook.kl, hook.keep,
        f"per training step, top {e.top_k_ratio:.0%} by KL(cur || warm-up ref) and by entropy, {e.criterion} removed "
        "(its own share); AUC of the KL when the token was trained")
    del ref_model
    sst = cfg.scorer.sstoken
    online = SsTokenSelector(base, target, keep_ratio, sst.gamma, sst.warmup, tcfg.batch_size)
    trained_on(T, target, "online sstoken", online=online)
    online.finish(acc)
    add("sstoken (g norm(REL) + (1 - g) attention), sample", -online.scores, online.keep,
        f"per sample while training, gamma={sst.gamma}, attention alone for the first {sst.warmup:.0%} of the epoch; "
        "score when the token was trained")

    meta = {"model": model, "source": source, "n_train": n_train, "n_warmup": n_warmup, "data_seed": data_seed,
            "seed": seed, "keep_ratio": keep_ratio, "max_length": max_length, "examples": len(T.input_ids),
            "injected_examples": len({i.record for i in D["injections"]}),
            "tokens": injection.kind_counts(truth, target), "seconds": round(time.perf_counter() - t_all, 1),
            "timings": {k: round(v, 1) for k, v in timings.items()}, "command": command, "commit": commit,
            "batch_size": tcfg.batch_size, "lr": tcfg.lr}
    if out:
        write_detection(rows, meta, out, D)
    return rows


def _fmt(v, pct=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.0f}%" if pct else f"{v:.3f}"


def write_detection(rows: list[dict], meta: dict, out: str, D=None) -> None:
    import csv
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0].keys())
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    kinds = KINDS[1:]
    tk = meta["tokens"]
    lines = [f"# Scorer detection benchmark ({meta['model']})", "",
             *provenance(meta["command"] or "python -m benchmarks.detection", meta.get("commit")),
             f"{meta['examples']} training examples from `{meta['source']}` (data seed {meta['data_seed']}), "
             f"{meta['injected_examples']} with one injection in the last response; {meta['n_warmup']} clean "
             f"warm-up examples for the references; keep ratio {meta['keep_ratio']}, seed {meta['seed']}, "
             f"max_length {meta['max_length']}, batch {meta['batch_size']}, lr {meta['lr']}. Wall time "
             f"{meta['seconds']:.0f} s.", "",
             "Response tokens by kind: " + ", ".join(f"{k} {tk[k]:,}" for k in KINDS) +
             f" (injected share {sum(tk[k] for k in kinds) / max(sum(tk.values()), 1):.1%}).", "",
             "AUC: ROC-AUC of the scorer's noise score (minus its keep score) for injected vs clean tokens (per kind: "
             "that kind vs clean). P / R: precision and recall of the dropped set against all injected tokens; "
             "R per kind: share of that kind dropped; clean drop: share of clean tokens dropped.", "",
             "| scorer | dropped | AUC | " + " | ".join(f"AUC {k}" for k in kinds) + " | P | R | " +
             " | ".join(f"R {k}" for k in kinds) + " | clean drop |",
             "|---" * (4 + 2 * len(kinds) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['scorer']} | {_fmt(r['dropped'], True)} | {_fmt(r['auc'])} | " +
                     " | ".join(_fmt(r[f'auc_{k}']) for k in kinds) + f" | {_fmt(r['precision'])} | "
                     f"{_fmt(r['recall'])} | " + " | ".join(_fmt(r[f'recall_{k}'], True) for k in kinds) +
                     f" | {_fmt(r['clean_dropped'], True)} |")
    lines += ["", "Notes per scorer:", ""] + [f"- **{r['scorer']}**: {r['note']}" for r in rows if r["note"]]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in meta["timings"].items()), ""]
    if D is not None:
        lines += ["Examples of injections (kind: injected text):", ""]
        seen = set()
        for inj in D["injections"]:
            if inj.kind in seen:
                continue
            seen.add(inj.kind)
            c = D["train"][inj.record]["messages"][inj.turn]["content"]
            lines.append(f"- {inj.kind}: `{c[:inj.start]}[[{c[inj.start:inj.end]}]]{c[inj.end:]}`"
                         .replace("\n", " "))
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    (out.parent / (out.name + ".json")).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    _plot_detection(rows, out.with_suffix(".png"), meta)


def _plot_detection(rows, path, meta) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = KINDS[1:]
    rs = [r for r in rows if not math.isnan(r["auc"])]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5))
    w = 0.8 / (len(kinds) + 1)
    x = np.arange(len(rs))
    for j, k in enumerate(("",) + kinds):
        key = "auc" if not k else f"auc_{k}"
        axes[0].bar(x + j * w, [r[key] for r in rs], w, label=k or "all")
        rkey = "recall" if not k else f"recall_{k}"
        axes[1].bar(x + j * w, [r[rkey] for r in rs], w, label=k or "all")
    for ax, title in zip(axes, ("ROC-AUC (noise = injected)", "share of injected tokens dropped (recall)")):
        ax.set_xticks(x + 0.4 - w / 2)
        ax.set_xticklabels([r["scorer"] for r in rs], rotation=35, ha="right", fontsize=7)
        ax.set_title(title)
        ax.axhline(0.5 if "AUC" in title else 1 - meta["keep_ratio"], color="grey", lw=0.8, ls="--")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7, ncol=3)
    fig.suptitle(f"Detection of injected tokens, {meta['model']}, {meta['examples']} examples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    import sys
    ap = argparse.ArgumentParser(prog="python -m benchmarks.detection", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=list(MODELS))
    ap.add_argument("--source", default="builtin:chatterbot")
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-warmup", type=int, default=200)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--keep-ratio", type=float, default=0.6)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default=None, help="results/NAME: writes NAME.md, NAME.csv, NAME.json, NAME.png")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-self-evolving-ref", action="store_true")
    argv = list(argv if argv is not None else sys.argv[1:])
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("httpx", "urllib3", "filelock", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    detect(a.model, a.source, a.n_train, a.n_warmup, 0, a.data_seed, a.seed, a.keep_ratio, a.max_length, a.out,
           not a.no_self_evolving_ref, command("detection", argv))
    if a.out:
        print(Path(a.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
