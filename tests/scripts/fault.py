"""Run the real `tokenclean` CLI with one fault injected, as the world would inject it (no root needed).

FAULT selects it:
  enospc:<text>       fsync of a file whose path contains <text> fails with ENOSPC: a full disk (every durable write
                      here fsyncs, and on network filesystems that is where a full disk shows)
  eacces:<text>       opening a path that contains <text> for writing fails with EACCES: an unwritable directory
                      (chmod does not stop root, so it is simulated)
  interrupt:<stage>   Ctrl-C (KeyboardInterrupt) after the first optimiser step of training stage <stage>
"""
import builtins
import errno
import os
import sys

import tokenclean.train

kind, _, arg = os.environ["FAULT"].partition(":")

if kind == "enospc":
    real_fsync = os.fsync

    def fsync(fd):
        if arg in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    os.fsync = fsync
elif kind == "eacces":
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if arg in str(file) and any(c in mode for c in "wax+"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, mode, *args, **kwargs)
    builtins.open = open_
elif kind == "interrupt":
    fit = tokenclean.train.fit

    def fit_and_interrupt(accelerator, p, input_ids, keep, cfg, pad_id, on_step=None, desc="train", **kwargs):
        def step(i, metrics):
            on_step(i, metrics)
            if desc == arg:
                raise KeyboardInterrupt
        return fit(accelerator, p, input_ids, keep, cfg, pad_id, step, desc, **kwargs)
    tokenclean.train.fit = fit_and_interrupt
else:
    raise SystemExit(f"unknown FAULT {kind!r}")

from tokenclean.__main__ import main  # noqa: E402

sys.argv = ["tokenclean"] + sys.argv[1:]
main()
