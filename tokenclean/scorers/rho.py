"""Rho-1 selective language modelling (Lin et al., NeurIPS 2024): excess loss l_current - l_ref, ranked online in
every training batch (tokenclean/scorers/online.py). The reference is the fixed pipeline's warm-up model; its
per-token losses are computed once and cached, the current losses come from the training forward itself."""
from __future__ import annotations

from tokenclean.scorers import Scorer


def excess_loss(reference, current):
    return current - reference


SCORER = Scorer("rho", needs_reference=True, uses_base=False, online=True, pipelines=("fixed",),
                cached="reference", online_score=excess_loss)
