"""Data with known truth: tokens of known kinds injected into real responses, and which tokens they became.

Data: builtin chatterbot (or chitchat) conversations, shuffled with a data seed and cut into a noisy training set, a
clean warm-up set (what a reference learns from) and a clean held-out set. Into the last assistant turn of a
fraction of the training records one injection is made, of one kind:

  random       4-8 random vocabulary tokens (alphabetic, with a leading space), at a random word boundary
  boilerplate  an off-task sentence (newsletter, copyright, ...) appended to the response
  duplicate    a copy of a span of the response (up to 8 words) inserted right after that span
  memorised    a phrase the base model knows by heart (counting, the weekdays, a pangram), appended
  greedy       the base model's own greedy continuation of the response (special tokens suppressed), appended

Every injection is a character span of the response; tokens are marked with its kind when their character span
(from the tokenizer's offsets, rendered exactly as `data.tokenize` renders it; the ids are checked equal) overlaps
it. benchmarks/detection.py asks every scorer to find them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from benchmarks.common import compose
from tokenclean.ragged import Ragged

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


@dataclass
class Injection:
    record: int        # index into the records
    turn: int          # message index of the assistant turn
    start: int         # character span inside that turn's content
    end: int
    kind: str


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



def build_data(model: str, source: str, n_train: int, n_warmup: int, n_eval: int, data_seed: int, max_length: int,
               p_clean: float = 0.4, greedy_tokens: int = 10):
    """The benchmark's data for `model`: dict with records (train noisy, train clean, warm-up, eval), injections,
    tokenized splits and the per-token truth of the noisy training set."""
    from tokenclean.assets import resolve_model
    from tokenclean.data import tokenize
    from tokenclean.models import load_model, load_tokenizer
    cfg, _ = compose(model)
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


def kind_counts(truth: Ragged, target: Ragged) -> dict:
    t = np.asarray(truth.values)[np.asarray(target.values, bool)]
    return {k: int((t == i).sum()) for i, k in enumerate(KINDS)}
