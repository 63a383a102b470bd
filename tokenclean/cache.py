"""A content-addressed cache of what runs share though their selections differ: the base model's per-token losses
(and entropies) and the fixed pipeline's warm-up reference (its checkpoint, its losses on the pool, its metrics).
Sweep points, reruns with another keep ratio, scope or selection method, and the benchmark's arms compute them once.

An entry is keyed by everything that determines its bits: fingerprints of the base model, the tokenizer and the
examples involved, the config keys that change the computation, the compute environment (precision, device,
process count, library versions) and the source of the modules that compute it. The key is a canonical JSON;
the entry is the directory named after its hash:

    <cache root>/scores/<kind>-<sha256 of key.json, 32 hex>/
        key.json      the canonical key, readable: what determined the entry
        entry.json    the stage's info (its metrics) and the sha256 of every file
        files/...     the files (reference/model.safetensors, reference_losses.values.npy, ...)

Nothing is trusted on its name alone: a read first checks that key.json hashes to the directory's name and equals
the current key, and that every file hashes to what entry.json says. An entry that fails is logged and treated as
missing: the stage is recomputed and its new entry replaces the bad one.

Entries are never evicted: delete <cache root>/scores (or any entry) at any time; runs keep their files.

Entries are built in a temp dir and renamed into place under a file lock, so a reader sees a whole entry or none.
Two runs computing the same entry at once both compute it (no lock is held while computing: a distributed job's
other ranks would wait on it in a collective with a timeout); the first to publish wins and the other keeps its own
files. Files are hardlinked between the run directory and the cache (copied across filesystems), so a run holds
its own names for them and deleting the cache leaves it whole; they are made read-only, since a write through
either name would change both.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tokenclean import io

log = logging.getLogger("tokenclean")


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


# the modules whose code computes what is cached (model loading, the loss, training, the stages that call them): an
# edit to any of them changes the key, so a fix to the loss is never masked by losses cached before it; an edit
# elsewhere (a scorer, the selection, the report) keeps every entry
COMPUTE_MODULES = ("losses.py", "models.py", "train.py", "dist.py", "pipelines/job.py", "pipelines/fixed.py")


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """The hash of COMPUTE_MODULES' source (once per process: every point of a sweep agrees)."""
    h, package = hashlib.sha256(), Path(__file__).resolve().parent
    for name in COMPUTE_MODULES:
        h.update(name.encode() + b"\0" + (package / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def place(src: Path, dst: Path) -> None:
    """dst gets src's content: a hardlink where both are on one filesystem, else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)   # a partial earlier attempt at this stage
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@dataclass(frozen=True)
class Key:
    kind: str
    text: str   # the canonical JSON

    @property
    def name(self) -> str:
        return f"{self.kind}-{hashlib.sha256(self.text.encode()).hexdigest()[:32]}"


class ScoreCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def key(self, kind: str, inputs: dict) -> Key:
        return Key(kind, canonical({"kind": kind, "code": code_fingerprint(), **inputs}))

    def restore(self, key: Key, dest: dict[str, str]) -> dict | None:
        """Place the entry's files (dest: entry file-name prefix -> destination path prefix) and return its info;
        None when there is no trusted entry."""
        path = self.root / key.name
        if not (path / "entry.json").exists():
            return None
        with self._lock(key):   # a bad entry is not swapped for a new one while we read it
            entry, problem = self._check(path, key)
            if problem:
                log.warning("score cache: %s is not trusted (%s); recomputing it", path, problem)
                return None
            for name in entry["files"]:
                prefix = next(p for p in dest if name.startswith(p))
                place(path / "files" / name, Path(dest[prefix] + name[len(prefix):]))
        log.info("score cache: reusing %s", path)
        return entry["info"]

    def put(self, key: Key, files: dict[str, Path], info: dict) -> None:
        """Publish an entry of `files` (entry file name -> a file of the run that computed it) and `info`. The cache
        only saves time: a cache that cannot be written (full, read-only) is a warning, and the run goes on."""
        try:
            self._publish(key, files, info)
        except OSError as e:
            log.warning("score cache: could not store %s in %s (%s); the run goes on without it", key.name,
                        self.root, e.strerror or e)

    def _publish(self, key: Key, files: dict[str, Path], info: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key.name}.tmp-", dir=self.root))
        try:
            hashes = {}
            for name, src in files.items():
                place(Path(src), tmp / "files" / name)
                os.chmod(tmp / "files" / name, 0o444)
                hashes[name] = io.sha256_file(tmp / "files" / name)
            (tmp / "key.json").write_text(key.text)
            (tmp / "entry.json").write_text(json.dumps({"info": info, "files": hashes}, indent=1))
            os.chmod(tmp, 0o755)   # mkdtemp makes it private; the cache may be shared
            io.fsync_tree(tmp)     # whole on disk before the rename makes it visible
            final = self.root / key.name
            with self._lock(key):
                if final.exists():
                    if self._check(final, key)[1] is None:   # another run published it first
                        return
                    shutil.rmtree(final)   # a bad entry: runs linked to its files keep their own names for them
                os.rename(tmp, final)
            log.info("score cache: stored %s", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)   # no-op after the rename

    def _check(self, path: Path, key: Key) -> tuple[dict | None, str | None]:
        """(the entry, None) if it is whole and was made for `key`, else (None, what is wrong)."""
        try:
            stored = (path / "key.json").read_text()
            if Key(key.kind, stored).name != path.name:
                return None, "key.json does not hash to the entry's name"
            if stored != key.text:
                return None, "key.json is not the current key"
            entry = json.loads((path / "entry.json").read_text())
            for name, digest in entry["files"].items():
                if io.sha256_file(path / "files" / name) != digest:
                    return None, f"files/{name} does not match its recorded sha256"
            return entry, None
        except (OSError, ValueError, KeyError, TypeError) as e:
            return None, f"unreadable: {e!r}"

    def _lock(self, key: Key):
        from filelock import FileLock
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / f"{key.name}.lock"))
