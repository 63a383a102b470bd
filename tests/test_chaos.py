"""The chaos soak (issue 20, item 6) at test size: self-evolving runs on 2 processes, each interrupted by a targeted
fault and then by SIGKILL or SIGTERM at random moments until it finishes, end with the uninterrupted run's keep masks
and weights (within the 1-vs-2-process tolerance) and leave no temporary file. The full soak is
`python -m benchmarks.chaos` (results/chaos.md)."""
import pytest

from benchmarks import chaos


@pytest.mark.slow
def test_runs_interrupted_again_and_again_end_as_the_uninterrupted_one(tmp_path):
    targeted = [f for f in chaos.TARGETED if f[1] in ("checkpoint:model", ".state/", "manifest:round_1")]
    state = chaos.soak(3, seed=1, work=tmp_path, log_path=tmp_path / "soak.log", targeted=targeted)
    starts = [x for life in state["lives"] for x in life["starts"]]
    assert sum(x["rc"] != 0 for x in starts) >= 3          # every life was interrupted at least once
    assert all(life["starts"][0]["rc"] != 0 for life in state["lives"])
    for life in state["lives"]:
        r = life["result"]
        assert r is not None, life["starts"]                # finished within chaos.MAX_STARTS starts
        assert r["masks_equal"] and r["weights_within_tolerance"] and not r["leftovers"], r
