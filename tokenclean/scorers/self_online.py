"""Online self-evolving selection (ours): l_base (cached once) - l_current, ranked online in every training batch,
so there is no reference model and no reference pass. Fixed pipeline: the base trains with it from step 0;
self-evolving: round 0 trains on every token, rounds t >= 1 select online instead of scoring with theta_t."""
from __future__ import annotations

from tokenclean.scorers import Scorer


def learned_since_base(base, current):
    return base - current


SCORER = Scorer("self_online", online=True, cached="base", online_score=learned_since_base)
