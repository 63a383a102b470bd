"""Per-token arrays for a ragged set of examples: one flat array plus offsets.

Every per-token quantity in tokenclean (token ids, target masks, losses, scores, keep masks, XTF attributes)
is a `Ragged`: `values[offsets[i]:offsets[i+1]]` belongs to example i and position j inside it is token j of
that example, so a loss at position j is the loss of predicting token j from tokens < j (NaN where no loss was
computed: position 0 and prompt tokens). Stored as `.npy` (memory-mappable) plus a JSON sidecar holding the
fingerprints of what produced it; reading checks them, so an array computed for other data or another model is
never used silently. Writes are atomic: a file is either complete or absent.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenclean import rundir


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
        path.parent.mkdir(parents=True, exist_ok=True)
        for part, array in (("values", self.values), ("offsets", self.offsets)):
            rundir.atomic_write(path.with_name(f"{path.name}.{part}.npy"),
                                lambda f, a=array: np.save(f, np.ascontiguousarray(a)))
        rundir.atomic_write_text(path.with_name(path.name + ".json"), json.dumps(meta, indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | os.PathLike, expect: dict | None = None, mmap: bool = True) -> "Ragged":
        """Read an array saved by `save`; every key of `expect` must equal the stored meta."""
        path = Path(path)
        meta_path = path.with_name(path.name + ".json")
        if not meta_path.exists():  # the meta is written last: without it the array is incomplete
            raise FileNotFoundError(f"{path}: no complete per-token array here (missing {meta_path.name})")
        meta = json.loads(meta_path.read_text())
        for key, want in (expect or {}).items():
            if meta.get(key) != want:
                raise ValueError(
                    f"{path}: stored {key}={meta.get(key)!r} does not match the current {want!r}; "
                    "it was computed for other data or another model. Delete it or start the run with resume=false.")
        mode = "r" if mmap else None
        values = np.load(path.with_name(path.name + ".values.npy"), mmap_mode=mode)
        offsets = np.load(path.with_name(path.name + ".offsets.npy"))
        return cls(values, offsets)

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        path = Path(path)
        return path.with_name(path.name + ".json").exists()
