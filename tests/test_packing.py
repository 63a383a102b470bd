"""Packed batches (several examples to a row, position_ids restarting per example, no attention_mask) give the padded
layout's losses, entropies and gradients, on transformers' sdpa and eager attention."""
import numpy as np
import pytest
import torch

from tests.cli import TINY, load_array, run_cli
from tests.conftest import random_examples
from tokenclean import losses as L
from tokenclean.dist import batch_or_placeholder
from tokenclean.losses import TokenLoss, collate, length_batches, packed_batches, token_losses
from tokenclean.ragged import Ragged


def uneven_examples(n=6, seed=0):
    """Lengths from 2 to 100 tokens, and a last one of 1 token (no target: nothing to predict it from)."""
    ids, tgt = random_examples(n, seed=seed, min_len=2, max_len=100, prompt=1)
    return (Ragged.from_list([*(ids[i] for i in range(n)), ids[0][:1]], np.int32),
            Ragged.from_list([*(tgt[i] for i in range(n)), tgt[0][:1]], bool))


def float_weights(tgt, seed=0):
    """Weights in (0, 1] on most targets, exactly 0 on some (those positions are dropped from the batch)."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.1, 1.0, len(tgt.values)).astype(np.float32) * tgt.values
    w[rng.random(len(w)) < 0.2] = 0
    return tgt.like(w)


@pytest.fixture(params=["sdpa", "eager"])
def lm_factory(request, tiny_lm):
    def make(seed=0):
        lm = tiny_lm(seed=seed)
        lm.set_attn_implementation(request.param)
        return lm
    return make


def test_packed_layout():
    """Whole examples in order, several to a row as wide as the longest; position_ids restart for each example."""
    ids = Ragged.from_list([np.arange(1, n + 1) for n in (3, 2, 6, 1, 4, 2)], np.int32)
    tgt = ids.like(np.ones(len(ids.values), bool))     # even a target at position 0 is never selected
    b = collate(ids, tgt, range(6), pad_id=0, packed=True)
    assert set(b) == {"input_ids", "position_ids", "mask"}
    np.testing.assert_array_equal(b["input_ids"], [[1, 2, 3, 1, 2, 0],
                                                    [1, 2, 3, 4, 5, 6],
                                                    [1, 1, 2, 3, 4, 0],
                                                    [1, 2, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b["position_ids"], [[0, 1, 2, 0, 1, 5],
                                                       [0, 1, 2, 3, 4, 5],
                                                       [0, 0, 1, 2, 3, 5],
                                                       [0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(b["mask"], [[0, 1, 1, 0, 1, 0],
                                               [0, 1, 1, 1, 1, 1],
                                               [0, 0, 1, 1, 1, 0],
                                               [0, 1, 0, 0, 0, 0]])


@pytest.mark.parametrize("chunk", [7, 10_000])
def test_packed_losses_entropies_weights_equal_padded(lm_factory, chunk):
    lm = lm_factory()
    ids, tgt = uneven_examples()
    w = float_weights(tgt)
    idx = np.argsort(-ids.lengths)
    out = {}
    for packed in (False, True):
        b = collate(ids, w, idx, pad_id=0, packed=packed)
        assert len(b["input_ids"]) < len(idx) if packed else len(b["input_ids"]) == len(idx)
        with torch.no_grad():
            losses, ent = TokenLoss(lm, chunk)(**{k: v for k, v in b.items() if k != "weights"}, entropy=True)
        out[packed] = losses, ent, b["weights"]
    assert len(out[True][0]) == len(out[True][2]) == int((w.values != 0).sum())   # w is 0 at every position 0
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_packed_gradients_equal_padded(lm_factory):
    ids, tgt = uneven_examples(seed=0)
    w = float_weights(tgt, seed=1)
    grads = []
    for packed in (False, True):
        lm = lm_factory(seed=5)
        b = collate(ids, w, range(len(ids)), pad_id=0, packed=packed)
        weights = b.pop("weights")
        (TokenLoss(lm, chunk_size=16).train()(**b) * weights).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in lm.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


def test_one_row_layout_equals_padded(lm_factory):
    """The packed rows flattened into one (what TokenLoss gives flash-attention) still keep each example apart."""
    lm = lm_factory()
    ids, tgt = uneven_examples(seed=2)
    b = collate(ids, tgt, range(len(ids)), packed=True)
    one = {k: v.reshape(1, -1) for k, v in b.items()}
    assert len(b["input_ids"]) > 1
    with torch.no_grad():
        want = TokenLoss(lm)(**collate(ids, tgt, range(len(ids))))
        torch.testing.assert_close(TokenLoss(lm)(**one), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(TokenLoss(lm)(**b), want, rtol=1e-5, atol=1e-5)


def test_packed_first_tokens_are_never_targets(tiny_lm):
    """TokenLoss itself drops every example's first position (position_ids 0), whatever `mask` says."""
    lm = tiny_lm()
    ids, tgt = uneven_examples()
    b = collate(ids, tgt, range(len(ids)), packed=True)
    firsts = dict(b, mask=b["mask"] | (b["position_ids"] == 0))
    assert firsts["mask"].sum() == b["mask"].sum() + len(ids) and len(b["mask"]) < len(ids)
    with torch.no_grad():
        torch.testing.assert_close(TokenLoss(lm)(**firsts), TokenLoss(lm)(**b), rtol=0, atol=0)


