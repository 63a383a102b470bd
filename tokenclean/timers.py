"""Where a run's time goes: wall and CPU seconds per part (load, train, eval, base_pass, reference_pass, select,
checkpoint, report, ...), each part's own time only (a part timed inside another is subtracted from it), so the
parts add up to the total. The Job times its building blocks; summary.json holds the result under "timers".

CPU seconds are this process's (all its threads): on a machine shared with other work they move less than wall
seconds do. A resumed run counts only what this process ran.
"""
from __future__ import annotations

import contextlib
import time


class Timers:
    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.open: list[list] = []    # [name, wall at start, cpu at start, wall of parts inside, cpu of parts inside]
        self.started = (time.perf_counter(), time.process_time())

    @contextlib.contextmanager
    def part(self, name: str, unless_in: tuple[str, ...] = ()):
        """Time the block as `name`, unless it runs inside one of `unless_in` (then it counts as that part: the
        held-out and base passes compute losses the same way a reference pass does)."""
        if self.open and self.open[-1][0] in unless_in:
            yield
            return
        self.open.append([name, time.perf_counter(), time.process_time(), 0.0, 0.0])
        try:
            yield
        finally:
            _, w0, c0, w_in, c_in = self.open.pop()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            self.wall[name] = self.wall.get(name, 0.0) + wall - w_in
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu - c_in
            if self.open:
                self.open[-1][3] += wall
                self.open[-1][4] += cpu

    def summary(self) -> dict:
        """{"wall": {part: s}, "cpu": {part: s}}, with "other" (whatever ran outside every part) and "total"."""
        out = {}
        for kind, parts, start, now in (("wall", self.wall, self.started[0], time.perf_counter()),
                                        ("cpu", self.cpu, self.started[1], time.process_time())):
            total = now - start
            out[kind] = {**{k: round(v, 2) for k, v in parts.items()},
                         "other": round(total - sum(parts.values()), 2), "total": round(total, 2)}
        return out
