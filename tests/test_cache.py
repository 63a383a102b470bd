"""The score cache (tokenclean/cache.py): runs that differ only in their selection reuse the base losses and the
warm-up reference; any changed input misses; a tampered entry is recomputed; a run outlives the cache.

Runs that must share an entry are points of one Hydra sweep: one process, so an edit to tokenclean's compute
modules between two separate commands (which rightly changes the key) cannot make these tests flaky."""
import json
import math
import multiprocessing
import os
import shutil

import numpy as np
import pytest

from tests.cli import TINY, load_array, run_cli, same_weights, stages

SMALL = [*TINY, "data.limit=120", "data.eval_size=16", "training.max_steps=3"]
SHARED = ("base_losses", "reference")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def sweep(args, sweep_dir, cache_dir, **kwargs):
    """A Hydra sweep, its points in sweep_dir/0, 1, ... in order."""
    proc = run_cli(["-m", *args, f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}"],
                   env={"TOKENCLEAN_CACHE": str(cache_dir)}, **kwargs)
    return proc, sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def assert_same_shared_results(run_dir, other):
    for rel in ("losses/base", "losses/reference"):
        a, b = load_array(run_dir / rel), load_array(other / rel)
        np.testing.assert_array_equal(a.offsets, b.offsets)
        np.testing.assert_array_equal(a.values, b.values)
    assert same_weights(run_dir / "reference", other / "reference")


def test_another_keep_ratio_reuses_base_losses_and_reference(tmp_path, cache):
    _, (first, second) = sweep([*SMALL, "selection.keep_ratio=0.6,0.3"], tmp_path / "sweep", cache)
    computed, st = stages(first), stages(second)
    assert list(st) == ["base_losses", "reference", "select", "final"]
    for s in SHARED:
        assert st[s]["cached"] is True and st[s]["cache_key"] == computed[s]["cache_key"]
    for k in ("eval_base", "eval_reference", "steps", "train_seconds", "final_train_loss", "score_seconds"):
        assert st["reference"][k] == computed["reference"][k]
    assert_same_shared_results(second, first)
    for run_dir, ratio in ((first, 0.6), (second, 0.3)):
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["tokens_kept"] == math.floor(ratio * summary["tokens_target"])
        assert int(load_array(run_dir / "keep").values.sum()) == summary["tokens_kept"]
    # the run's files are hardlinks of the cache's (one filesystem here): no copy, and the run keeps its own names
    weights = "reference/model.safetensors"
    assert (second / weights).stat().st_ino == (first / weights).stat().st_ino


@pytest.mark.parametrize("override, misses", [
    ("seed=42,7", SHARED),                          # other warm-up/eval splits and another training seed
    pytest.param("data.limit=120,100", SHARED, marks=pytest.mark.slow),  # other examples
    pytest.param("model.dtype=float32,bfloat16", SHARED, marks=pytest.mark.slow),  # other bits
    ("training.lr=0.002,0.001", ("reference",)),    # the base's losses do not depend on training
])
def test_a_changed_input_misses(tmp_path, cache, override, misses):
    args = [a for a in SMALL if a.split("=")[0] != override.split("=")[0]] + [override]
    _, (before, after) = sweep(args, tmp_path / "sweep", cache)
    a, b = stages(before), stages(after)
    assert {s: b[s]["cached"] for s in SHARED} == {s: s not in misses for s in SHARED}
    assert {s: a[s]["cache_key"] == b[s]["cache_key"] for s in SHARED} == {s: s not in misses for s in SHARED}


@pytest.mark.parametrize("tamper", [pytest.param("key", marks=pytest.mark.slow), "array"])
def test_a_tampered_entry_is_recomputed(tmp_path, cache, tamper):
    from tokenclean.cache import Key, ScoreCache
    env = {"TOKENCLEAN_CACHE": str(cache)}
    first, run_dir = tmp_path / "first", tmp_path / "run"
    run_cli(SMALL, first, env=env)
    entry = cache / "scores" / stages(first)["reference"]["cache_key"]
    if tamper == "key":
        key = entry / "key.json"
        assert '"lr":0.002' in key.read_text()
        key.write_text(key.read_text().replace('"lr":0.002', '"lr":0.003'))
    else:   # a new file in the entry's place: the first run's own file (a hardlink of the old one) stays intact
        f = entry / "files" / "reference_losses.values.npy"
        data = bytearray(f.read_bytes())
        data[-1] ^= 1
        f.unlink()
        f.write_bytes(data)
    proc = run_cli([*SMALL, "selection.keep_ratio=0.5"], run_dir, env=env)
    st = stages(run_dir)
    assert st["reference"]["cached"] is False
    assert_same_shared_results(run_dir, first)
    if st["reference"]["cache_key"] != entry.name:
        pytest.skip("tokenclean's compute modules were edited between the two runs: the key changed")
    assert "is not trusted" in proc.stderr
    assert ScoreCache(cache / "scores")._check(entry, Key("reference", (entry / "key.json").read_text()))[1] is None


