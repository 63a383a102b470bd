"""Tokenizing rendered conversations into `Examples`: token ids and the response (target) mask.

`tokenize` renders each conversation once (`tokenclean.data.templates`), knows the character span of every
assistant turn, tokenizes with the fast tokenizer's offsets and marks the tokens that overlap a span. It works
through the records a chunk at a time straight into flat int32/bool arrays, so memory grows with the token arrays,
not with rendered texts or tokenizer outputs. Also here: `tokenizer_fingerprint` (a tokenizer's stable identity)
and `split_indices` (seeded splits of the examples).
"""
from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field

import numpy as np

from tokenclean.data import records as reading  # reading.CHUNK at call time: one chunk size, set in one place
from tokenclean.data.errors import DataError, TemplateError
from tokenclean.data.records import Conversations, progress
from tokenclean.data.templates import bos_to_add, render_chat_chunk, render_plain_spans, resolve_template, warn_no_eot
from tokenclean.io import fingerprint
from tokenclean.ragged import Ragged

log = logging.getLogger(__name__)

TOKENIZER_CHARS = 1 << 20  # characters per tokenizer call: bounds its Python output, however long the texts


@dataclass
class Examples:
    """Tokenized examples: token ids and the response (target) mask, as Ragged arrays, and how they were made."""
    input_ids: Ragged         # int32 token ids per example
    target: Ragged            # bool, True where token j is a response token to predict (never j=0)
    record_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # example i <- records[k]
    n_truncated: int = 0      # examples cut at max_length
    n_truncated_targets: int = 0  # target tokens lost by truncation
    n_dropped: int = 0        # examples with no target token left after truncation (dropped)

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, idx) -> "Examples":
        idx = np.asarray(idx, np.int64)
        rec = self.record_indices[idx] if len(self.record_indices) else self.record_indices
        return Examples(_take(self.input_ids, idx), _take(self.target, idx), rec)

    @property
    def n_targets(self) -> int:
        return int(np.count_nonzero(self.target.values))

    def fingerprint(self) -> str:
        return fingerprint(self.input_ids, self.target)


