"""Records -> tokenized examples with a response (target) mask.

Two stages, kept apart on purpose:

* `read_conversations` (and `read_records`, the same as a list of dicts) streams and validates a data file without
  importing torch or transformers, so a bad file fails in seconds, before any model loads. Every record comes out
  normalised to ``{"messages": [{"role", "content"}, ...]}`` with roles ``system | user | assistant``. An assistant
  message may carry ``"train": False`` (set for the assistant turns inside a TRL conversational *prompt*, which TRL
  does not train on); every other assistant turn is a target. `Conversations` keeps the records in compact Arrow
  columns, about the size of their text, so a file of a million records is held at once without Python objects.
* `tokenize` renders each conversation once (the tokenizer's chat template, or the plain template below), knows the
  character span of every assistant turn, tokenizes with the fast tokenizer's offsets and marks the tokens that
  overlap a span. Targets are the assistant content plus the end-of-turn token(s) the template emits right after it
  (``<|im_end|>`` for ChatML, eos for the plain template), so the model learns to stop; never a role header, system
  or user text. It works through the records a chunk at a time straight into flat int32/bool arrays, so memory grows
  with the token arrays, not with rendered texts or tokenizer outputs.

Errors in the data are `DataError`s whose message names the file, the 1-based line (JSONL), record (JSON, builtin)
or row (parquet, datasets folder), what is wrong and the fix, e.g.::

    data.jsonl line 17: record has no 'completion' field (keys: prompt, answer). Fix the record or set
    data.on_error=skip to skip such records.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from tokenclean.config import UserError
from tokenclean.io import fingerprint
from tokenclean.ragged import Ragged

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SHAPES = ("messages", "prompt_completion", "instruction")
SKIP_FIX = "Fix the record or set data.on_error=skip to skip such records."

# The plain template (used when the tokenizer has no chat template, or with template="plain").
PLAIN_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
PLAIN_SEPARATOR = "\n\n"


class DataError(UserError, ValueError):
    """A data file or record is unusable. The message names the file, the 1-based line/record/row, what is wrong and
    the fix. Attributes: `source` (the file), `where` (e.g. "line 17", or None for file-level problems), `reason`."""

    def __init__(self, message: str, *, source: str | None = None, where: str | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.source, self.where, self.reason = source, where, reason


class TemplateError(UserError, ValueError):
    """A chat template cannot give reliable response masks (e.g. it is not prefix-consistent)."""


class _Bad(Exception):
    """A record-level problem; turned into a DataError (or counted) with the location by `read_records`."""

    def __init__(self, reason: str, fix: str = SKIP_FIX):
        super().__init__(reason)
        self.reason, self.fix = reason, fix


def _data_error(source: str, where: str | None, reason: str, fix: str) -> DataError:
    loc = f"{source} {where}" if where else str(source)
    return DataError(f"{loc}: {reason}. {fix}", source=str(source), where=where, reason=reason)


# ----------------------------------------------------------------------------------------------------------------
# Reading

CHUNK = 2048  # records per Arrow batch while reading, and per rendering batch while tokenizing
TOKENIZER_CHARS = 1 << 20  # characters per tokenizer call: bounds its Python output, however long the texts
_ROLE_CODES = {r: i for i, r in enumerate(ROLES)}


def _progress(iterable=None, **kw):
    """A tqdm bar on the local main process only, like the training bars (the model's Accelerator does not exist
    yet while the data are read). It appears once the work has taken 2 s, so small inputs and the tests print none."""
    from tqdm.auto import tqdm
    return tqdm(iterable, delay=2, disable=int(os.environ.get("LOCAL_RANK") or 0) != 0, **kw)


class Conversations:
    """Validated, normalised records held compactly: every message's content in one Arrow string array, its role and
    train flag in a byte each, and where each record's messages start. That is about the size of the text itself
    (as Python dicts a short record takes about 1 KB more), so a million records cost little until tokenized.
    ``conversations[i]``, ``conversations[lo:hi]`` and iteration give the records as `read_records` returns them."""

    def __init__(self, content, roles: np.ndarray, train: np.ndarray, offsets: np.ndarray):
        self.content = content    # pyarrow (Chunked)Array of large_string, one per message
        self.roles = roles        # int8 index into ROLES, one per message
        self.train = train        # bool, one per message: False for an assistant turn that is context, not target
        self.offsets = offsets    # int64, len = n_records + 1: record i is messages offsets[i]:offsets[i + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            lo, hi, step = i.indices(len(self))
            if step != 1:
                raise ValueError("Conversations slices must be contiguous")
            return self._records(lo, max(lo, hi))
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} of {len(self)}")
        i %= len(self)
        return self._records(i, i + 1)[0]

    def __iter__(self) -> Iterator[dict]:
        for lo in range(0, len(self), CHUNK):
            yield from self._records(lo, min(lo + CHUNK, len(self)))

    def _records(self, lo: int, hi: int) -> list[dict]:
        a, b = int(self.offsets[lo]), int(self.offsets[hi])
        msgs = []
        for content, role, train in zip(self.content.slice(a, b - a).to_pylist(), self.roles[a:b].tolist(),
                                        self.train[a:b].tolist()):
            m = {"role": ROLES[role], "content": content}
            if not train:
                m["train"] = False
            msgs.append(m)
        ends = (self.offsets[lo:hi + 1] - a).tolist()
        return [{"messages": msgs[s:e]} for s, e in zip(ends[:-1], ends[1:])]


class _Builder:
    """Appends validated records to the compact columns of `Conversations`, CHUNK messages at a time."""

    def __init__(self):
        import pyarrow as pa
        self.pa, self.chunks, self.contents = pa, [], []
        self.roles, self.train, self.counts = array("b"), array("b"), array("q")

    def __len__(self) -> int:
        return len(self.counts)

    def add(self, record: dict) -> None:
        msgs = record["messages"]
        for m in msgs:  # Arrow stores UTF-8: a lone surrogate (JSON "\ud800") cannot be stored, nor tokenized
            if not m["content"].isascii():
                try:
                    m["content"].encode()
                except UnicodeEncodeError as e:
                    raise _Bad(f"a text holds an unpaired surrogate ({m['content'][e.start]!r}), which is not "
                               "valid Unicode") from None
        self.contents += [m["content"] for m in msgs]
        self.roles.extend(_ROLE_CODES[m["role"]] for m in msgs)
        self.train.extend(m.get("train", True) for m in msgs)
        self.counts.append(len(msgs))
        if len(self.contents) >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self.contents:
            self.chunks.append(self.pa.array(self.contents, self.pa.large_string()))
            self.contents = []

    def build(self) -> Conversations:
        self._flush()
        offsets = np.zeros(len(self.counts) + 1, np.int64)
        np.cumsum(np.array(self.counts, np.int64), out=offsets[1:])
        return Conversations(self.pa.chunked_array(self.chunks, self.pa.large_string()),
                             np.array(self.roles, np.int8), np.array(self.train, bool), offsets)


def read_records(source: str, fmt: str = "auto", on_error: str = "raise",
                 limit: int | None = None) -> tuple[list[dict], int]:
    """`read_conversations` with the records as a list of dicts ``{"messages": [...]}``: handy for small data; use
    read_conversations itself for big files."""
    conversations, skipped = read_conversations(source, fmt, on_error, limit)
    return list(conversations), skipped


def read_conversations(source: str, fmt: str = "auto", on_error: str = "raise",
                       limit: int | None = None) -> tuple[Conversations, int]:
    """Read and validate records; return (the records normalised to ``{"messages": [...]}``, held compactly as
    `Conversations`, n_skipped). The file is streamed (a ``.json`` file, one JSON document, is parsed whole: use
    JSON Lines for big data), so memory grows with the text kept, not with the records as Python objects.

    source: a ``.jsonl``/``.ndjson`` file, a ``.json`` file (a list of records or ``{"data": [...]}``; a ``.json``
    file that is really JSON Lines is read as such), a ``.parquet`` file, a folder written by
    ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` folder: its ``train`` split), or ``builtin:<name>``.

    Shapes (fmt="auto" picks one per file by majority over the first 1000 records' keys; or force one):
      - ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
      - ``prompt_completion``: ``{"prompt": str, "completion": str}`` -> user/assistant; TRL's conversational form
        (prompt and completion are lists of messages) is accepted, and assistant turns inside the prompt get
        ``"train": False`` (context, not targets), as in TRL;
      - ``instruction`` (Alpaca): ``{"instruction", "input" (optional), "output", "system" (optional)}`` -> user
        content ``instruction + "\\n\\n" + input`` (input only when not blank).

    on_error="raise" raises `DataError` at the first bad record; "skip" drops bad records, counts them and logs a
    warning with the first reasons. File-level problems (unreadable parquet, a ``.json`` file that is not valid JSON
    or UTF-8) always raise: single records cannot be skipped there. limit keeps the first N valid records (and stops
    reading there). A missing file raises FileNotFoundError. Never imports torch or transformers.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if fmt not in ("auto",) + SHAPES:
        raise ValueError(f"fmt must be one of auto, {', '.join(SHAPES)}; not {fmt!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, not {limit}")
    name = str(source)
    entries = _iter_raw(source)

    if fmt == "auto":
        head = list(itertools.islice(entries, 1000))
        shape = _detect_shape(obj for _, obj in head)
        entries = itertools.chain(head, entries)
    else:
        shape = fmt
    validate = _VALIDATORS[shape] if shape else _no_shape

    out = _Builder()
    bad: list[str] = []  # the first reasons only: a file of a million bad lines must not keep a million strings
    n_bad = n_seen = 0
    with _progress(entries, desc=f"reading {Path(name).name}", unit=" records") as bar:
        for where, obj in bar:
            if limit is not None and len(out) >= limit:
                break
            n_seen += 1
            try:
                if isinstance(obj, _Bad):
                    raise obj
                if not isinstance(obj, dict):
                    raise _Bad(f"record is {_tname(obj, article=True)}, expected a JSON object")
                out.add(validate(obj))
            except _Bad as e:
                if on_error == "raise":
                    raise _data_error(name, where, e.reason, e.fix) from None
                n_bad += 1
                if len(bad) < 5:
                    bad.append(f"{where}: {e.reason}")
    if n_bad:
        shown = "; ".join(bad[:5]) + ("; ..." if n_bad > 5 else "")
        log.warning("%s: skipped %d of %d records (data.on_error=skip). First reasons: %s",
                    name, n_bad, n_seen, shown)
    if not len(out) and limit != 0:
        if n_bad:
            raise _data_error(name, None, f"no valid records ({n_bad} skipped; first: {bad[0]})",
                              "Check that the file has the shape you expect (messages, prompt/completion or "
                              "instruction/output).")
        raise _data_error(name, None, "the file holds no records", "Point data.train at a non-empty data file.")
    return out.build(), n_bad


def _iter_raw(source: str) -> Iterator[tuple[str, Any]]:
    """(location, parsed object or _Bad) for every record of `source`, in order, streamed where the format allows.
    Problems with the file itself (missing, unreadable) raise here, before the first record."""
    name = str(source)
    if name.startswith("builtin:"):
        from tokenclean.assets import builtin_records
        return ((f"record {i}", r) for i, r in enumerate(builtin_records(name), 1))
    path = Path(name).expanduser()
    if not path.exists():
        resolved = path.resolve()
        extra = f" (resolved to {resolved})" if str(resolved) != name else ""
        raise FileNotFoundError(f"data file not found: {name}{extra}")
    if path.is_dir():
        return _iter_dataset_dir(path, name)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _iter_jsonl(path)
    if suffix == ".json":
        return _iter_json(path, name)
    if suffix in (".parquet", ".pq"):
        return _iter_parquet(path, name)
    raise _data_error(name, None, f"unsupported file type {suffix or '(no extension)'!r}",
                      "Use a .jsonl, .json or .parquet file, a datasets.save_to_disk folder, or builtin:<name>.")


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if line.endswith(b"\n"):  # as split("\n") would give it: JSON error columns stay those of the line
                line = line[:-1]
            if i == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            where = f"line {i}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, _Bad(f"invalid UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line)",
                                  "Re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8) or set "
                                  "data.on_error=skip to skip such lines.")
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, _Bad(f"invalid JSON ({e.msg} at column {e.colno})")


def _iter_json(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    data = path.read_bytes()
    no_skip = "A .json file cannot skip single records; convert it to .jsonl to use data.on_error=skip."
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _data_error(name, f"line {line}", f"invalid UTF-8 (byte 0x{data[e.start]:02x})",
                          f"Re-encode the file as UTF-8. {no_skip}") from None
    del data
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and e.lineno > 1 and _is_object_line(text):  # JSON Lines saved as .json
            log.info("%s is JSON Lines, not one JSON document; reading it line by line", name)
            return _iter_jsonl(path)
        raise _data_error(name, f"line {e.lineno}", f"invalid JSON ({e.msg} at column {e.colno})",
                          f"Fix the file. {no_skip}") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        keys = f" (keys: {_keys(obj)})" if isinstance(obj, dict) else ""
        raise _data_error(name, None, f"top level is {_tname(obj, article=True)}{keys}, expected a list of records "
                          "or an object with a 'data' list", "Save the records as a JSON list or as JSON Lines.")
    return ((f"record {i}", r) for i, r in enumerate(obj, 1))


def _is_object_line(text: str) -> bool:
    try:
        return isinstance(json.loads(text.split("\n", 1)[0]), dict)
    except json.JSONDecodeError:
        return False


def _iter_rows(batches: Iterator, name: str, what: str, fix: str) -> Iterator[tuple[str, Any]]:
    """The rows of Arrow record batches, one batch in memory at a time; a batch that cannot be read is a file-level
    error (its rows cannot be skipped one by one)."""
    i = 0
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # noqa: BLE001 - any reader failure is a file-level data error
            raise _data_error(name, None, f"cannot read {what} ({type(e).__name__}: {e})", fix) from None
        if batch is None:
            return
        for row in batch.to_pylist():
            i += 1
            yield f"row {i}", row


def _iter_parquet(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq
    fix = ("Check that the file is a complete parquet file (re-export it); single rows of an unreadable file cannot "
           "be skipped.")
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=CHUNK)
    except Exception as e:  # noqa: BLE001
        raise _data_error(name, None, f"cannot read parquet ({type(e).__name__}: {e})", fix) from None
    return _iter_rows(batches, name, "parquet", fix)


def _iter_dataset_dir(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    """A folder written by datasets' save_to_disk, read with pyarrow (no `datasets` import needed)."""
    import pyarrow as pa
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise _data_error(name, None, f"DatasetDict has no 'train' split (splits: {', '.join(splits)})",
                              "Save the split you want with Dataset.save_to_disk, or name it 'train'.")
        path = path / "train"
        name = f"{name}/train"
    state = path / "state.json"
    if not state.exists():
        raise _data_error(name, None, "folder is not a datasets.save_to_disk folder (no state.json or "
                          "dataset_dict.json)", "Point data.train at a .jsonl/.json/.parquet file or at a folder "
                          "written by Dataset.save_to_disk.")
    fix = "Re-save it with Dataset.save_to_disk."
    try:
        files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except Exception as e:  # noqa: BLE001
        raise _data_error(name, None, f"cannot read the dataset folder ({type(e).__name__}: {e})", fix) from None

    def batches():
        for f in files:
            with pa.memory_map(str(path / f)) as src:
                yield from pa.ipc.open_stream(src)
    return _iter_rows(batches(), name, "the dataset folder", fix)


def _detect_shape(objs: Iterable[Any]) -> str | None:
    votes = dict.fromkeys(SHAPES, 0)
    for o in objs:
        if not isinstance(o, dict):
            continue
        if "messages" in o:
            votes["messages"] += 1
        elif "prompt" in o or "completion" in o:
            votes["prompt_completion"] += 1
        elif "instruction" in o or "output" in o:
            votes["instruction"] += 1
    best = max(votes, key=votes.get)
    return best if votes[best] else None


# ----------------------------------------------------------------------------------------------------------------
# Validation and normalisation


def _tname(x: Any, article: bool = False) -> str:
    if x is None:
        return "null"
    t = ("a boolean" if isinstance(x, bool) else "a number" if isinstance(x, (int, float)) else
         "a string" if isinstance(x, str) else "a list" if isinstance(x, (list, tuple)) else
         "an object" if isinstance(x, dict) else f"a {type(x).__name__}")
    return t if article else t.split(" ", 1)[1]


def _keys(d: dict) -> str:
    keys = [str(k) for k in d]
    return ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "") if keys else "none"


def _require(rec: dict, key: str) -> Any:
    if key not in rec:
        raise _Bad(f"record has no '{key}' field (keys: {_keys(rec)})")
    return rec[key]


def _string(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{label} is {_tname(value, article=True)}, expected a string")
    return value


def _check_messages(msgs: Any, label: str, need_target: bool, allow_empty: bool = False,
                    context_only: bool = False) -> list[dict]:
    if not isinstance(msgs, (list, tuple)):
        raise _Bad(f"'{label}' is {_tname(msgs, article=True)}, expected a list of {{role, content}} messages")
    if not msgs and not allow_empty:
        raise _Bad(f"'{label}' is an empty list")
    out = []
    for i, m in enumerate(msgs):
        where = f"'{label}[{i}]'"
        sub = f"{label}[{i}]"
        if not isinstance(m, dict):
            raise _Bad(f"{where} is {_tname(m, article=True)}, expected an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise _Bad(f"{where} has no '{key}' field (keys: {_keys(m)})")
        role = m["role"]
        if not isinstance(role, str):
            raise _Bad(f"'{sub}.role' is {_tname(role, article=True)}, expected a string")
        if role not in ROLES:
            raise _Bad(f"{where} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = _string(m["content"], f"'{sub}.content'")
        msg = {"role": role, "content": content}
        if role == "assistant":
            if not content.strip():
                raise _Bad(f"{where} is an assistant turn with an empty response")
            train = m.get("train")
            train = True if train is None else train  # Arrow/parquet fill absent struct fields with null
            if not isinstance(train, bool):
                raise _Bad(f"'{sub}.train' is {_tname(train, article=True)}, expected true or false")
            if context_only or not train:
                msg["train"] = False
        out.append(msg)
    if need_target and not any(m["role"] == "assistant" and m.get("train", True) for m in out):
        raise _Bad(f"'{label}' has no assistant turn, so there is nothing to train on")
    return out


def _v_messages(rec: dict) -> dict:
    return {"messages": _check_messages(_require(rec, "messages"), "messages", need_target=True)}


def _v_prompt_completion(rec: dict) -> dict:
    prompt, completion = _require(rec, "prompt"), _require(rec, "completion")
    if isinstance(prompt, str):
        head = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)):
        head = _check_messages(prompt, "prompt", need_target=False, allow_empty=True, context_only=True)
    else:
        raise _Bad(f"'prompt' is {_tname(prompt, article=True)}, expected a string or a list of messages")
    if isinstance(completion, str):
        if not completion.strip():
            raise _Bad("'completion' is empty (an empty response cannot be trained on)")
        tail = [{"role": "assistant", "content": completion}]
    elif isinstance(completion, (list, tuple)):
        tail = _check_messages(completion, "completion", need_target=True)
    else:
        raise _Bad(f"'completion' is {_tname(completion, article=True)}, expected a string or a list of messages")
    return {"messages": head + tail}


def _v_instruction(rec: dict) -> dict:
    instruction = _string(_require(rec, "instruction"), "'instruction'")
    output = _string(_require(rec, "output"), "'output'")
    inp = rec.get("input")
    inp = "" if inp is None else _string(inp, "'input'")
    system = rec.get("system")
    system = "" if system is None else _string(system, "'system'")
    if not output.strip():
        raise _Bad("'output' is empty (an empty response cannot be trained on)")
    user = instruction + ("\n\n" + inp if inp.strip() else "")
    msgs = [{"role": "system", "content": system}] if system.strip() else []
    return {"messages": msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}


def _no_shape(rec: dict) -> dict:
    raise _Bad(f"record matches no known shape (keys: {_keys(rec)}); expected 'messages', 'prompt'+'completion' "
               "or 'instruction'+'output'", "Convert the data to one of these shapes, or set data.format.")


_VALIDATORS = {"messages": _v_messages, "prompt_completion": _v_prompt_completion, "instruction": _v_instruction}


# ----------------------------------------------------------------------------------------------------------------
# Tokenization


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


def render_plain(messages: list[dict], eos_token: str, add_generation_prompt: bool = False) -> str:
    """The plain template: ``### System:\\n{c}\\n\\n``, ``### User:\\n{c}\\n\\n``,
    ``### Assistant:\\n{c}{eos}\\n\\n``; with add_generation_prompt, ``### Assistant:\\n`` at the end (generate from
    there and stop at eos)."""
    return _render_plain(messages, eos_token, add_generation_prompt)[0]


def _render_plain(messages: list[dict], eos: str, add_generation_prompt: bool = False):
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
    texts, spans, no_eot = _render_chat(records, tokenizer, chat_template)
    _warn_no_eot(no_eot)
    return texts, spans


def _warn_no_eot(no_eot: int) -> None:
    if no_eot:
        log.warning("the chat template emits no special end-of-turn token after %d assistant turns; targets end "
                    "with the content, so the model may not learn to stop", no_eot)


def _render_chat(records: list[dict], tokenizer, chat_template: str, first: int = 0):
    """render_chat's work on records[first:...] (errors name record first + i); returns (texts, spans, the number of
    target turns with no special end-of-turn token after them)."""
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
    Records go through CHUNK at a time, each chunk straight into compact arrays (int32 ids, bool mask): the rendered
    texts and tokenizer output of only one chunk are ever held, so memory grows with the token arrays alone.
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

    parts, no_eot = [], 0
    with _progress(total=n, desc="tokenizing", unit=" records") as bar:
        for lo in range(0, n, CHUNK):
            chunk = records[lo:lo + CHUNK]
            if chat_template is None:
                rendered = [_render_plain(r["messages"], eos) for r in chunk]
                texts, spans = [t for t, _ in rendered], [s for _, s in rendered]
            else:
                texts, spans, k = _render_chat(chunk, tokenizer, chat_template, first=lo)
                no_eot += k
            parts.append(_encode(texts, spans, tokenizer, bos, max_length, first=lo))
            bar.update(len(chunk))
    _warn_no_eot(no_eot)

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


# ----------------------------------------------------------------------------------------------------------------
# Splits


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
