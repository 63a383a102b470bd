"""The per-token arrays a run stores, named in one place: where each lives in the run directory (Ragged arrays:
<rel>.values.npy, <rel>.offsets.npy, <rel>.json) and which of them carry the base model's fingerprint.

  the fixed pipeline's pool (POOL)           round t's chunk (chunk(t))      what
  losses/base, entropy/base                  round_t/base_losses, _entropy   the untouched base's losses, entropies
  losses/reference                           round_t/reference_losses        the reference's losses
  scores, keep, <scorer arrays>              round_t/scores, keep, ...       the scorer's answer and the decision
  train_weights                              round_t/train_weights           the weights training gave it per step

Self-evolving's rounds take their base signals from one pass over every chunk (or, with first_reference=warmup,
the rows of the pool's), and its first round's reference losses from the pool's (the warm-up reference's).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arrays:
    prefix: str                 # of the decision and the scorer's own arrays: "" or "round_<t>/"
    base_losses: str            # l(x_j; base): depends on the data, the tokenizer and the base model
    base_entropy: str           # entropy of the base's prediction at j, from the same pass
    reference_losses: str       # l(x_j; reference)

    @property
    def scores(self) -> str:
        return self.prefix + "scores"

    @property
    def keep(self) -> str:      # the keep mask (bool) or soft weights (float32)
        return self.prefix + "keep"

    @property
    def train_weights(self) -> str:   # the signed weight each token carried when last trained, where the scorer
        return self.prefix + "train_weights"   # weighs its decision per step (Scorer.step_weights: Forgetting)

    def scorer_array(self, rel: str) -> str:
        """A scorer's extra array (Scored.arrays, Scorer.reasons), beside the scores."""
        return self.prefix + rel

    def base(self, kind: str) -> str:
        return {"losses": self.base_losses, "entropy": self.base_entropy}[kind]


POOL = Arrays("", "losses/base", "entropy/base", "losses/reference")


def chunk(t: int) -> Arrays:
    return Arrays(f"round_{t}/", f"round_{t}/base_losses", f"round_{t}/base_entropy", f"round_{t}/reference_losses")


def carries_base_fingerprint(rel: str) -> bool:
    """The base's own signals are refused on load when the base model changed; every array is refused when the data
    or the tokenizer did."""
    return rel in (POOL.base_losses, POOL.base_entropy) or rel.endswith(("/base_losses", "/base_entropy"))
