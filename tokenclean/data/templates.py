"""Rendering conversations to text with the character span of every target (trainable assistant) turn.

Two ways: the plain template (`render_plain`: ``### User:`` style headers, eos after each response; used when the
tokenizer has no chat template, or with template=plain) or the tokenizer's chat template (`render_chat`), whose
spans are found by rendering each turn's prefixes, which must be prefixes of the whole rendering (else
`TemplateError`). Targets are the assistant content plus the end-of-turn token(s) the template emits right after it
(``<|im_end|>`` for ChatML, eos for the plain template), so the model learns to stop; never a role header, system
or user text. `resolve_template` picks the template, `bos_to_add` says whether a bos must be put in front.
"""
from __future__ import annotations

import logging
import re

from tokenclean.data.errors import TemplateError

log = logging.getLogger(__name__)

# The plain template (used when the tokenizer has no chat template, or with template="plain").
PLAIN_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
PLAIN_SEPARATOR = "\n\n"


def render_plain(messages: list[dict], eos_token: str, add_generation_prompt: bool = False) -> str:
    """The plain template: ``### System:\\n{c}\\n\\n``, ``### User:\\n{c}\\n\\n``,
    ``### Assistant:\\n{c}{eos}\\n\\n``; with add_generation_prompt, ``### Assistant:\\n`` at the end (generate from
    there and stop at eos)."""
    return render_plain_spans(messages, eos_token, add_generation_prompt)[0]


def render_plain_spans(messages: list[dict], eos: str, add_generation_prompt: bool = False):
    """`render_plain`'s text and the (start, end) character span of every trainable assistant turn in it: its
    content and the eos after it."""
    parts, spans, pos = [], [], 0
    for m in messages:
        header = PLAIN_HEADERS[m["role"]]
        body = m["content"] + (eos if m["role"] == "assistant" else "")
        if m["role"] == "assistant" and m.get("train", True):
            spans.append((pos + len(header), pos + len(header) + len(body)))
        piece = header + body + PLAIN_SEPARATOR
        parts.append(piece)
        pos += len(piece)
    if add_generation_prompt:
        parts.append(PLAIN_HEADERS["assistant"])
    return "".join(parts), spans


def resolve_template(tokenizer, template: str) -> str | None:
    """None for the plain template, else the Jinja chat template to use."""
    if template == "plain":
        return None
    if template in ("auto", "chat"):
        chat = None
        if getattr(tokenizer, "chat_template", None):
            try:
                chat = tokenizer.get_chat_template()
            except Exception:  # noqa: BLE001 - e.g. several named templates and no default
                chat = None
        if chat is None and template == "chat":
            raise TemplateError(f"template='chat' but {type(tokenizer).__name__} has no (default) chat template; "
                                "use template=auto or plain, or pass a Jinja template string")
        return chat
    if "{%" in template or "{{" in template:
        return template
    raise ValueError(f"template must be 'auto', 'plain', 'chat' or a Jinja chat template string, not {template!r}")


def _special_token_re(tokenizer) -> re.Pattern | None:
    toks = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(t, "special", False):
            toks.add(str(t.content) if hasattr(t, "content") else str(t))
    toks = sorted((t for t in toks if t and t.strip()), key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in toks)) if toks else None


def render_chat(records: list[dict], tokenizer, chat_template: str):
    """Render every conversation with the chat template; return (texts, spans per text)."""
    texts, spans, no_eot = render_chat_chunk(records, tokenizer, chat_template)
    warn_no_eot(no_eot)
    return texts, spans


def warn_no_eot(no_eot: int) -> None:
    """Warn (once, with the count from `render_chat_chunk`) when target turns have no end-of-turn token."""
    if no_eot:
        log.warning("the chat template emits no special end-of-turn token after %d assistant turns; targets end "
                    "with the content, so the model may not learn to stop", no_eot)


