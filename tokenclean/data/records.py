"""Reading data files into validated, compact `Conversations`, without importing torch or transformers.

`read_conversations` (and `read_records`, the same as a list of dicts) streams and validates a data file (JSON
Lines, JSON, parquet, a datasets.save_to_disk folder or builtin:<name>), so a bad file fails in seconds, before any
model loads. Every record comes out normalised to ``{"messages": [...]}`` (see `tokenclean.data.validate`).
`Conversations` keeps the records in compact Arrow columns, about the size of their text, so a file of a million
records is held at once without Python objects.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from array import array
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tokenclean.data.errors import BadRecord, data_error, key_list, type_name
from tokenclean.data.validate import ROLES, SHAPES, detect_shape, validator
from tokenclean.io import fingerprint

log = logging.getLogger(__name__)

CHUNK = 2048  # records per Arrow batch while reading, and per rendering batch in tokens.tokenize (read from here)
_ROLE_CODES = {r: i for i, r in enumerate(ROLES)}


def progress(iterable=None, **kw):
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

    def take(self, indices) -> "Conversations":
        """The records at `indices` (in that order), as new Conversations."""
        import pyarrow as pa
        idx = np.asarray(indices, np.int64)
        counts = self.offsets[idx + 1] - self.offsets[idx]
        msgs = (np.repeat(self.offsets[idx] - np.cumsum(counts) + counts, counts)
                + np.arange(int(counts.sum()), dtype=np.int64))
        offsets = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        content = self.content.take(pa.array(msgs, pa.int64()))
        return Conversations(content, self.roles[msgs], self.train[msgs], offsets)

    def fingerprint(self) -> str:
        """The identity of the records' content (texts, roles, train flags, record boundaries): the same file read
        with the same settings gives the same value; one changed character does not."""
        parts = [self.roles, self.train, self.offsets]
        for chunk in getattr(self.content, "chunks", [self.content]):   # a ChunkedArray, or one Array
            _, offsets, data = chunk.buffers()
            ends = np.frombuffer(offsets, np.int64)[chunk.offset:chunk.offset + len(chunk) + 1]
            text = memoryview(data)[int(ends[0]):int(ends[-1])].tobytes() if data is not None else b""
            parts += [np.diff(ends), text]
        return fingerprint(*parts)

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
                    raise BadRecord(f"a text holds an unpaired surrogate ({m['content'][e.start]!r}), which is not "
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
        shape = detect_shape(obj for _, obj in head)
        entries = itertools.chain(head, entries)
    else:
        shape = fmt
    validate = validator(shape)

    out = _Builder()
    bad: list[str] = []  # the first reasons only: a file of a million bad lines must not keep a million strings
    n_bad = n_seen = 0
    with progress(entries, desc=f"reading {Path(name).name}", unit=" records") as bar:
        for where, obj in bar:
            if limit is not None and len(out) >= limit:
                break
            n_seen += 1
            try:
                if isinstance(obj, BadRecord):
                    raise obj
                if not isinstance(obj, dict):
                    raise BadRecord(f"record is {type_name(obj, article=True)}, expected a JSON object")
                out.add(validate(obj))
            except BadRecord as e:
                if on_error == "raise":
                    raise data_error(name, where, e.reason, e.fix) from None
                n_bad += 1
                if len(bad) < 5:
                    bad.append(f"{where}: {e.reason}")
    if n_bad:
        shown = "; ".join(bad[:5]) + ("; ..." if n_bad > 5 else "")
        log.warning("%s: skipped %d of %d records (data.on_error=skip). First reasons: %s",
                    name, n_bad, n_seen, shown)
    if not len(out) and limit != 0:
        if n_bad:
            raise data_error(name, None, f"no valid records ({n_bad} skipped; first: {bad[0]})",
                             "Check that the file has the shape you expect (messages, prompt/completion or "
                             "instruction/output).")
        raise data_error(name, None, "the file holds no records", "Point data.train at a non-empty data file.")
    return out.build(), n_bad


def _iter_raw(source: str) -> Iterator[tuple[str, Any]]:
    """(location, parsed object or BadRecord) for every record of `source`, in order, streamed where the format allows.
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
    raise data_error(name, None, f"unsupported file type {suffix or '(no extension)'!r}",
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
                yield where, BadRecord(f"invalid UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line)",
                                      "Re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8) or set "
                                      "data.on_error=skip to skip such lines.")
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, BadRecord(f"invalid JSON ({e.msg} at column {e.colno})")


def _iter_json(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    data = path.read_bytes()
    no_skip = "A .json file cannot skip single records; convert it to .jsonl to use data.on_error=skip."
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise data_error(name, f"line {line}", f"invalid UTF-8 (byte 0x{data[e.start]:02x})",
                         f"Re-encode the file as UTF-8. {no_skip}") from None
    del data
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and e.lineno > 1 and _is_object_line(text):  # JSON Lines saved as .json
            log.info("%s is JSON Lines, not one JSON document; reading it line by line", name)
            return _iter_jsonl(path)
        raise data_error(name, f"line {e.lineno}", f"invalid JSON ({e.msg} at column {e.colno})",
                         f"Fix the file. {no_skip}") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        keys = f" (keys: {key_list(obj)})" if isinstance(obj, dict) else ""
        raise data_error(name, None, f"top level is {type_name(obj, article=True)}{keys}, expected a list of records "
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
            raise data_error(name, None, f"cannot read {what} ({type(e).__name__}: {e})", fix) from None
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
        raise data_error(name, None, f"cannot read parquet ({type(e).__name__}: {e})", fix) from None
    return _iter_rows(batches, name, "parquet", fix)


def _iter_dataset_dir(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    """A folder written by datasets' save_to_disk, read with pyarrow (no `datasets` import needed)."""
    import pyarrow as pa
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise data_error(name, None, f"DatasetDict has no 'train' split (splits: {', '.join(splits)})",
                             "Save the split you want with Dataset.save_to_disk, or name it 'train'.")
        path = path / "train"
        name = f"{name}/train"
    state = path / "state.json"
    if not state.exists():
        raise data_error(name, None, "folder is not a datasets.save_to_disk folder (no state.json or "
                         "dataset_dict.json)", "Point data.train at a .jsonl/.json/.parquet file or at a folder "
                         "written by Dataset.save_to_disk.")
    fix = "Re-save it with Dataset.save_to_disk."
    try:
        files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except Exception as e:  # noqa: BLE001
        raise data_error(name, None, f"cannot read the dataset folder ({type(e).__name__}: {e})", fix) from None

    def batches():
        for f in files:
            with pa.memory_map(str(path / f)) as src:
                yield from pa.ipc.open_stream(src)
    return _iter_rows(batches(), name, "the dataset folder", fix)