def test_cache_false_neither_reads_nor_writes(tmp_path):
    run_dir = tmp_path / "run"
    run_cli([*SMALL, "cache=false"], run_dir, env={"TOKENCLEAN_CACHE": str(tmp_path / "cache")})
    assert all("cached" not in stages(run_dir)[s] for s in SHARED)
    assert not (tmp_path / "cache" / "scores").exists()


def test_deleting_the_cache_leaves_the_runs_whole(tmp_path):
    cache = tmp_path / "cache"
    _, (computed, reused) = sweep([*SMALL, "selection.keep_ratio=0.6,0.3"], tmp_path / "sweep", cache)
    assert stages(reused)["reference"]["cached"] is True
    shutil.rmtree(cache / "scores")
    assert_same_shared_results(reused, computed)
    rerun = run_cli([*SMALL, "selection.keep_ratio=0.3"], reused, env={"TOKENCLEAN_CACHE": str(cache)})
    assert "resuming" in rerun.stderr and "held-out loss" in rerun.stdout   # read every stored result back


# -- the cache alone -------------------------------------------------------------------------------------------------
def test_a_tampered_entry_is_not_trusted_and_is_replaced(tmp_path):
    from tokenclean.cache import ScoreCache
    (tmp_path / "a.bin").write_bytes(b"payload")
    c = ScoreCache(tmp_path / "c")
    key = c.key("test", {"x": 1})
    entry = tmp_path / "c" / key.name
    for tamper in ("key", "file", "entry"):
        c.put(key, {"a.bin": tmp_path / "a.bin"}, {"n": 1})
        assert c.restore(key, {"a": str(tmp_path / "out/a")}) == {"n": 1}
        if tamper == "key":
            (entry / "key.json").write_text(key.text.replace('"x":1', '"x":2'))
        elif tamper == "file":
            (entry / "files/a.bin").unlink()
            (entry / "files/a.bin").write_bytes(b"pAyload")
        else:
            (entry / "entry.json").write_text("{")
        assert c.restore(key, {"a": str(tmp_path / "out/a")}) is None, tamper
    c.put(key, {"a.bin": tmp_path / "a.bin"}, {"n": 1})   # replaces the bad entry
    assert c.restore(key, {"a": str(tmp_path / "out/a")}) == {"n": 1}
    assert (tmp_path / "out/a.bin").read_bytes() == b"payload"


def _publish(root, src, barrier):
    from tokenclean.cache import ScoreCache
    c = ScoreCache(root)
    barrier.wait()
    c.put(c.key("test", {"x": 1}), {"a.bin": src}, {"n": 1})


def test_concurrent_writers_publish_one_whole_entry(tmp_path):
    from tokenclean.cache import ScoreCache
    src = tmp_path / "a.bin"
    src.write_bytes(b"payload")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_publish, args=(tmp_path / "c", src, barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    c = ScoreCache(tmp_path / "c")
    assert [p.name for p in (tmp_path / "c").iterdir() if p.is_dir()] == [c.key("test", {"x": 1}).name]
    assert c.restore(c.key("test", {"x": 1}), {"a": str(tmp_path / "out/a")}) == {"n": 1}
    assert (tmp_path / "out/a.bin").read_bytes() == b"payload"
    assert c.restore(c.key("test", {"x": 2}), {}) is None


def test_a_full_cache_disk_is_a_warning_and_leaves_no_entry(tmp_path, monkeypatch, caplog):
    import errno

    from tokenclean import io
    from tokenclean.cache import ScoreCache
    (tmp_path / "a.bin").write_bytes(b"payload")
    c = ScoreCache(tmp_path / "c")
    key = c.key("test", {"x": 1})

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(io, "fsync_tree", full)
    c.put(key, {"a.bin": tmp_path / "a.bin"}, {"n": 1})   # no exception: the run goes on
    assert "could not store" in caplog.text and "No space left on device" in caplog.text
    assert list((tmp_path / "c").iterdir()) == []         # neither the entry nor its temporary directory
    assert c.restore(key, {"a": str(tmp_path / "out/a")}) is None