def _take(r: Ragged, idx: np.ndarray) -> Ragged:
    """``r.select(idx)`` without a Python object per example (a million of them cost seconds and ~100 MB): a mask
    over the tokens (one byte each) when idx is increasing, as split_indices gives, else a gather index."""
    lengths = r.offsets[idx + 1] - r.offsets[idx]
    offsets = np.zeros(len(idx) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.asarray(r.values)
    if len(idx) and (np.diff(idx) > 0).all():
        keep = np.zeros(len(r), bool)
        keep[idx] = True
        return Ragged(values[np.repeat(keep, r.lengths)], offsets)
    return Ragged(values[np.repeat(r.offsets[idx] - offsets[:-1], lengths) + np.arange(offsets[-1])], offsets)


def tokenize(records: list[dict] | Conversations, tokenizer, max_length: int, template: str = "auto") -> Examples:
    """Tokenize normalised records (a list, or `Conversations`) into input ids and target masks.

    template: "auto" uses the tokenizer's chat template when it has one, else the plain template; "plain" forces
    the plain template; "chat" requires the chat template; a string containing Jinja tags is used as the template.

    Plain template (see `render_plain`)::

        ### System:\\n{system}\\n\\n### User:\\n{user}\\n\\n### Assistant:\\n{assistant}{eos}\\n\\n ...

    Targets are every trainable assistant turn's content plus the end-of-turn token(s) right after it (the eos for
    the plain template; for a chat template, up to the last special token the template emits before the next turn,
    e.g. ``<|im_end|>`` but not the newline after it). Method: render the conversation once, find each assistant
    turn's character span by rendering ``messages[:k]`` with the generation prompt and ``messages[:k+1]`` (both must
    be prefixes of the full rendering, else TemplateError), tokenize with offsets (fast tokenizer) and mark every
    token that overlaps a span. A bos is prepended when the tokenizer adds one by default and the rendering does not
    already start with it. Examples are cut from the right at max_length (counted and logged); examples with no
    target token left are dropped (counted). Position 0 is never a target.
    Records go through CHUNK (tokenclean.data.records) at a time, each chunk straight into compact arrays (int32
    ids, bool mask): the rendered texts and tokenizer output of only one chunk are ever held, so memory grows with
    the token arrays alone.
    Known limit: special-token text inside message content is parsed as that special token, as in TRL.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, not {max_length}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; tokenize needs offset mappings "
                        "(load it with use_fast=True)")
    chat_template = resolve_template(tokenizer, template)
    n = len(records)
    log.info("tokenize: %d records, %s template, max_length=%d", n, "plain" if chat_template is None else "chat",
             max_length)
    eos = getattr(tokenizer, "eos_token", None)
    if chat_template is None and not eos:
        raise TemplateError(f"the plain template needs an eos token to end each response, and "
                            f"{type(tokenizer).__name__} has none; set tokenizer.eos_token or use a chat template")
    bos = bos_to_add(tokenizer)

    parts, no_eot, size = [], 0, reading.CHUNK
    with progress(total=n, desc="tokenizing", unit=" records") as bar:
        for lo in range(0, n, size):
            chunk = records[lo:lo + size]
            if chat_template is None:
                rendered = [render_plain_spans(r["messages"], eos) for r in chunk]
                texts, spans = [t for t, _ in rendered], [s for _, s in rendered]
            else:
                texts, spans, k = render_chat_chunk(chunk, tokenizer, chat_template, first=lo)
                no_eot += k
            parts.append(_encode(texts, spans, tokenizer, bos, max_length, first=lo))
            bar.update(len(chunk))
    warn_no_eot(no_eot)

    if not parts:
        return Examples(Ragged(np.zeros(0, np.int32), np.zeros(1, np.int64)),
                        Ragged(np.zeros(0, bool), np.zeros(1, np.int64)))
    n_truncated = sum(p.n_truncated for p in parts)
    n_truncated_targets = sum(p.n_truncated_targets for p in parts)
    n_dropped = sum(p.n_dropped for p in parts)
    if n_truncated or n_dropped:
        log.warning("tokenize: %d of %d examples were longer than max_length=%d and cut from the right (%d target "
                    "tokens lost); %d examples had no target token left and were dropped",
                    n_truncated, n, max_length, n_truncated_targets, n_dropped)
    if n_dropped == n:
        raise DataError(f"no example has a response token within the first {max_length} tokens: every one was cut "
                        "off; increase data.max_length")
    return Examples(Ragged.concat([p.input_ids for p in parts]), Ragged.concat([p.target for p in parts]),
                    np.concatenate([p.record_indices for p in parts]), n_truncated, n_truncated_targets, n_dropped)


def _encode(texts: list[str], spans: list[list[tuple[int, int]]], tokenizer, bos: int | None, max_length: int,
            first: int) -> Examples:
    """Tokenize rendered texts, mark the tokens that overlap a target span, add bos, cut at max_length and drop the
    examples left without a target. record_indices count from `first`."""
    n = len(texts)
    # The tokenizer answers in Python lists (~170 bytes per token with its offsets): call it on at most
    # TOKENIZER_CHARS characters at a time and flatten each answer into numpy at once (no array per text).
    lengths, ids, offs = np.zeros(n, np.int64), [np.zeros(0, np.int64)], [np.zeros((0, 2), np.int64)]
    lo = 0
    while lo < n:
        hi, chars = lo + 1, len(texts[lo])
        while hi < n and chars + len(texts[hi]) <= TOKENIZER_CHARS:
            chars += len(texts[hi])
            hi += 1
        enc = tokenizer(texts[lo:hi], add_special_tokens=False, return_offsets_mapping=True,
                        return_attention_mask=False, return_token_type_ids=False)
        lengths[lo:hi] = [len(x) for x in enc["input_ids"]]
        total = int(lengths[lo:hi].sum())
        ids.append(np.fromiter(itertools.chain.from_iterable(enc["input_ids"]), np.int64, count=total))
        flat = itertools.chain.from_iterable(itertools.chain.from_iterable(enc["offset_mapping"]))
        offs.append(np.fromiter(flat, np.int64, count=2 * total).reshape(-1, 2))
        lo = hi
    ids, offs = np.concatenate(ids), np.concatenate(offs)
    # token char offsets shifted per text, so all texts share one axis
    base = np.zeros(n + 1, np.int64)
    np.cumsum([len(t) + 1 for t in texts], out=base[1:])
    shift = np.repeat(base[:-1], lengths)
    tok_a, tok_b = offs[:, 0] + shift, offs[:, 1] + shift

    # A token is a target when it overlaps a target span: the last span starting before the token's end ends
    # after the token's start (spans are sorted and disjoint on the shared axis).
    starts = base[:-1].tolist()
    span_s = np.array([s + starts[i] for i, sp in enumerate(spans) for s, _ in sp], np.int64)
    span_e = np.array([e + starts[i] for i, sp in enumerate(spans) for _, e in sp], np.int64)
    k = np.searchsorted(span_s, tok_b, side="left") - 1
    target = (k >= 0) & (span_e[np.maximum(k, 0)] > tok_a) if len(span_s) else np.zeros(len(ids), bool)

    # bos in front when the tokenizer adds it by default and the rendering does not start with it
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if bos is not None and n:
        starts = offsets[:-1]
        need = lengths == 0
        need[lengths > 0] = ids[starts[lengths > 0]] != bos
        where = starts[need]
        ids = np.insert(ids, where, bos)
        target = np.insert(target, where, False)
        lengths = lengths + need
        np.cumsum(lengths, out=offsets[1:])
    if n:
        target[offsets[:-1][lengths > 0]] = False  # position 0 is never predicted

    # Truncate from the right.
    pos = np.arange(len(ids), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    keep = pos < max_length
    n_truncated = int((lengths > max_length).sum())
    n_truncated_targets = int(target[~keep].sum())
    ids, target = ids[keep], target[keep]
    lengths = np.minimum(lengths, max_length)

    # Drop examples without targets.
    n_targets = np.bincount(np.repeat(np.arange(n), lengths), weights=target.astype(np.float64), minlength=n)
    keep_ex = n_targets > 0
    flat_keep = np.repeat(keep_ex, lengths)
    ids, target, lengths = ids[flat_keep], target[flat_keep], lengths[keep_ex]
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Examples(Ragged(ids.astype(np.int32), offsets), Ragged(target.astype(bool), offsets.copy()),
                    first + np.nonzero(keep_ex)[0].astype(np.int64), n_truncated, n_truncated_targets,
                    int((~keep_ex).sum()))


def tokenizer_fingerprint(tokenizer) -> str:
    """Stable identity of a tokenizer: class, vocab size, special tokens, chat template, and a hash of the full
    tokenizer definition (vocab, merges, normalizer, post-processor) or, without a fast backend, of the vocab."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = None
    if backend is not None:
        try:
            body = backend.to_str()
        except Exception:  # noqa: BLE001
            body = None
    if body is None:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    return fingerprint(
        type(tokenizer).__name__,
        len(tokenizer),
        json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str),
        json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True, default=str),
        body,
    )


def split_indices(n: int, fraction: float | int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of range(n) into (taken, rest), both sorted int64 arrays. fraction in (0, 1) takes
    round(n * fraction) indices; an integer (or integral float) >= 1 takes that many (at most n)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)):
        raise ValueError(f"fraction must be a number, not {fraction!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    if 0 < fraction < 1:
        k = int(round(n * float(fraction)))
    elif fraction >= 1 and float(fraction).is_integer():
        k = int(fraction)
        if k > n:
            raise ValueError(f"cannot take {k} of {n} examples")
    else:
        raise ValueError(f"fraction must be in (0, 1) or an integer count >= 1, not {fraction!r}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:k]).astype(np.int64), np.sort(perm[k:]).astype(np.int64)
