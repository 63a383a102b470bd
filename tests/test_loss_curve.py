"""A pinned loss curve (torchtune's recipe tests): the tiny default job's every training loss, reference stage and
final stage, and its held-out losses. A change that alters training in any way (data order, masking, loss
normalisation, schedule, initialisation) fails here even where every other assertion still holds."""
import json

import pytest

from tests.cli import TINY, run_cli

REFERENCE = [6.9371246663701065, 6.952388934235074, 6.878307807736281, 6.803920664685838, 6.7353384941453776,
             6.687621287810496]
FINAL = [6.988961706199799, 6.984790741064297, 6.787250021229619, 6.708112332767572, 6.54039209680499,
         6.417063036151961, 6.333868980407715, 6.276118236222291, 6.1844598679315474, 6.246023720189145,
         5.984844207763672, 6.045501609578583, 5.869049400411626, 5.903974260602679, 5.6926347283041405,
         5.692091582436944, 5.7185681931515955, 5.589219396254595, 5.650090279339029, 5.75569524684874,
         5.582106564602744, 5.776048576306997]
EVAL = (6.952457904815674, 6.726660251617432, 6.220500946044922)   # base, reference, final


def test_the_tiny_default_jobs_loss_curve_is_pinned(tmp_path):
    run = tmp_path / "run"
    run_cli([*TINY, "training.log_every=1", "cache=false"], run)
    losses = {"reference": [], "final": []}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "train/loss" in m:
            losses[m["stage"]].append((m["train/step"], m["train/loss"]))
    assert [s for s, _ in losses["reference"]] == list(range(1, 7))
    assert [s for s, _ in losses["final"]] == list(range(7, 29))
    # rel 1e-6: the same CPU build gives the same bits; the margin only absorbs another CPU's vector width
    assert [x for _, x in losses["reference"]] == pytest.approx(REFERENCE, rel=1e-6)
    assert [x for _, x in losses["final"]] == pytest.approx(FINAL, rel=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens_kept"] == 6726
    assert (summary["eval_loss_before"], summary["eval_loss_reference"], summary["eval_loss_after"]) == \
        pytest.approx(EVAL, rel=1e-6)
