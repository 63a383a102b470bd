"""The run directory: one run at a time, atomic writes, checksums, the manifest of completed stages, resume.

A run directory belongs to one config and one dataset. `manifest.json` lists every completed stage with what it
measured; it is written (by rank 0, atomically) only after the stage's files, so it is the commit point: a stage
listed there is never redone, a stage not listed is redone from its start, replacing any partial output.

    run = RunDir(path, accelerator, config_dict, data_fingerprint, resume=True,
                 verify_array=check)   # check(path) raises if a stored per-token array is damaged
    if not run.done("reference"):
        with run.stage("reference") as st:
            ...                       # write the stage's files
            st.info["steps"] = 12     # recorded in the manifest with the stage's wall time

One run per directory: rank 0 holds `<run>/.lock` (host, pid, start time) while the run lives, taken first of all
(lock_early: before any data is read or model resolved); a second run on the directory refuses at once, naming the
holder. A lock whose holder is dead is taken over: on the same host when its
pid is gone (or belongs to a newer process), from another host (a shared filesystem) when the holder has not
refreshed the file's mtime for LOCK_STALE_S (it does so every LOCK_HEARTBEAT_S from a thread; the hosts' clocks
must agree to within minutes).

Nothing damaged is used: the manifest carries a checksum of itself, every per-token array records its files' sizes
and hashes (ragged.py), every checkpoint holds `checksums.json` (models.py), each stage lists the arrays it wrote;
all of it is checked when read (arrays and checkpoints: hashed; at open: the manifest, that every array of a
completed stage is there at its size, and every checkpoint). Hashes are BLAKE2b of the whole file up to 64 MiB, and
for larger files (checkpoints) of its size, first and last MiB and 14 evenly spaced MiB in between: truncation,
replacement and most overwrites are caught without reading 100 GB, a single flipped bit in an unread block is not.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import os
import pickle
import shutil
import socket
import threading
import time
from pathlib import Path

from tokenclean import io
from tokenclean.config import UserError

log = logging.getLogger("tokenclean")

# keys (dotted) whose values never change what a completed stage computed: a rerun that changes them resumes the run.
# pipeline.train_final only says whether the final stage runs: a score-only run goes on to train it when set true.
CONFIG_KEYS_NOT_AFFECTING_RESULTS = ("resume", "tracking", "name", "eval", "pipeline.train_final")


def affects_results(key: str) -> bool:
    return not any(key == k or key.startswith(k + ".") for k in CONFIG_KEYS_NOT_AFFECTING_RESULTS)


def results_config(d: dict, prefix: str = "") -> dict:
    """The config without the keys that do not affect results (what a run directory's identity is made of)."""
    return {k: results_config(v, f"{prefix}{k}.") if isinstance(v, dict) else v for k, v in d.items()
            if affects_results(f"{prefix}{k}")}
WAY_OUT = "restore it, or start the run over with resume=false (which clears the run directory)"
CHECKSUMS = "checksums.json"
LOCK, LOCK_HEARTBEAT_S, LOCK_STALE_S = ".lock", 60, 600


class RunDirError(UserError, ValueError):
    """The run directory cannot be used as it is; the message says why and the way out (printed as one line)."""


class DamagedError(RunDirError):
    """A stored file is missing, truncated or altered since it was written."""


class LockedError(RunDirError):
    """Another live run holds the run directory."""


# -- checking files ----------------------------------------------------------------------------------------------
def check_file(path: str | os.PathLike, recorded: dict, hashes: bool = True) -> None:
    """Raise DamagedError unless `path` still has the size (and, with `hashes`, the hash) recorded when written."""
    path = Path(path)
    if not path.is_file():
        raise DamagedError(f"{path} is missing; {WAY_OUT}")
    size = path.stat().st_size
    if size != recorded["size"]:
        raise DamagedError(f"{path} is damaged ({size} bytes, {recorded['size']} when written); {WAY_OUT}")
    if hashes and io.file_digest(path) != recorded:
        raise DamagedError(f"{path} is damaged (its content changed since it was written); {WAY_OUT}")


def write_checksums(directory: Path) -> None:
    """Record every file of a directory about to be published (a checkpoint) in its checksums.json."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    io.atomic_write_text(directory / CHECKSUMS, json.dumps(
        {str(p.relative_to(directory)): io.file_digest(p) for p in files}, indent=1))


def check_checksums(directory: Path) -> None:
    """Verify a directory against its checksums.json (nothing to do without one)."""
    directory = Path(directory)
    if (directory / CHECKSUMS).exists():
        for rel, recorded in read_json(directory / CHECKSUMS).items():
            check_file(directory / rel, recorded)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedError(f"{path} is damaged (not valid JSON: {e}); {WAY_OUT}") from None


# -- one run per directory -------------------------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """The start time of a process (Linux clock ticks since boot): a pid reused by a newer process differs."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class RunLock:
    """`<run>/.lock` (JSON: host, pid, its start time, when), refreshed by a heartbeat, removed on release or at
    exit. Use RunLock.acquire(run_dir). A lock seen empty (being written, or its writer died) has no known holder:
    it counts as another host's."""

    def __init__(self, path: Path, content: bytes):
        self.path, self.content, self.stop = path, content, threading.Event()
        threading.Thread(target=self._heartbeat, daemon=True, name="tokenclean-lock").start()
        atexit.register(self.release)

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        lock = Path(run_dir) / LOCK
        me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        content = json.dumps(me).encode()
        for _ in range(5):
            if cls._create(lock, content):
                return cls(lock, content)
            try:
                seen = lock.read_bytes()
                stale = cls._stale(lock, seen)
            except FileNotFoundError:
                continue                                   # released meanwhile: try again
            if not stale:
                raise LockedError(f"{run_dir} is in use by another run ({cls.describe(seen)}; lock {lock}). Wait "
                                  "for it to end or choose another directory (name=... or hydra.run.dir=...)")
            # take it over: move it aside under our own name first, so that of two processes judging the same stale
            # lock only one removes it, and a fresh lock created meanwhile is put back rather than removed
            aside = lock.with_name(f"{LOCK}.stale{os.getpid()}")
            try:
                os.rename(lock, aside)
            except FileNotFoundError:
                continue
            if aside.read_bytes() != seen:
                with contextlib.suppress(OSError):
                    os.link(aside, lock)
            else:
                log.warning("taking over the lock of a dead run (%s: %s)", cls.describe(seen), stale)
            aside.unlink()
        raise LockedError(f"{run_dir}: could not take {lock}, other processes keep taking it")

    @staticmethod
    def _create(lock: Path, content: bytes) -> bool:
        """Create the lock if there is none ("x": O_EXCL, atomic on local filesystems and NFS v3+)."""
        try:
            with open(lock, "xb") as f:
                try:
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
                except OSError:
                    lock.unlink()
                    raise
            return True
        except FileExistsError:
            return False
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(lock)) from e

    @staticmethod
    def _stale(lock: Path, seen: bytes) -> str | None:
        """Why the lock's holder is dead, or None while it may be alive."""
        try:
            holder = json.loads(seen)
        except ValueError:
            holder = None                                  # being written, or its writer died: judged by its age
        holder = holder if isinstance(holder, dict) else {}
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
            age = time.time() - lock.stat().st_mtime
            return f"no heartbeat for {age:.0f} s" if age > LOCK_STALE_S else None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"pid {pid} is not running"
        except PermissionError:
            pass                                           # alive, another user's
        start = _process_start(pid)
        if holder.get("pid_start") and start and start != holder["pid_start"]:
            return f"pid {pid} is now another process"
        return None

    @staticmethod
    def describe(seen: bytes) -> str:
        try:
            h = json.loads(seen)
            return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
        except (ValueError, KeyError, TypeError):
            return "holder unknown"

    def _heartbeat(self) -> None:
        lost = False
        while not self.stop.wait(LOCK_HEARTBEAT_S):
            try:
                if self.path.read_bytes() != self.content:
                    raise FileNotFoundError
                os.utime(self.path)
            except OSError:
                if not lost:
                    log.error("%s was removed or taken over by another run; this run no longer owns the directory",
                              self.path)
                lost = True

    def release(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            if self.path.read_bytes() == self.content:    # ours still (not taken over after a stall)
                self.path.unlink()


_held: dict[Path, RunLock | None] = {}   # run directories this process's run holds (None: held by its rank 0)
_early: dict[Path, RunLock] = {}         # taken by lock_early, not yet announced to the other ranks by lock_run


def lock_early(path: str | os.PathLike) -> None:
    """Rank 0 of the launch (RANK in the environment, as accelerate launch and torchrun set it; else SLURM_PROCID,
    as srun sets it before dist.slurm_to_torch_env has run; neither: one process) takes the run directory's lock
    before the job reads any data, resolves any model or starts a process group: a second run is refused at once,
    whatever the size of its pool. If it is refused, rank 0 exits and the launcher ends the other ranks (they wait
    for it at the process group's start)."""
    path = Path(path).absolute()
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    if rank == 0 and path not in _held and path not in _early:
        path.mkdir(parents=True, exist_ok=True)
        _early[path] = RunLock.acquire(path)


def lock_run(path: str | os.PathLike, accelerator) -> None:
    """Rank 0 takes the run directory's lock (or keeps the one lock_early took; a no-op when this run holds it
    already); every rank learns whether it did, so a refusal ends every rank at once. Every rank must call it (a
    collective when there are several)."""
    path = Path(path).absolute()
    if path in _held:
        return

    def take():
        if path in _early:
            return _early.pop(path)
        path.mkdir(parents=True, exist_ok=True)
        return RunLock.acquire(path)
    _held[path] = on_main(accelerator, take)


def end_run() -> None:
    """This process's run is over: release its lock (now, not at exit: a Hydra sweep runs its jobs one after the
    other in one process) and forget it."""
    for lock in [*_held.values(), *_early.values()]:
        if lock is not None:
            lock.release()
    _held.clear()
    _early.clear()
    RunDir.active = None


def on_main(accelerator, fn):
    """fn() on rank 0 alone; every rank returns once it is done, or raises its error (a broadcast, so the other
    ranks never wait at a barrier rank 0 will not reach). Returns fn's result on rank 0, None elsewhere."""
    result, err = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001  re-raised below, on every rank
            err = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        try:
            sent = pickle.loads(pickle.dumps(err))
        except Exception:  # noqa: BLE001
            sent = RuntimeError(f"rank 0 failed: {type(err).__name__}: {err}")
        sent = broadcast_object_list([sent])[0]
        err = err if accelerator.is_main_process else sent
    if err is not None:
        raise err
    return result


def config_changes(saved: Path, now: dict, most: int = 6) -> str:
    """': key: OLD in the run, NEW now; ...' for the result-affecting keys that differ between the run's saved
    config.yaml and `now` (empty when the file is unreadable: the refusal still names the file)."""
    import yaml

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if not affects_results(key):
                continue
            out.update(flat(v, f"{key}.") if isinstance(v, dict) else {key: v})
        return out
    try:
        old = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError):
        return ""
    if not isinstance(old, dict):
        return ""
    a, b = flat(old), flat(now)
    diff = [f"{k}: {a.get(k, '(unset)')} in the run, {b.get(k, '(unset)')} now" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]
    more = f"; and {len(diff) - most} more" if len(diff) > most else ""
    return f" ({'; '.join(diff[:most])}{more})" if diff else ""


