"""The run directory: atomic writes, fingerprints, the manifest of completed stages, and the resume check.

A run directory belongs to one config and one dataset. `manifest.json` lists every completed stage with what it
measured; it is written (by rank 0, atomically) only after the stage's files, so it is the commit point: a stage
listed there is never redone, a stage not listed is redone from its start, replacing any partial output.

    run = RunDir(path, accelerator, config_dict, data_fingerprint, resume=True)
    if not run.done("reference"):
        with run.stage("reference") as st:
            ...                       # write the stage's files
            st.info["steps"] = 12     # recorded in the manifest with the stage's wall time
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("tokenclean")

CONFIG_KEYS_NOT_AFFECTING_RESULTS = ("resume", "tracking", "name", "eval")


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
    sees the old file or the whole new one, never a part. The temporary name is per process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def fsync_tree(path: Path) -> None:
    for p in Path(path).rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


class Stage:
    """What a running stage records: `info` goes into its manifest entry, with its wall time in `seconds`."""

    def __init__(self, name: str):
        self.name, self.info, self.started = name, {}, time.perf_counter()


class RunDir:
    def __init__(self, path: Path, accelerator, config_dict: dict, data_fingerprint: str, resume: bool):
        self.path, self.acc = Path(path), accelerator
        self.path.mkdir(parents=True, exist_ok=True)
        self._check_or_reset(config_dict, data_fingerprint, resume)
        self.manifest_path = self.path / "manifest.json"
        self.data = json.loads(self.manifest_path.read_text())
        if self.acc.is_main_process:
            import yaml
            atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config_dict, sort_keys=False))

    # -- the manifest ------------------------------------------------------------------------------------------
    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def get(self, stage: str) -> dict:
        return self.data["stages"][stage]

    @property
    def stages(self) -> dict:
        return self.data["stages"]

    @contextlib.contextmanager
    def stage(self, name: str):
        """Run one stage: on success, record it (its info and wall time) in the manifest, the commit point."""
        assert not self.done(name), f"stage {name} is already complete"
        st = Stage(name)
        yield st
        self.complete(name, seconds=round(time.perf_counter() - st.started, 2), **st.info)

    def complete(self, stage: str, **info) -> None:
        self.data["stages"][stage] = info
        self.save_manifest()

    def save_manifest(self) -> None:
        if self.acc.is_main_process:
            atomic_write_text(self.manifest_path, json.dumps(self.data, indent=1))
        self.acc.wait_for_everyone()

    # -- per-token arrays ----------------------------------------------------------------------------------------
    def save_array(self, array, rel: str, meta: dict) -> None:
        """A ragged array under the run directory (rank 0 writes; every rank waits for the file)."""
        if self.acc.is_main_process:
            array.save(self.path / rel, meta)
        self.acc.wait_for_everyone()

    def has_array(self, rel: str) -> bool:
        return (self.path / f"{rel}.json").exists()

    # -- a run directory belongs to one config and one dataset -----------------------------------------------------
    def _check_or_reset(self, config_dict: dict, data_fp: str, resume: bool) -> None:
        manifest = self.path / "manifest.json"
        config_fp = fingerprint(json.dumps({k: v for k, v in config_dict.items()
                                            if k not in CONFIG_KEYS_NOT_AFFECTING_RESULTS}, sort_keys=True))
        # every rank looks before rank 0 may write one: a rank that looked later would take the other branch below
        # and skip its barrier (the collectives then pair up wrongly and the run hangs)
        existed = manifest.exists()
        self.acc.wait_for_everyone()
        if existed:
            old = json.loads(manifest.read_text())
            same = old.get("config_fingerprint") == config_fp and old.get("data_fingerprint") == data_fp
            if resume and not same:
                what = "config" if old.get("config_fingerprint") != config_fp else "data"
                raise RuntimeError(
                    f"{self.path} holds a run made with a different {what}. Resume it with its own config "
                    f"({self.path / 'config.yaml'}), pick another directory (name=...), or start over there "
                    "with resume=false.")
            if not resume:
                self.acc.wait_for_everyone()
                if self.acc.is_main_process:
                    log.warning("resume=false: clearing %s", self.path)
                    for p in self.path.iterdir():
                        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                self.acc.wait_for_everyone()
            elif self.acc.is_main_process:
                log.info("resuming %s: completed stages %s", self.path, ", ".join(old["stages"]) or "none")
        if not existed or not resume:
            if self.acc.is_main_process:
                run_id = fingerprint(str(self.path.resolve()), time.time())[:12]
                atomic_write_text(manifest, json.dumps({"config_fingerprint": config_fp, "data_fingerprint": data_fp,
                                                        "run_id": run_id, "stages": {}}, indent=1))
            self.acc.wait_for_everyone()
