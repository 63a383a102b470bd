import numpy as np
import pytest
import torch

from tests.conftest import random_examples
from tokenclean.config import TrainingConfig
from tokenclean.losses import TokenLoss, collate
from tokenclean.ragged import Ragged
from tokenclean.train import micro_batches, plan_steps, train


def uneven_keep(tgt: Ragged, seed=0) -> Ragged:
    """A keep mask that keeps nothing in some examples and a random part of the others."""
    rng = np.random.default_rng(seed)
    keep = tgt.values.astype(bool) & (rng.random(len(tgt.values)) < 0.5)
    ex = tgt.example_ids()
    keep[(ex == 1) | (ex == 2)] = False
    return tgt.like(keep)


def run(tiny_lm, accelerator, micro, steps=1, clip=1e9, lr=1e-2):
    ids, tgt = random_examples(8, seed=7)
    keep = uneven_keep(tgt)
    lm = tiny_lm(seed=3)
    cfg = TrainingConfig(lr=lr, batch_size=8, micro_batch_size=micro, max_steps=steps, warmup_ratio=0.0,
                         max_grad_norm=clip, schedule="constant", mixed_precision="no")
    metrics = []
    train(accelerator, lm, ids, keep, cfg, seed=0, pad_id=0, on_step=lambda s, m: metrics.append(m))
    return lm, metrics, (ids, keep)


def test_micro_batch_split_gives_the_same_update(tiny_lm, accelerator):
    lm8, m8, (ids, keep) = run(tiny_lm, accelerator, micro=8, steps=2)
    lm2, m2, _ = run(tiny_lm, accelerator, micro=2, steps=2)
    for a, b in zip(lm8.parameters(), lm2.parameters()):
        # Adam divides by |g|: where g is ~1e-9 the summation order shows, hence atol of 1e-3 x lr
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the gradient is the mean over the step's kept tokens: compute it by hand with one full-batch forward
    ref = tiny_lm(seed=3)
    batch = collate(ids, keep, range(8), pad_id=0)
    losses = TokenLoss(ref).train()(**batch)
    (losses.sum() / int(keep.values.sum())).backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in ref.parameters())).item()
    assert m8[0]["train/grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert m2[0]["train/grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert m8[0]["train/loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert m8[0]["train/kept_tokens"] == int(keep.values.sum())


def test_step_with_no_kept_token_trains_nothing_and_does_not_fail(tiny_lm, accelerator):
    ids, tgt = random_examples(4, seed=1)
    lm = tiny_lm(seed=0)
    before = [p.detach().clone() for p in lm.parameters()]
    cfg = TrainingConfig(lr=1e-2, batch_size=4, micro_batch_size=2, warmup_ratio=0.0, mixed_precision="no")
    _, stats = train(accelerator, lm, ids, tgt.like(np.zeros(len(tgt.values), bool)), cfg, seed=0, pad_id=0)
    assert stats["steps"] == 1 and stats["train_loss"] == [0.0]
    # AdamW with weight decay 0 and a zero gradient leaves the weights where they were
    for a, b in zip(before, lm.parameters()):
        torch.testing.assert_close(a, b.detach())


def test_plan_and_micro_batches():
    cfg = TrainingConfig(batch_size=5, micro_batch_size=2, epochs=2)
    steps = plan_steps(12, cfg, seed=0)
    assert [len(s) for s in steps] == [5, 5, 2, 5, 5, 2]
    assert sorted(np.concatenate(steps[:3]).tolist()) == list(range(12))
    assert [s.tolist() for s in plan_steps(12, cfg, seed=0)[0:1]] == [steps[0].tolist()]
    # rank 1 of 2 gets the odd positions of the step, as 2 micro-batches (the second may be empty)
    step = np.array([10, 11, 12, 13, 14])
    assert [m.tolist() for m in micro_batches(step, 1, 2, 2, 2)] == [[11, 13], []]
    assert [m.tolist() for m in micro_batches(step, 0, 2, 2, 2)] == [[10, 12], [14]]


def test_same_seed_same_weights(tiny_lm, accelerator):
    a, _, _ = run(tiny_lm, accelerator, micro=4, steps=3)
    b, _, _ = run(tiny_lm, accelerator, micro=4, steps=3)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)
