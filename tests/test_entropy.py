"""The entropy scorer (no reference model): score = -H of the base model's next-token distribution. Exact on
hand-made inputs, on the tiny model against full logits, and end to end through the CLI in both pipelines."""
import json
import math

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM

from tests.cli import load_array, run_cli, stages
from tests.conftest import random_examples
from tokenclean.assets import resolve_model
from tokenclean.losses import TokenLoss, collate
from tokenclean.ragged import Ragged
from tokenclean.scorers import Signals, get

TINY = ["model=tiny", "tracking=none", "data.limit=64", "data.eval_size=8", "data.max_length=48", "scorer=entropy"]


def full_logit_entropy(lm, ids: np.ndarray) -> np.ndarray:
    """H at every position j >= 1 (the prediction of token j from x_<j), from the full logits, in float64."""
    with torch.no_grad():
        logits = lm(input_ids=torch.from_numpy(np.asarray(ids, np.int64))[None]).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1).numpy()


def test_score_is_minus_the_entropy_and_nan_off_the_response():
    h = Ragged.from_list([np.array([np.nan, 0.5, 2.0], np.float32), np.array([np.nan, 1.25], np.float32)], np.float32)
    scored = get("entropy").score(Signals(examples=None, base_entropy=h))
    np.testing.assert_array_equal(scored.scores.values, [np.nan, -0.5, -2.0, np.nan, -1.25])
    assert scored.keep is None and scored.weights is None
    spec = get("entropy")
    assert spec.base_entropy and not spec.needs_reference and not spec.online
    assert spec.pipelines == ("fixed", "self_evolving")


def test_a_uniform_prediction_has_entropy_log_vocab(tiny_lm):
    lm = tiny_lm(seed=1)
    torch.nn.init.zeros_(lm.lm_head.weight)          # every logit 0: the uniform distribution over 64 tokens
    ids, tgt = random_examples(4, seed=2)
    _, ent = TokenLoss(lm, 5)(**{k: v for k, v in collate(ids, tgt, range(4)).items()}, entropy=True)
    assert ent.shape[0] == int(tgt.values.sum())
    np.testing.assert_allclose(ent.numpy(), math.log(64), rtol=1e-6)


def test_chunked_entropy_equals_full_logits(tiny_lm):
    lm = tiny_lm(seed=4)
    with torch.no_grad():   # sharper predictions than the random init's near-uniform ones: entropies that differ
        lm.lm_head.weight.mul_(40)
    ids, tgt = random_examples(6, seed=5)
    _, ent = TokenLoss(lm, 7)(**collate(ids, tgt, range(6)), entropy=True)
    by_hand = np.concatenate([full_logit_entropy(lm, ids[i])[tgt[i][1:]] for i in range(6)])
    np.testing.assert_allclose(ent.numpy(), by_hand, rtol=1e-5, atol=1e-6)
    assert by_hand.std() > 0.1   # the positions really differ: not a constant passing by chance


def test_fixed_pipeline_keeps_the_most_certain_tokens(tmp_path):
    run = tmp_path / "fixed"
    run_cli(TINY, run)
    assert list(stages(run)) == ["base_losses", "select", "final"]   # no reference model is trained or loaded
    entropy, scores, keep = (load_array(run / p) for p in ("entropy/base", "scores", "keep"))
    target = ~np.isnan(load_array(run / "losses/base").values)
    np.testing.assert_array_equal(np.isnan(entropy.values), ~target)
    np.testing.assert_array_equal(scores.values[target], -entropy.values[target])
    n_kept = int(keep.values.sum())
    assert n_kept == math.floor(target.sum() * 0.6 + 1e-9)
    assert scores.values[keep.values].min() >= scores.values[target & ~keep.values].max()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens_kept"] == n_kept
    # the stored entropies are the base model's, computed here from its full logits
    ids = pq.read_table(run / "cleaned.parquet").column("input_ids").to_pylist()
    base = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny")).eval()   # the run's base
    for i in range(4):
        t = target[entropy.offsets[i]:entropy.offsets[i + 1]]
        np.testing.assert_allclose(entropy[i][t], full_logit_entropy(base, ids[i])[t[1:]], rtol=1e-5, atol=1e-5)


def test_self_evolving_scores_every_round_with_the_untouched_base(tmp_path):
    run = tmp_path / "evolving"
    run_cli([*TINY, "selection.keep_ratio=0.5", "data.eval_size=0", "pipeline=self_evolving", "pipeline.chunks=3"], run)
    assert not (run / "round_1/reference_losses.values.npy").exists()
    ids = pq.read_table(run / "cleaned.parquet").column("input_ids").to_pylist()   # the chunks, in order
    base = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny")).eval()   # the run's base
    first = 0
    for t, idx in enumerate(json.loads((run / "chunks.json").read_text())):
        if t > 0:
            h, scores, keep = (load_array(run / f"round_{t}/{p}") for p in ("base_entropy", "scores", "keep"))
            is_t = ~np.isnan(h.values)
            np.testing.assert_array_equal(scores.values[is_t], -h.values[is_t])
            assert int(keep.values.sum()) == math.floor(is_t.sum() * 0.5 + 1e-9)
            # the entropies are the base's (round t's reference, theta_t, is never asked), from its full logits
            for i in range(3):
                t_i = ~np.isnan(h[i])
                np.testing.assert_allclose(h[i][t_i], full_logit_entropy(base, ids[first + i])[t_i[1:]],
                                           rtol=1e-5, atol=1e-5)
        first += len(idx)
