"""Benchmarks with known truth: inject tokens of known kinds into real responses, then ask every scorer to find them
(`detect`), and compare what fine-tuning on the cleaned data gives (`downstream`).

  python -m benchmarks.benchmark detect --model smollm2 --out results/scorers
  python -m benchmarks.benchmark detect --model tiny --n-train 80 --n-warmup 48 --out results/scorers_tiny
  python -m benchmarks.benchmark downstream --model tiny --seeds 41 42 43 --out results/downstream_tiny

Data: builtin chatterbot (or chitchat) conversations, shuffled with --data-seed and cut into a noisy training set, a
clean warm-up set (what the reference learns from) and a clean held-out set. Into the last assistant turn of a
fraction of the training records one injection is made, of one kind:

  random       4-8 random vocabulary tokens (alphabetic, with a leading space), at a random word boundary
  boilerplate  an off-task sentence (newsletter, copyright, ...) appended to the response
  duplicate    a copy of a span of the response (up to 8 words) inserted right after that span
  memorised    a phrase the base model knows by heart (counting, the weekdays, a pangram), appended
  greedy       the base model's own greedy continuation of the response (special tokens suppressed), appended

Every injection is a character span of the response; tokens are marked with its kind when their character span
(from the tokenizer's offsets, rendered exactly as `data.tokenize` renders it; the ids are checked equal) overlaps
it. Metrics over response tokens, "noise" = injected: ROC-AUC of each scorer's noise score (minus its keep score),
overall and per kind (that kind against clean tokens), and precision / recall of the set the scorer drops at its
configured ratio (recall per kind too), plus the share of clean tokens dropped.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shlex
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tokenclean.ragged import Ragged

log = logging.getLogger("benchmarks.benchmark")

KINDS = ("clean", "random", "boilerplate", "duplicate", "memorised", "greedy")
BOILERPLATE = [
    "Click here to subscribe to our newsletter for exclusive deals.",
    "Copyright 2024 Example Corp. All rights reserved.",
    "Sent from my iPhone.",
    "Terms and conditions apply, see our website for details.",
    "Please like and share this post with your friends!",
    "This email and any attachments are confidential.",
    "Use promo code SAVE20 at checkout for free shipping.",
    "Follow us on Twitter and Instagram for more updates.",
]
MEMORISED = [
    "one, two, three, four, five, six, seven, eight, nine, ten",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday",
    "January, February, March, April, May, June, July, August",
    "The quick brown fox jumps over the lazy dog.",
    "a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p",
    "To be, or not to be, that is the question.",
    "Twinkle, twinkle, little star, how I wonder what you are.",
]
# --model NAME -> the conf/model preset it uses; tiny-chitchat is the tiny model pretrained on chitchat first (a base
# that knows some English, so that "what the base already knows" means something; built once, cached)
MODELS = {"smollm2": "smollm2", "tiny": "tiny", "tiny-chitchat": "tiny"}


@dataclass
class Injection:
    record: int        # index into the records
    turn: int          # message index of the assistant turn
    start: int         # character span inside that turn's content
    end: int
    kind: str


# ----------------------------------------------------------------------------------------------------------------
# data with known truth


def split_records(source: str, n_train: int, n_warmup: int, n_eval: int, seed: int):
    """Three disjoint sets of records (shuffled with seed): train, warm-up, eval."""
    from tokenclean.data import read_records
    records, _ = read_records(source)
    # chatterbot repeats some answers 100+ times (2,025 records, 875 distinct last responses): keep one record per
    # distinct last response, so the clean warm-up / eval sets do not contain the training responses verbatim
    seen, unique = set(), []
    for r in records:
        last = r["messages"][-1]["content"].strip()
        if len(last) >= 2 and last not in seen:
            seen.add(last)
            unique.append(r)
    records = unique
    order = np.random.default_rng(seed).permutation(len(records))
    need = n_train + n_warmup + n_eval
    if need > len(records):
        raise ValueError(f"{source} has {len(records)} usable records, {need} asked for")
    pick = [records[int(i)] for i in order[:need]]
    return pick[:n_train], pick[n_train:n_train + n_warmup], pick[n_train + n_warmup:]


def _word_boundaries(text: str) -> list[int]:
    """Positions right after a word (before a space, or the end): inserting ' X' there keeps the tokens apart."""
    return [m.start() for m in re.finditer(r"(?<=\S) ", text)] + [len(text)]


def _vocab_words(tokenizer) -> list[str]:
    words = []
    for i in range(len(tokenizer)):
        s = tokenizer.decode([i])
        if re.fullmatch(r" [A-Za-z]{3,12}", s):
            words.append(s)
    return words


def inject(records: list[dict], tokenizer, seed: int, p_clean: float = 0.4, kinds=KINDS[1:],
           continue_fn=None) -> tuple[list[dict], list[Injection]]:
    """Copies of `records` with one injection into the last assistant turn of a (1 - p_clean) share of them.
    continue_fn(records, indices) -> {index: text} gives the greedy continuations (kind 'greedy')."""
    rng = np.random.default_rng(seed)
    words = _vocab_words(tokenizer)
    out = [{"messages": [dict(m) for m in r["messages"]]} for r in records]
    plan = []
    for i in range(len(out)):
        if rng.random() < p_clean:
            continue
        plan.append((i, kinds[int(rng.integers(len(kinds)))]))
    greedy = continue_fn(out, [i for i, k in plan if k == "greedy"]) if continue_fn and "greedy" in kinds else {}
    injections = []
    for i, kind in plan:
        turn = len(out[i]["messages"]) - 1
        msg = out[i]["messages"][turn]
        c = msg["content"].rstrip()
        if kind == "random":
            text = "".join(words[int(j)] for j in rng.integers(len(words), size=int(rng.integers(4, 9))))
            bounds = _word_boundaries(c)
            pos = bounds[int(rng.integers(len(bounds)))]
        elif kind == "boilerplate":
            text, pos = " " + BOILERPLATE[int(rng.integers(len(BOILERPLATE)))], len(c)
        elif kind == "memorised":
            text, pos = " " + MEMORISED[int(rng.integers(len(MEMORISED)))], len(c)
        elif kind == "duplicate":
            spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", c)]
            n = min(len(spans), int(rng.integers(3, 9)))
            s0 = int(rng.integers(0, len(spans) - n + 1))
            a, pos = spans[s0][0], spans[s0 + n - 1][1]
            text = " " + c[a:pos]
        elif kind == "greedy":
            text, pos = greedy.get(i, ""), len(c)
            if not text.strip():
                continue
        else:
            raise ValueError(kind)
        msg["content"] = c[:pos] + text + c[pos:]
        injections.append(Injection(i, turn, pos, pos + len(text), kind))
    return out, injections


def greedy_continuations(lm, tokenizer, max_new_tokens: int = 10):
    """A continue_fn for `inject`: the base model's greedy continuation of each response (no special token)."""
    import torch

    from tokenclean.data import render_chat, resolve_template

    def run(records, indices):
        out = {}
        if not indices:
            return out
        texts, spans = render_chat([records[i] for i in indices], tokenizer, resolve_template(tokenizer, "auto"))
        bad = [[t] for t in tokenizer.all_special_ids]
        lm.eval()
        for k, i in enumerate(indices):
            content = records[i]["messages"][-1]["content"].rstrip()
            c0 = spans[k][-1][0]
            prefix = texts[k][:c0 + len(content)]
            ids = torch.tensor([tokenizer(prefix, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                gen = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, bad_words_ids=bad, pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
            text = text.split("\n")[0].rstrip()
            out[i] = text if text[:1] == " " else " " + text.lstrip()
        return out
    return run


def token_truth(records: list[dict], injections: list[Injection], tokenizer, tokenized) -> Ragged:
    """Kind code per token (0 = clean, KINDS.index(kind) for injected tokens), aligned with tokenized.input_ids.
    The conversations are rendered as data.tokenize renders them; the token ids are checked to be the same."""
    from tokenclean.data import bos_to_add, render_chat, resolve_template
    template = resolve_template(tokenizer, "auto")
    texts, spans = render_chat(records, tokenizer, template)
    by_record = {}
    for inj in injections:
        by_record.setdefault(inj.record, []).append(inj)
    bos = bos_to_add(tokenizer)
    rows = []
    for e, r in enumerate(np.asarray(tokenized.record_indices)):
        r = int(r)
        enc = tokenizer(texts[r], add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        if bos is not None and (not ids or ids[0] != bos):
            ids, offs = [bos] + ids, [(0, 0)] + offs
        n = len(tokenized.input_ids[e])
        if not np.array_equal(np.asarray(ids[:n]), np.asarray(tokenized.input_ids[e])):
            raise AssertionError(f"record {r}: token ids differ from data.tokenize's")
        code = np.zeros(n, np.int8)
        # the assistant turns in order; the injected turn is the one at inj.turn
        turns = [k for k, m in enumerate(records[r]["messages"]) if m["role"] == "assistant" and m.get("train", True)]
        for inj in by_record.get(r, []):
            c0 = spans[r][turns.index(inj.turn)][0]
            assert texts[r].startswith(records[r]["messages"][inj.turn]["content"], c0)
            a, b = c0 + inj.start, c0 + inj.end
            for j in range(n):
                s, t = offs[j]
                if t > a and s < b:
                    code[j] = KINDS.index(inj.kind)
        rows.append(code)
    return Ragged.from_list(rows, np.int8)


# ----------------------------------------------------------------------------------------------------------------
# metrics


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


# ----------------------------------------------------------------------------------------------------------------
# the detection benchmark


def tiny_chitchat(steps: int = 600) -> str:
    """The tiny model after `steps` optimiser steps of language modelling on chitchat (every token of the
    conversations, 16 x 256 tokens per step), built once into the tokenclean cache."""
    from tokenclean.assets import cached, resolve_model

    def build(out: Path) -> None:
        import torch
        from accelerate import Accelerator

        from tokenclean.config import ModelConfig, TrainingConfig
        from tokenclean.data import read_records, tokenize
        from tokenclean.models import load_model, load_tokenizer
        from tokenclean.train import train
        src = resolve_model("builtin:tiny")
        tok = load_tokenizer(src)
        records, _ = read_records("builtin:chitchat")
        t = tokenize(records, tok, 256)
        every = t.input_ids.like(np.ones(len(t.input_ids.values), bool))
        every.values[t.input_ids.offsets[:-1]] = False
        lm = load_model(src, ModelConfig(name_or_path=src), 0)
        cfg = TrainingConfig(lr=3e-3, batch_size=16, micro_batch_size=16, max_steps=steps, mixed_precision="no",
                             warmup_ratio=0.05, schedule="cosine")
        torch.manual_seed(0)
        train(Accelerator(cpu=True), lm, t.input_ids, every, cfg, seed=0, pad_id=tok.pad_token_id, desc="pretrain")
        lm.save_pretrained(out)
        tok.save_pretrained(out)
    return cached(f"tiny-chitchat-{steps}-v1", build)


def _compose(model: str, overrides=()):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import tokenclean.__main__  # noqa: F401  registers the model_tag resolver
    from tokenclean.__main__ import conf_dir
    from tokenclean.config import validate
    extra = [f"model.name_or_path={tiny_chitchat()}"] if model == "tiny-chitchat" else []
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={MODELS[model]}", "tracking=none", *extra, *overrides])
    typed = OmegaConf.to_object(cfg)
    validate(typed)
    return typed, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def build_data(model: str, source: str, n_train: int, n_warmup: int, n_eval: int, data_seed: int, max_length: int,
               p_clean: float = 0.4, greedy_tokens: int = 10):
    """The benchmark's data for `model`: dict with records (train noisy, train clean, warm-up, eval), injections,
    tokenized splits and the per-token truth of the noisy training set."""
    from tokenclean.assets import resolve_model
    from tokenclean.data import tokenize
    from tokenclean.models import load_model, load_tokenizer
    cfg, _ = _compose(model)
    base_dir = resolve_model(cfg.model.name_or_path)
    tok = load_tokenizer(base_dir)
    train, warm, ev = split_records(source, n_train, n_warmup, n_eval, data_seed)
    lm = load_model(base_dir, cfg.model, data_seed, lora=False)
    noisy, injections = inject(train, tok, data_seed, p_clean, continue_fn=greedy_continuations(lm, tok, greedy_tokens))
    del lm
    T = tokenize(noisy, tok, max_length)
    truth = token_truth(noisy, injections, tok, T)
    return {"cfg": cfg, "base_dir": base_dir, "tokenizer": tok, "train_clean": train, "train": noisy,
            "warmup": warm, "eval": ev, "injections": injections, "T": T, "truth": truth,
            "W": tokenize(warm, tok, max_length)}


def _kind_counts(truth: Ragged, target: Ragged) -> dict:
    t = np.asarray(truth.values)[np.asarray(target.values, bool)]
    return {k: int((t == i).sum()) for i, k in enumerate(KINDS)}


def detect(model: str = "tiny", source: str = "builtin:chatterbot", n_train: int = 300, n_warmup: int = 200,
           n_eval: int = 0, data_seed: int = 0, seed: int = 42, keep_ratio: float = 0.6, max_length: int = 256,
           out: str | None = None, self_evolving_ref: bool = True, command: str = "") -> list[dict]:
    """Score the noisy training set with every scorer; return one metrics row per scorer (and write out.md/csv/png
    when out is given)."""
    from tokenclean import selection
    from tokenclean.dist import make_accelerator
    from tokenclean.losses import TokenLoss, token_losses
    from tokenclean.models import load_model
    from tokenclean.scorers import influence, xtf
    from tokenclean.scorers.online import OnlineSelector
    from tokenclean.scorers.rho import excess_loss
    from tokenclean.scorers.self_online import learned_since_base
    from tokenclean.train import fit, prepare

    t_all = time.perf_counter()
    D = build_data(model, source, n_train, n_warmup, n_eval, data_seed, max_length)
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
    base = losses_of(base_model, "base losses")
    del base_model
    p, _ = trained_on(W, W.target, "reference (clean warm-up)")
    ref = losses_of(p.model, "reference losses")
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

    if self_evolving_ref:   # the self-evolving round-1 reference: the base trained on a NOISY chunk (all tokens)
        from tokenclean.data import tokenize
        noisy_warm, _ = inject(D["warmup"], tok, data_seed + 1, 0.4, kinds=KINDS[1:5])
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

    meta = {"model": model, "source": source, "n_train": n_train, "n_warmup": n_warmup, "data_seed": data_seed,
            "seed": seed, "keep_ratio": keep_ratio, "max_length": max_length, "examples": len(T.input_ids),
            "injected_examples": len({i.record for i in D["injections"]}),
            "tokens": _kind_counts(truth, target), "seconds": round(time.perf_counter() - t_all, 1),
            "timings": {k: round(v, 1) for k, v in timings.items()}, "command": command,
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
    lines = [f"# Scorer detection benchmark ({meta['model']})", "", "Made by:", "", "```",
             meta["command"] or "python -m benchmarks.benchmark detect", "```", "",
             f"{meta['examples']} training examples from `{meta['source']}` (data seed {meta['data_seed']}), "
             f"{meta['injected_examples']} with one injection in the last response; {meta['n_warmup']} clean "
             f"warm-up examples for the references; keep ratio {meta['keep_ratio']}, seed {meta['seed']}, "
             f"max_length {meta['max_length']}, batch {meta['batch_size']}, lr {meta['lr']}. Wall time "
             f"{meta['seconds']:.0f} s on this machine.", "",
             "Response tokens by kind: " + ", ".join(f"{k} {tk[k]:,}" for k in KINDS) +
             f" (injected share {sum(tk[k] for k in kinds) / max(sum(tk.values()), 1):.1%}).", "",
             "AUC: ROC-AUC of the scorer's noise score (minus its keep score) for injected vs clean tokens (per kind: "
             "that kind vs clean). P / R: precision and recall of the dropped set against all injected tokens; "
             "R per kind: share of that kind dropped; clean drop: share of clean tokens dropped.", "",
             "| scorer | dropped | AUC | " + " | ".join(f"AUC {k}" for k in kinds) + " | P | R | " +
             " | ".join(f"R {k}" for k in kinds) + " | clean drop |",
             "|---" * (5 + 2 * len(kinds) + 2) + "|"]
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


# ----------------------------------------------------------------------------------------------------------------
# downstream: fine-tune on the noisy set with each method, held-out loss on clean responses

METHODS = {
    "full": ["selection=all"],
    "random": ["selection=random"],
    "fixed (influence)": ["scorer=influence", "selection=global"],
    "rho offline (influence, sample)": ["scorer=influence", "selection=sample"],
    "self-evolving (influence)": ["pipeline=self_evolving", "scorer=influence", "selection=global"],
    "xtf": ["scorer=xtf"],
    "random @ xtf ratio": ["selection=random"],
    "rho (online)": ["scorer=rho", "selection=global"],
    "self_online (fixed)": ["scorer=self_online", "selection=global"],
    "self_online (self-evolving)": ["pipeline=self_evolving", "scorer=self_online", "selection=global"],
}


def write_jsonl(records, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def downstream(model: str = "tiny", source: str = "builtin:chatterbot", n_train: int = 300, n_warmup: int = 100,
               n_eval: int = 100, data_seed: int = 0, seeds=(41, 42, 43), keep_ratio: float = 0.6,
               max_length: int = 128, methods=None, extra=(), work: str = "runs/benchmark", out: str | None = None,
               command: str = "", keep_runs: bool = False, append: bool = False) -> list[dict]:
    """Train with every method on the same noisy data and seed list; held-out loss on clean eval responses.
    append: add to the rows already in out.json (same data settings), replacing (method, seed) pairs run again."""
    from tokenclean import pipelines
    t_all = time.perf_counter()
    D = build_data(model, source, n_train, n_warmup, n_eval, data_seed, max_length)
    work = Path(work) / f"{model}-{source.split(':')[-1]}-{n_train}-{data_seed}"
    files = {"train": work / "train_noisy.jsonl", "warmup": work / "warmup_clean.jsonl",
             "eval": work / "eval_clean.jsonl"}
    write_jsonl(D["train"], files["train"])
    write_jsonl(D["warmup"], files["warmup"])
    write_jsonl(D["eval"], files["eval"])
    base = ["data=file", f"data.train={files['train']}", f"data.warmup={files['warmup']}",
            f"data.eval={files['eval']}", f"data.max_length={max_length}", f"selection.keep_ratio={keep_ratio}",
            "pipeline.chunks=3", *extra]
    rows, commands = [], [command]
    prior = Path(out).with_suffix(".json") if out else None
    if append and prior is not None and prior.exists():
        old = json.loads(prior.read_text())
        if old["meta"]["n_train"] != len(D["T"].input_ids) or old["meta"]["model"] != model:
            raise ValueError(f"--append: {prior} was made with other data settings")
        rows, commands = old["rows"], old["meta"]["commands"] + [command]
    names = list(methods or METHODS)
    for seed in seeds:
        xtf_ratio = next((r["kept_ratio"] for r in rows if r["method"] == "xtf" and r["seed"] == seed), None)
        for name in names:
            ov = list(METHODS[name])
            if name == "random @ xtf ratio":
                if xtf_ratio is None:
                    continue
                ov = ["selection=random", f"selection.keep_ratio={xtf_ratio:.6f}"]
            tag = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
            cfg, cdict = _compose(model, base + ov + [f"seed={seed}", f"name=bench-{tag}-{seed}", "resume=false"])
            run_dir = work / "runs" / f"{tag}-s{seed}"
            t0 = time.perf_counter()
            summary = pipelines.run(cfg, run_dir, cdict)[1].to_json()
            row = {"method": name, "seed": seed, "eval_loss": summary["eval_loss_after"],
                   "eval_loss_base": summary["eval_loss_before"], "kept_ratio": summary["kept_ratio"],
                   "seconds": round(time.perf_counter() - t0, 1)}
            if name == "xtf":
                xtf_ratio = summary["kept_ratio"]
            rows = [r for r in rows if (r["method"], r["seed"]) != (name, seed)] + [row]
            log.info("downstream %s seed %d: eval loss %.4f (kept %.3f, %.0fs)", name, seed, row["eval_loss"],
                     row["kept_ratio"], row["seconds"])
            if not keep_runs:   # the checkpoints are large; the summaries stay
                for d in [*run_dir.glob("final"), *run_dir.glob("reference"), *run_dir.glob("round_*/model")]:
                    if d.is_symlink():
                        d.unlink()
                    else:
                        shutil.rmtree(d, ignore_errors=True)
            if out:
                write_downstream(rows, out, {"model": model, "source": source, "n_train": len(D["T"].input_ids),
                                             "n_warmup": n_warmup, "n_eval": n_eval, "seeds": list(seeds),
                                             "keep_ratio": keep_ratio, "max_length": max_length,
                                             "tokens": _kind_counts(D["truth"], D["T"].target),
                                             "seconds": round(time.perf_counter() - t_all, 1), "commands": commands,
                                             "extra": list(extra), "cfg_training": {
                                                 "lr": cfg.training.lr, "batch_size": cfg.training.batch_size,
                                                 "epochs": cfg.training.epochs,
                                                 "lora": cfg.model.lora.enabled}})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == name]
        v = np.array([r["eval_loss"] for r in rs], np.float64)
        k = np.array([r["kept_ratio"] for r in rs], np.float64)
        out.append({"method": name, "n": len(rs), "eval_loss_mean": float(v.mean()),
                    "eval_loss_std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                    "kept_ratio_mean": float(k.mean()), "seconds_mean": float(np.mean([r["seconds"] for r in rs])),
                    "eval_loss_base": rs[0]["eval_loss_base"]})
    return out


def write_downstream(rows: list[dict], out: str, meta: dict) -> None:
    import csv
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    order = list(METHODS)
    rows = sorted(rows, key=lambda r: (order.index(r["method"]) if r["method"] in order else 99, r["seed"]))
    S = summarise(rows)
    full = next((s for s in S if s["method"] == "full"), None)
    tk = meta["tokens"]
    lines = [f"# Downstream comparison ({meta['model']})", "", "Made by:", "", "```",
             *meta["commands"], "```", "",
             f"Every method fine-tunes the base on the same noisy training set ({meta['n_train']} `{meta['source']}` "
             f"examples, injected tokens of the detection benchmark: "
             + ", ".join(f"{k} {tk[k]:,}" for k in KINDS) + " response tokens); references (fixed, rho) learn from "
             f"{meta['n_warmup']} clean warm-up examples; the held-out loss is the mean token loss on the responses "
             f"of {meta['n_eval']} clean held-out examples. Keep ratio {meta['keep_ratio']} (XTF: its own ratio, "
             "with a random baseline at that same ratio as its matched control); self-evolving uses 3 chunks. "
             f"Seeds {meta['seeds']} (training order, random selection, chunking); mean ± sample std over seeds. "
             f"Training: {meta['cfg_training']}; extra overrides {meta['extra']}. Wall time of the last command "
             f"{meta['seconds']:.0f} s.",
             "", f"Held-out loss of the base before fine-tuning: {_fmt(S[0]['eval_loss_base'])}.", "",
             "| method | kept ratio | held-out loss (mean ± std) | vs full | runs | s/run |",
             "|---|---|---|---|---|---|"]
    for s in S:
        d = "" if full is None else f"{s['eval_loss_mean'] - full['eval_loss_mean']:+.4f}"
        lines.append(f"| {s['method']} | {s['kept_ratio_mean']:.3f} | {s['eval_loss_mean']:.4f} ± "
                     f"{_fmt(s['eval_loss_std'])[:6] if not math.isnan(s['eval_loss_std']) else 'n/a'} | {d} | "
                     f"{s['n']} | {s['seconds_mean']:.0f} |")
    lines += ["", "Per seed:", "", "| method | seed | held-out loss | kept ratio |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['seed']} | {r['eval_loss']:.4f} | {r['kept_ratio']:.3f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot_downstream(S, out.with_suffix(".png"), meta)


def _plot_downstream(S, path, meta) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = np.arange(len(S))
    ax.bar(x, [s["eval_loss_mean"] for s in S], yerr=[0 if math.isnan(s["eval_loss_std"]) else s["eval_loss_std"]
                                                       for s in S], capsize=4, color="tab:blue")
    lo = min(s["eval_loss_mean"] for s in S)
    hi = max(s["eval_loss_mean"] for s in S)
    ax.set_ylim(lo - (hi - lo) * 1.5 - 1e-3, hi + (hi - lo) * 0.8 + 1e-3)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{s['method']}\n(kept {s['kept_ratio_mean']:.2f})" for s in S], rotation=30, ha="right",
                       fontsize=7)
    ax.set_ylabel("held-out loss on clean responses")
    ax.set_title(f"Downstream, {meta['model']}, seeds {meta['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    import sys
    ap = argparse.ArgumentParser(prog="python -m benchmarks.benchmark", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("detect", "downstream"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="tiny", choices=list(MODELS))
        p.add_argument("--source", default="builtin:chatterbot")
        p.add_argument("--n-train", type=int, default=300)
        p.add_argument("--n-warmup", type=int, default=200 if name == "detect" else 100)
        p.add_argument("--data-seed", type=int, default=0)
        p.add_argument("--keep-ratio", type=float, default=0.6)
        p.add_argument("--max-length", type=int, default=256 if name == "detect" else 128)
        p.add_argument("--out", default=None, help="results/NAME: writes NAME.md, NAME.csv, NAME.png")
        if name == "detect":
            p.add_argument("--seed", type=int, default=42)
            p.add_argument("--no-self-evolving-ref", action="store_true")
        else:
            p.add_argument("--n-eval", type=int, default=100)
            p.add_argument("--seeds", type=int, nargs="+", default=[41, 42, 43])
            p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), metavar="METHOD")
            p.add_argument("--work", default="runs/benchmark")
            p.add_argument("--keep-runs", action="store_true")
            p.add_argument("--append", action="store_true", help="add to the rows of an earlier --out run")
            p.add_argument("overrides", nargs="*", help="extra tokenclean overrides, e.g. training.max_steps=20")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("httpx", "urllib3", "filelock", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    command = "python -m benchmarks.benchmark " + shlex.join(argv if argv is not None else sys.argv[1:])
    if a.cmd == "detect":
        detect(a.model, a.source, a.n_train, a.n_warmup, 0, a.data_seed, a.seed, a.keep_ratio, a.max_length, a.out,
               not a.no_self_evolving_ref, command)
    else:
        downstream(a.model, a.source, a.n_train, a.n_warmup, a.n_eval, a.data_seed, a.seeds, a.keep_ratio,
                   a.max_length, a.methods, a.overrides, a.work, a.out, command, a.keep_runs, a.append)
    if a.out:
        print(Path(a.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