def input_changes(old: dict, now: dict) -> list[str]:
    """One phrase per input whose fingerprint differs between a run's manifest (`old`) and this run (`now`): its
    name, its path and what changed (the path, the record count, the size, or the content alone)."""
    out = []
    for name, new in now.items():
        was = old.get(name)
        if was is None or was.get("fingerprint") == new.get("fingerprint"):
            continue
        if was.get("path") != new.get("path"):
            out.append(f"{name}: {was.get('path')} in the run, {new.get('path')} now")
            continue
        where = f"{name} ({new.get('path')})"
        for key in ("records", "bytes"):
            if was.get(key) is not None and new.get(key) is not None and was[key] != new[key]:
                out.append(f"{where}: {was[key]:,} {key} in the run, {new[key]:,} now")
                break
        else:
            same = " (the same size and record count)" if "records" in new else ""
            out.append(f"{where}: its content changed since the run started{same}")
    return out


# -- the run directory -------------------------------------------------------------------------------------------
class Stage:
    """What a running stage records: `info` goes into its manifest entry, with its wall time in `seconds`."""

    def __init__(self, name: str):
        self.name, self.info, self.started, self.arrays = name, {}, time.perf_counter(), []


class RunDir:
    active: "RunDir | None" = None   # this process's run, for saying where it stopped (__main__)

    def __init__(self, path: Path, accelerator, config_dict: dict, data_fingerprint: str, resume: bool,
                 verify_array, inputs: dict | None = None):
        """verify_array(path): raises if the per-token array stored at `path` is incomplete or damaged (on resume,
        every completed stage's arrays are checked before anything runs). inputs: what the run reads besides its
        config, {name: {"fingerprint": ..., "path": ..., and "records"/"bytes" for data files}}: part of the run's
        identity, so a resume refused for a changed input names it and what changed (input_changes)."""
        self.path, self.acc, self.running, self.stopped_in = Path(path), accelerator, [], None
        self.verify_array = verify_array
        self.manifest_path = self.path / "manifest.json"
        lock_run(self.path, accelerator)
        on_main(accelerator, lambda: self._open(config_dict, data_fingerprint, resume, inputs or {}))
        self.data = read_manifest(self.manifest_path)
        RunDir.active = self

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
        """Run one stage: on success, record it (its info, wall time and arrays) in the manifest, the commit point."""
        assert not self.done(name), f"stage {name} is already complete"
        st = Stage(name)
        self.running.append(st)
        try:
            yield st
            self.complete(name, seconds=round(time.perf_counter() - st.started, 2), **st.info,
                          **({"arrays": st.arrays} if st.arrays else {}))
        except BaseException:
            self.stopped_in = self.stopped_in or name      # the innermost stage ends first
            raise
        finally:
            self.running.remove(st)

    def complete(self, stage: str, **info) -> None:
        self.data["stages"][stage] = info
        self.save_manifest()

    def save_manifest(self) -> None:
        on_main(self.acc, lambda: write_manifest(self.manifest_path, self.data))

    def where(self) -> str:
        """Where the run stopped, for a message."""
        at = f"in stage {self.stopped_in!r}" if self.stopped_in else "between stages"
        return (f"The run in {self.path} stopped {at}; the same command resumes it "
                f"(completed stages kept: {', '.join(self.stages) or 'none'}).")

    # -- per-token arrays ----------------------------------------------------------------------------------------
    def save_array(self, array, rel: str, meta: dict) -> None:
        """A ragged array under the run directory (rank 0 writes; every rank waits for the file), listed with the
        innermost running stage."""
        on_main(self.acc, lambda: array.save(self.path / rel, meta))
        if self.running:
            self.running[-1].arrays.append(rel)

    def has_array(self, rel: str) -> bool:
        return (self.path / f"{rel}.json").exists()

    # -- opening: a run directory belongs to one config and one dataset --------------------------------------------
    def _open(self, config_dict: dict, data_fp: str, resume: bool, inputs: dict) -> None:
        """On rank 0, holding the lock: no other process writes here."""
        for p in list(self.path.rglob(".*.tmp*")):  # left by a killed run: never read, removed
            if io.STALE_TEMP.match(p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        config_fp = io.fingerprint(json.dumps(results_config(config_dict), sort_keys=True))
        old = read_manifest(self.manifest_path) if self.manifest_path.exists() and resume else None
        if old is not None:
            changes = input_changes(old.get("inputs", {}), inputs)
            why = None
            if old.get("config_fingerprint") != config_fp:
                why = f"a different config{config_changes(self.path / 'config.yaml', config_dict)}"
            elif changes:
                why = f"different inputs ({'; '.join(changes)})"
            elif old.get("data_fingerprint") != data_fp:
                why = "different data (the tokenized pool, eval or warm-up set differ)"
            if why and not old["stages"] and not any(self.path.glob("*.state")):   # nothing done, nothing half-done
                log.info("%s: no stage of its run completed; starting it afresh with this config", self.path)
                old = None
            elif why:
                raise RunDirError(
                    f"{self.path} holds a run made with {why}. Resume it with its own config "
                    f"({self.path / 'config.yaml'}) and inputs, pick another directory (name=...), or start over "
                    "there with resume=false.")
        if old is not None:
            self._check_files(old)
            log.info("resuming %s: completed stages %s", self.path, ", ".join(old["stages"]) or "none")
        else:
            if self.manifest_path.exists() and not resume:
                log.warning("resume=false: clearing %s", self.path)
                for p in self.path.iterdir():
                    if p.name != LOCK:
                        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            run_id = io.fingerprint(str(self.path.resolve()), time.time())[:12]
            write_manifest(self.manifest_path, {"config_fingerprint": config_fp, "data_fingerprint": data_fp,
                                                "inputs": inputs, "run_id": run_id, "stages": {}})
        import yaml
        io.atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config_dict, sort_keys=False))

    def _check_files(self, manifest: dict) -> None:
        """Every array of a completed stage is there at its recorded size (hashed when loaded); every checkpoint
        matches its checksums."""
        for info in manifest["stages"].values():
            for rel in info.get("arrays", ()):
                self.verify_array(self.path / rel)
        for marker in self.path.rglob(CHECKSUMS):
            check_checksums(marker.parent)


def write_manifest(path: Path, data: dict) -> None:
    body = {k: v for k, v in data.items() if k != "checksum"}
    checksum = io.fingerprint(json.dumps(body, sort_keys=True))
    io.atomic_write_text(path, json.dumps({**body, "checksum": checksum}, indent=1))


def read_manifest(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        raise DamagedError(f"{path} is damaged (not a manifest); {WAY_OUT}")
    body = {k: v for k, v in data.items() if k != "checksum"}
    if "checksum" in data and data["checksum"] != io.fingerprint(json.dumps(body, sort_keys=True)):  # none: older
        raise DamagedError(f"{path} is damaged (its checksum does not match its content); {WAY_OUT}")
    return body
