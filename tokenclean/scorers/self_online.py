"""Online self-evolving selection: l_base (cached once) - l_current, ranked online in every training batch, so there
is no reference model and no reference pass. This is ssToken's retrospective excess loss (arXiv 2510.18250, ICLR
2026; jianke0604/ssToken) with the base as the history model, as its released code has it, and without its
attention term; what tokenclean adds is running it in both pipelines on cached base losses.
Fixed pipeline: the base trains with it from step 0; self-evolving: round 0 trains on every token, rounds t >= 1
select online instead of scoring with theta_t."""
from __future__ import annotations

from tokenclean.scorers import Scorer


def learned_since_base(base, current):
    return base - current


SCORER = Scorer("self_online", online=True, cached="base", online_score=learned_since_base)