def render_chat_chunk(records: list[dict], tokenizer, chat_template: str, first: int = 0):
    """render_chat's work on one chunk, records[first:...] of the whole (errors name record first + i), without the
    warning; returns (texts, spans, the number of target turns with no special end-of-turn token after them)."""
    convs = [[{"role": m["role"], "content": m["content"]} for m in r["messages"]] for r in records]

    def render(batch: list[list[dict]], owners: list[int], gen: bool) -> list[str]:
        if not batch:
            return []
        kw = dict(tokenize=False, add_generation_prompt=gen, chat_template=chat_template)
        try:
            return list(tokenizer.apply_chat_template(batch, **kw))
        except Exception:  # noqa: BLE001 - find the record that fails, and say which
            for conv, i in zip(batch, owners):
                try:
                    tokenizer.apply_chat_template(conv, **kw)
                except Exception as e:  # noqa: BLE001
                    raise TemplateError(f"the chat template fails on record {first + i} ({type(e).__name__}: {e}); "
                                        "fix the record or use template=plain") from e
            raise

    fulls = render(convs, list(range(len(convs))), gen=False)
    # For each target turn k of record i: messages[:k] + generation prompt must be a prefix of the full rendering
    # (the turn starts where it ends) and messages[:k+1] too (the turn ends where it ends).
    turns = []  # (record, k)
    pre_batch, pre_own, upto_batch, upto_own = [], [], [], []
    for i, r in enumerate(records):
        msgs = r["messages"]
        for k, m in enumerate(msgs):
            if m["role"] != "assistant" or not m.get("train", True):
                continue
            turns.append((i, k))
            if k > 0:
                pre_batch.append(convs[i][:k])
                pre_own.append(i)
            if k < len(msgs) - 1:
                upto_batch.append(convs[i][:k + 1])
                upto_own.append(i)
    pres = iter(render(pre_batch, pre_own, gen=True))
    uptos = iter(render(upto_batch, upto_own, gen=False))

    special = _special_token_re(tokenizer)
    spans: list[list[tuple[int, int]]] = [[] for _ in records]
    no_eot = 0
    for i, k in turns:
        full, msgs = fulls[i], records[i]["messages"]
        content = msgs[k]["content"]
        upto = next(uptos) if k < len(msgs) - 1 else full
        if k > 0:
            pre = next(pres)
            start = _check_prefix(pre, full, first + i, k, "messages[:k] with the generation prompt")
        else:  # nothing before the turn to render: the turn starts where its content does
            start = max(full.find(content.strip()), 0)
        end = _check_prefix(upto, full, first + i, k, "messages[:k+1]")
        if end <= start:
            raise TemplateError(f"record {first + i}: the chat template renders assistant turn {k} as nothing")
        c_end = start
        for c in (content, content.strip()):
            pos = full.find(c, start, end)
            if pos >= 0:
                c_end = pos + len(c)
                break
        tail = full[c_end:end]
        last = None
        if special is not None:
            for last in special.finditer(tail):  # noqa: B007  (the last match is the one wanted)
                pass
        if last is not None:
            stop = c_end + last.end()
        else:
            stop = c_end + len(tail.rstrip())
            no_eot += 1
        spans[i].append((start, stop))
    return fulls, spans, no_eot


def _check_prefix(part: str, full: str, i: int, k: int, what: str) -> int:
    if full.startswith(part):
        return len(part)
    at = next((j for j, (a, b) in enumerate(zip(part, full)) if a != b), min(len(part), len(full)))
    raise TemplateError(
        f"the chat template is not prefix-consistent on record {i}, assistant turn {k}: rendering {what} differs "
        f"from the whole conversation at character {at} ({part[max(0, at - 30):at + 30]!r} vs "
        f"{full[max(0, at - 30):at + 30]!r}). Templates that rewrite earlier turns (e.g. drop earlier reasoning) "
        "cannot give exact response masks; use template=plain or a template that renders turns independently.")


def bos_to_add(tokenizer) -> int | None:
    """The bos id when the tokenizer normally adds it in front (add_special_tokens=True), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if len(with_special) > len(without) and with_special[0] == bos else None