def test_empty_packed_batch_gives_connected_zero(tiny_lm):
    lm = tiny_lm()
    ids, tgt = random_examples(3, seed=3)
    w = float_weights(tgt)
    b = batch_or_placeholder(lambda i: collate(ids, w, i, packed=True), [], [0, 1])   # a rank with no example
    assert "weights" not in b and not b["mask"].any() and "attention_mask" not in b
    loss = TokenLoss(lm).train()(**b).sum()
    assert loss.item() == 0.0
    loss.backward()
    assert lm.lm_head.weight.grad is not None and lm.model.layers[0].mlp.up_proj.weight.grad is not None
    assert lm.lm_head.weight.grad.abs().sum() == 0


def test_packed_batches_fill_rows_and_collate_lays_them_out_as_planned():
    """Scoring batches: every example once; `rows` rows of the longest example's width per batch, exactly as
    collate(packed=True) lays the list out (next-fit reproduces best-fit decreasing); far fewer padded positions than
    length-grouped batches of a skewed set (many short examples, a few long ones, as a self-evolving chunk has)."""
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(2, 40, 200), rng.integers(100, 257, 20)])
    ids = Ragged.from_list([np.arange(n, dtype=np.int32) for n in lengths], np.int32)
    tgt = Ragged.from_list([np.ones(n, bool) for n in lengths], bool)
    batches = packed_batches(lengths, rows=8)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    shapes = [tuple(collate(ids, tgt, b, packed=True, width=lengths.max())["input_ids"].shape) for b in batches]
    assert all(w == lengths.max() for _, w in shapes)
    assert all(r == 8 for r, _ in shapes[:-1]) and 1 <= shapes[-1][0] <= 8
    padded = sum(r * w for r, w in shapes) - lengths.sum()
    grouped = sum(int(np.prod(collate(ids, tgt, b, packed=True)["input_ids"].shape))
                  for b in length_batches(lengths, 8)) - lengths.sum()   # each as wide as its longest
    assert padded < grouped / 3, (padded, grouped)
    np.testing.assert_array_equal(np.concatenate(packed_batches(lengths, 8)), np.concatenate(batches))
    assert packed_batches(np.array([], np.int64), 8) == []


@pytest.mark.parametrize("entropy", [False, True])
def test_token_losses_packed_equal_padded(tiny_lm, accelerator, monkeypatch, entropy):
    lm = tiny_lm(tie=True)
    ids, tgt = uneven_examples(11, seed=4)
    packed = token_losses(accelerator, TokenLoss(lm, 5), ids, tgt, batch_size=4, pad_id=0, entropy=entropy)
    monkeypatch.setattr(L, "collate", lambda *a, packed=False, **k: collate(*a, **k))
    padded = token_losses(accelerator, TokenLoss(lm, 5), ids, tgt, batch_size=4, pad_id=0, entropy=entropy)
    for a, b in zip(*((padded, packed) if entropy else ((padded,), (packed,)))):
        assert isinstance(b, Ragged) and b.same_layout(tgt)
        np.testing.assert_array_equal(np.isnan(a.values), np.isnan(b.values))
        np.testing.assert_allclose(b.values, a.values, rtol=1e-5, atol=1e-5, equal_nan=True)


PADDED_MAIN = '''
import tokenclean.losses as L, tokenclean.scorers.online, tokenclean.train
_collate = L.collate
L.collate = tokenclean.train.collate = tokenclean.scorers.online.collate = (
    lambda *a, packed=False, **k: _collate(*a, **k))
from tokenclean.__main__ import main
main()
'''


@pytest.mark.slow
def test_cli_keeps_the_same_tokens_as_padded(tmp_path):
    """The tiny fixed pipeline, packed (as shipped) and with every collate padded: the same kept tokens."""
    from tokenclean.io import cache_root
    script = tmp_path / "padded_main.py"
    script.write_text(PADDED_MAIN)
    for run in ("packed", "padded"):
        # a score cache of its own for each run (the built models shared): no stage may come from the other
        cache = tmp_path / f"cache-{run}"
        cache.mkdir()
        for d in cache_root().glob("*"):
            if d.is_dir() and d.name != "scores":
                (cache / d.name).symlink_to(d)
        run_cli(TINY, tmp_path / run, script=script if run == "padded" else None, env={"TOKENCLEAN_CACHE": str(cache)})
    keep = [load_array(tmp_path / r / "keep").values for r in ("packed", "padded")]
    assert keep[0].sum() == 6726 and np.array_equal(keep[0], keep[1])
    scores = [load_array(tmp_path / r / "scores").values for r in ("packed", "padded")]
    np.testing.assert_allclose(scores[0], scores[1], rtol=0, atol=1e-5, equal_nan=True)
