"""The one way to write a file atomically, the package's digests and fingerprints, and where its files live.

Every file tokenclean writes goes through `atomic_write` (or `atomic_write_text`): a per-process temporary name in the
same directory (`.<name>.tmp<pid>`, the pattern rundir removes when a killed run left one behind), fsync, then one
rename over the target, so a reader sees the old file or the whole new one, never a part. Directories (checkpoints,
cache entries, built-in assets) are filled under a temporary name, `fsync_tree`d and published by one rename too.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

import numpy as np

FULL_HASH_MAX, SAMPLE, SAMPLES = 64 << 20, 1 << 20, 16
STALE_TEMP = re.compile(r"^\..+\.tmp\d+$")   # what atomic_write and models.save_checkpoint write through


def cache_root() -> Path:
    """Where tokenclean keeps what it builds and fetches once (built-in models, the score cache, fetched data):
    $TOKENCLEAN_CACHE, default ~/.cache/tokenclean."""
    return Path(os.environ.get("TOKENCLEAN_CACHE") or "~/.cache/tokenclean").expanduser()


def fingerprint(*parts) -> str:
    """A short stable hash of strings, bytes, numpy arrays and ragged arrays (anything with values and offsets)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str(p.dtype).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        elif hasattr(p, "offsets") and hasattr(p, "values"):
            h.update(np.ascontiguousarray(p.offsets).tobytes())
            h.update(np.ascontiguousarray(p.values).tobytes())
        elif isinstance(p, bytes):
            h.update(p)
        else:
            h.update(str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(binary file) on a temporary name in the same directory, fsync, then rename over `path`: a reader
    sees the old file or the whole new one, never a part. The temporary name is per process. On failure (a full
    disk) the temporary file is removed and the OSError names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def fsync_tree(path: Path) -> None:
    for p in Path(path).rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def file_digest(path: str | os.PathLike) -> dict:
    """{"size", "blake2b"} of a file, or {"size", "blake2b_sampled"} above FULL_HASH_MAX (see the module doc)."""
    size, h = os.path.getsize(path), hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= FULL_HASH_MAX:
            for block in iter(lambda: f.read(SAMPLE), b""):
                h.update(block)
            return {"size": size, "blake2b": h.hexdigest()}
        for k in range(SAMPLES):
            f.seek((size - SAMPLE) * k // (SAMPLES - 1))
            h.update(f.read(SAMPLE))
        return {"size": size, "blake2b_sampled": h.hexdigest()}


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a whole file (the score cache's entries: shared across runs, so every byte is checked)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
