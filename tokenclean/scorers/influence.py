"""Token Cleaning influence (Pang et al., ICML 2025): score = l_base - l_ref. High = the reference learned something
the base did not know. Fixed pipeline: the warm-up reference; self-evolving: the current model theta_t.
With selection=sample it is the reference code's offline "rho" baseline (the same score ranked within samples)."""
from __future__ import annotations

import numpy as np

from tokenclean.ragged import Ragged
from tokenclean.scorers import Scored, Scorer, Signals


def influence(base: Ragged, ref: Ragged) -> Ragged:
    """l_base - l_ref (NaN outside response tokens)."""
    assert base.same_layout(ref)
    return base.like(np.asarray(base.values, np.float32) - np.asarray(ref.values, np.float32))


def score(signals: Signals) -> Scored:
    return Scored(influence(signals.base_losses, signals.reference_losses))


SCORER = Scorer("influence", needs_reference=True, score=score)
