"""Run the real `tokenclean` CLI with one rank sabotaged, to check that a multi-process run never hangs silently.

    accelerate launch --multi_gpu --num_processes 2 tests/dist/fail_rank.py MODE STAGE [tokenclean overrides...]

MODE  raise: the rank given by TOKENCLEAN_TEST_FAIL_RANK (default 1) raises when it starts training STAGE
      stall: that rank sleeps instead (as a rank stuck in I/O or a dead node would), so the other ranks wait in a
             collective until TOKENCLEAN_TIMEOUT expires
Test-only: the patch lives here, not in tokenclean.
"""
import os
import sys
import time

from tokenclean.pipelines import job

mode, fail_stage = sys.argv[1], sys.argv[2]
fail_rank = int(os.environ.get("TOKENCLEAN_TEST_FAIL_RANK", 1))
_fit = job.Job.fit


def sabotaged_fit(self, prepared, examples, keep, stage, *args, **kwargs):
    if stage == fail_stage and self.acc.process_index == fail_rank:
        print(f"rank {fail_rank}: injected {mode} at {stage}", file=sys.stderr, flush=True)
        if mode == "raise":
            raise RuntimeError(f"injected failure on rank {fail_rank} at {stage}")
        time.sleep(3600)
    return _fit(self, prepared, examples, keep, stage, *args, **kwargs)


job.Job.fit = sabotaged_fit

if __name__ == "__main__":
    from tokenclean.__main__ import main
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    main()
