"""Per-token arrays for a ragged set of examples: one flat array plus offsets.

Every per-token quantity in tokenclean (token ids, target masks, losses, scores, keep masks, XTF attributes)
is a `Ragged`: `values[offsets[i]:offsets[i+1]]` belongs to example i and position j inside it is token j of
that example, so a loss at position j is the loss of predicting token j from tokens < j (NaN where no loss was
computed: position 0 and prompt tokens). Stored as `.npy` (memory-mappable) plus a JSON sidecar holding the
fingerprints of what produced it and the sizes and hashes of its files; reading checks both, so an array computed
for other data or another model, or damaged on disk, is never used silently. Writes are atomic: a file is either
complete or absent.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenclean import io, rundir


@dataclass
class Ragged:
    values: np.ndarray
    offsets: np.ndarray  # int64, len = n_examples + 1, offsets[0] == 0

    @classmethod
    def from_list(cls, rows, dtype=None) -> "Ragged":
        rows = [np.asarray(r, dtype=dtype) for r in rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        values = np.concatenate(rows) if rows else np.zeros(0, dtype=dtype or np.float32)
        return cls(values.astype(dtype) if dtype is not None else values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def like(self, values: np.ndarray) -> "Ragged":
        """Same layout, other values (e.g. scores from losses)."""
        assert values.shape == self.values.shape, (values.shape, self.values.shape)
        return Ragged(values, self.offsets)

    @classmethod
    def concat(cls, parts: list["Ragged"]) -> "Ragged":
        """The examples of every part, one after the other."""
        offsets = [np.zeros(1, np.int64)] + [None] * len(parts)
        for k, p in enumerate(parts):
            offsets[k + 1] = p.offsets[1:] + offsets[k][-1]
        return cls(np.concatenate([np.asarray(p.values) for p in parts]), np.concatenate(offsets))

    def row_sums(self) -> np.ndarray:
        """The sum of each example's values (a count for a bool Ragged, float64 for floats); 0 for an empty one."""
        v = np.asarray(self.values)
        dtype = np.float64 if np.issubdtype(v.dtype, np.floating) else np.int64
        csum = np.concatenate([[0], np.cumsum(v, dtype=dtype)])
        return np.diff(csum[self.offsets])

    def example_ids(self) -> np.ndarray:
        """For every flat position, the index of the example it belongs to."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.lengths)

    def select(self, indices) -> "Ragged":
        """The examples at `indices`, in that order."""
        return Ragged.from_list([self[int(i)] for i in indices], dtype=self.values.dtype)

    def same_layout(self, other: "Ragged") -> bool:
        return np.array_equal(self.offsets, other.offsets)

    def save(self, path: str | os.PathLike, meta: dict) -> None:
        """Write `<path>.values.npy`, `<path>.offsets.npy` and `<path>.json` (the meta, written last)."""
        path = Path(path)
        for part, array in (("values", self.values), ("offsets", self.offsets)):
            io.atomic_write(_part(path, part), lambda f, a=array: np.save(f, np.ascontiguousarray(a)))
        self.write_meta(path, meta)

    @staticmethod
    def write_meta(path: str | os.PathLike, meta: dict) -> None:
        """Write `<path>.json`, which completes the array: `meta` and, under "files", the sizes and hashes of its
        .npy files as they are now (for files placed by other means, e.g. linked from the score cache)."""
        path = Path(path)
        files = {part: io.file_digest(_part(path, part)) for part in ("values", "offsets")}
        io.atomic_write_text(_part(path, "json"), json.dumps({**meta, "files": files}, indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | os.PathLike, expect: dict | None = None, mmap: bool = True) -> "Ragged":
        """Read an array saved by `save`, checked against the sizes and hashes it was written with (DamagedError);
        every key of `expect` must equal the stored meta."""
        path = Path(path)
        meta = cls.verify(path)
        for key, want in (expect or {}).items():
            if meta.get(key) != want:
                raise rundir.RunDirError(
                    f"{path}: stored {key}={meta.get(key)!r} does not match the current {want!r}; "
                    "it was computed for other data or another model. Delete it or start the run with resume=false.")
        try:
            values = np.load(_part(path, "values"), mmap_mode="r" if mmap else None)
            offsets = np.load(_part(path, "offsets"))
        except (ValueError, OSError, EOFError) as e:   # an array written before checksums were recorded
            raise rundir.DamagedError(f"{path}: unreadable ({e}); {rundir.WAY_OUT}") from None
        if offsets.ndim != 1 or len(offsets) == 0 or offsets[-1] != len(values):
            raise rundir.DamagedError(f"{path}: its offsets do not fit its values; {rundir.WAY_OUT}")
        return cls(values, offsets)

    @staticmethod
    def verify(path: str | os.PathLike, hashes: bool = True) -> dict:
        """The stored meta, once the files are checked: there, at their recorded sizes, and (hashes) unchanged."""
        path = Path(path)
        if not _part(path, "json").exists():  # the meta is written last: without it the array is incomplete
            raise FileNotFoundError(f"{path}: no complete per-token array here (missing {_part(path, 'json').name})")
        meta = rundir.read_json(_part(path, "json"))
        if not isinstance(meta, dict):
            raise rundir.DamagedError(f"{_part(path, 'json')} is damaged (not an array's meta); {rundir.WAY_OUT}")
        for part, recorded in meta.get("files", {}).items():   # none: written before checksums were recorded
            rundir.check_file(_part(path, part), recorded, hashes)
        return meta

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        path = Path(path)
        return path.with_name(path.name + ".json").exists()


def _part(path: Path, part: str) -> Path:
    return path.with_name(f"{path.name}.json" if part == "json" else f"{path.name}.{part}.npy")
