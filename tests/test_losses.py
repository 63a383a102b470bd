import numpy as np
import torch
import torch.nn.functional as F

from tests.conftest import random_examples
from tokenclean.losses import TokenLoss, collate, token_losses


def full_logits_losses(lm, input_ids, target):
    """The plain computation: full logits, shifted cross-entropy, one example at a time."""
    out = []
    for i in range(len(input_ids)):
        ids = torch.tensor(input_ids[i], dtype=torch.long)[None]
        with torch.no_grad():
            logits = lm(input_ids=ids).logits[0].float()
        ce = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none").numpy()
        row = np.full(len(ids[0]), np.nan, dtype=np.float32)
        t = np.asarray(target[i], dtype=bool)
        row[1:][t[1:]] = ce[t[1:]]
        out.append(row)
    return out


def test_token_losses_equal_full_logits(tiny_lm, accelerator):
    lm = tiny_lm(tie=True)
    ids, tgt = random_examples(13, seed=1)
    # a small chunk size forces several LM-head chunks per batch
    got = token_losses(accelerator, TokenLoss(lm, chunk_size=7), ids, tgt, batch_size=4, pad_id=0)
    want = full_logits_losses(lm, ids, tgt)
    for i in range(len(ids)):
        np.testing.assert_allclose(got[i], want[i], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert np.isnan(got.values).sum() == int((~tgt.values.astype(bool)).sum())


def test_batching_and_chunking_do_not_change_losses(tiny_lm, accelerator):
    lm = tiny_lm()
    ids, tgt = random_examples(9, seed=2)
    a = token_losses(accelerator, TokenLoss(lm, 10_000), ids, tgt, batch_size=1, pad_id=0)
    b = token_losses(accelerator, TokenLoss(lm, 3), ids, tgt, batch_size=9, pad_id=0)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_empty_mask_gives_connected_zero(tiny_lm):
    lm = tiny_lm()
    ids, tgt = random_examples(2, seed=3)
    batch = collate(ids, tgt, [0, 1], pad_id=0)
    batch["mask"][:] = False
    loss = TokenLoss(lm).train()(**batch).sum()
    assert loss.item() == 0.0
    loss.backward()   # connected to the graph: backward runs and reaches the LM head and the decoder
    assert lm.lm_head.weight.grad is not None and lm.model.layers[0].mlp.up_proj.weight.grad is not None
    assert lm.lm_head.weight.grad.abs().sum() == 0


def test_chunked_training_gradients_match_unchunked(tiny_lm):
    ids, tgt = random_examples(3, seed=4)
    batch = collate(ids, tgt, [0, 1, 2], pad_id=0)
    grads = []
    for chunk in (4, 10_000):
        lm = tiny_lm(seed=5)
        TokenLoss(lm, chunk).train()(**batch).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in lm.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
