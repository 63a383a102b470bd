"""Run the real `tokenclean` CLI and SIGKILL this process at a chosen point, as a crash would.

KILL_AT selects the point:
  train:<stage>:<n>        after optimiser step n of a training stage (mid-training)
  slow:<stage>:<seconds>   no kill: a pause after every optimiser step of the stage (<stage> * = every stage), so
                           that a signal sent from outside lands mid-training however fast the machine
  checkpoint:<dir name>    a checkpoint's files are written, just before the rename that publishes it
  array:<name>             a per-token array's .npy files are written, before its .json (mid score/mask write)
  manifest:<stage>         the manifest naming <stage> is written to its temp file, before the rename
"""
import os
import signal
import sys
import time

import tokenclean.io
import tokenclean.models
import tokenclean.rundir
import tokenclean.train

kind, _, arg = os.environ["KILL_AT"].partition(":")


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if kind in ("train", "slow"):
    stage, n = arg.rsplit(":", 1)
    fit = tokenclean.train.fit

    def fit_and_die(accelerator, p, input_ids, keep, cfg, pad_id, on_step=None, desc="train", **kwargs):
        def step(i, metrics):
            on_step(i, metrics)
            if kind == "slow" and stage in (desc, "*"):
                time.sleep(float(n))
            elif desc == stage and i + 1 == int(n):
                die()
        return fit(accelerator, p, input_ids, keep, cfg, pad_id, step, desc, **kwargs)
    tokenclean.train.fit = fit_and_die
elif kind == "checkpoint":
    real_replace = os.replace

    class _OS:  # the module's `os`, with a replace that dies when it would publish the named checkpoint
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            if os.path.basename(str(dst)) == arg or str(dst).endswith("/" + arg):
                die()
            return real_replace(src, dst)
    tokenclean.models.os = _OS()
elif kind in ("array", "manifest"):
    real_atomic = tokenclean.io.atomic_write_text

    def atomic_and_die(path, text):
        if kind == "array" and str(path).endswith(f"/{arg}.json"):
            die()
        if kind == "manifest" and str(path).endswith("manifest.json") and f'"{arg}"' in text:
            with open(str(path) + ".partial", "w") as f:   # a half-written manifest next to it
                f.write(text[: len(text) // 2])
            die()
        return real_atomic(path, text)
    tokenclean.io.atomic_write_text = atomic_and_die
else:
    raise SystemExit(f"unknown KILL_AT {kind!r}")

from tokenclean.__main__ import main  # noqa: E402

sys.argv = ["tokenclean"] + sys.argv[1:]
main()
