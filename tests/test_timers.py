"""Timers: each part's own time, parts inside parts subtracted, the parts adding up to the total."""
import pytest

from tokenclean import timers as timers_mod
from tokenclean.timers import Timers


@pytest.fixture
def clock(monkeypatch):
    """A clock that moves only when told: wall and CPU advance together by `tick`."""
    now = [0.0]
    monkeypatch.setattr(timers_mod.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(timers_mod.time, "process_time", lambda: now[0] / 2)   # half the wall: one busy core of two

    def tick(seconds):
        now[0] += seconds
    return tick


def test_a_part_inside_another_counts_once_and_the_parts_add_up(clock):
    t = Timers()
    clock(1)                                # outside every part: "other"
    with t.part("train"):
        clock(2)
        with t.part("eval"):
            clock(3)
        clock(4)
    with t.part("eval"):                    # a part's times add up over its uses
        clock(5)
    s = t.summary()
    assert s["wall"] == {"train": 6.0, "eval": 8.0, "other": 1.0, "total": 15.0}
    assert s["cpu"] == {"train": 3.0, "eval": 4.0, "other": 0.5, "total": 7.5}


def test_unless_in_folds_a_part_into_the_one_it_runs_in(clock):
    t = Timers()
    with t.part("base_pass"):
        with t.part("reference_pass", unless_in=("eval", "base_pass")):
            clock(2)
    with t.part("reference_pass", unless_in=("eval", "base_pass")):
        clock(3)
    assert t.summary()["wall"] == {"base_pass": 2.0, "reference_pass": 3.0, "other": 0.0, "total": 5.0}


def test_a_part_that_raises_is_still_counted(clock):
    t = Timers()
    with pytest.raises(RuntimeError), t.part("load"):
        clock(2)
        raise RuntimeError("boom")
    assert t.summary()["wall"]["load"] == 2.0 and t.open == []
