"""The fused LM-head loss (liger-kernel's fused linear cross-entropy, training.loss_kernel) against the chunked path.

By default (CPU) only the choice of path runs: auto takes the chunked path on CPU, bit for bit; loss_kernel=fused
without CUDA is refused by the config check, before any model loads. The numerics run on CUDA (skipped without it)
and, marked slow, on CPU through Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: Triton reads it when
liger-kernel's kernels are defined). Both compare, on weighted per-token losses (uneven weights, some zero, as soft
weights and masks train), the losses and the gradients with respect to the final hidden states and the LM head
weight, in fp32, bf16 weights, and fp32 weights under bf16 autocast (training's mixed_precision=bf16).

On a CUDA machine with the gpu extra:  pip install -e '.[gpu,test]' && pytest -q tests/test_fused_loss.py
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.cli import ROOT, TINY, run_cli
from tests.conftest import random_examples
from tokenclean.config import ConfigError
from tokenclean.losses import TokenLoss, collate

CUDA = torch.cuda.is_available()
LIGER = importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None
# (vocabulary, hidden size): the tiny test model's, and a vocabulary that is no power of two and spans blocks
SHAPES = [(64, 32), (1000, 64)]
MODES = ["fp32", "bf16", "amp"]     # fp32 weights | bf16 weights | fp32 weights under bf16 autocast
# max |fused - chunked|, relative to the largest |chunked| of the same quantity: bf16 gradients are rounded to 8
# bits on both paths, at different points (measured through the interpreter: up to 1.2e-2), so 8 bf16 ulps of the max
TOLERANCE = {"fp32": 1e-4, "bf16": 2 ** -5, "amp": 2 ** -5}


def make_lm(vocab: int, hidden: int, seed: int = 0, tie: bool = False, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, attn_implementation=attn)
    return LlamaForCausalLM(cfg)


def losses_and_grads(lm, batch, weights, kernel: str, autocast: bool):
    """Per-token losses of a packed batch, then the gradients of their weighted mean: (losses, d/d hidden states,
    d/d LM head weight, the path taken)."""
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["hidden"] = out

    hook = lm.model.norm.register_forward_hook(keep)
    lm.zero_grad(set_to_none=True)
    model = TokenLoss(lm, chunk_size=16, kernel=kernel).train()   # several checkpointed chunks on the chunked path
    try:
        with torch.autocast(weights.device.type, torch.bfloat16, enabled=autocast):
            losses = model(**batch)
        ((losses * weights).sum() / weights.sum()).backward()
    finally:
        hook.remove()
    return losses.detach().float(), seen["hidden"].grad.float(), lm.lm_head.weight.grad.float(), model.path


def compare(device: str, vocab: int, hidden: int, mode: str, tie: bool = False, seed: int = 0) -> dict:
    """Relative max differences between the fused and the chunked path (see TOLERANCE), and the paths taken."""
    lm = make_lm(vocab, hidden, seed, tie).to(device=device, dtype=torch.bfloat16 if mode == "bf16" else None)
    ids, tgt = random_examples(12, seed=seed + 1, vocab=vocab, max_len=40)
    batch = {k: v.to(device) for k, v in collate(ids, tgt, range(len(ids)), packed=True).items()}
    n = int(batch["mask"].sum())
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(n, generator=g) * 2
    weights[torch.randperm(n, generator=g)[: n // 4]] = 0     # a quarter of the tokens dropped
    weights = weights.to(device)
    fused = losses_and_grads(lm, batch, weights, "fused", mode == "amp")
    chunked = losses_and_grads(lm, batch, weights, "chunked", mode == "amp")
    out = {"paths": [fused[3], chunked[3]], "n": n}
    for name, a, b in zip(("losses", "grad_hidden", "grad_head"), fused, chunked):
        out[name] = ((a - b).abs().max() / b.abs().max()).item()
    return out


def check(result: dict, mode: str) -> None:
    assert result["paths"] == ["fused", "chunked"], result
    for name in ("losses", "grad_hidden", "grad_head"):
        assert result[name] <= TOLERANCE[mode], (name, result)


# -- on every machine: which path runs ----------------------------------------------------------------------------


def test_auto_takes_the_chunked_path_on_cpu(tiny_lm):
    lm = tiny_lm()
    ids, tgt = random_examples(5, seed=7)
    batch = collate(ids, tgt, range(5), packed=True)
    auto, chunked = TokenLoss(lm, 8), TokenLoss(lm, 8, kernel="chunked")
    assert auto.resolve_kernel("cpu") == "chunked"
    with torch.no_grad():
        a, b = auto(**batch), chunked(**batch)
    assert auto.path == chunked.path == "chunked"
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fused_off_cuda_is_refused_by_the_model_too(tiny_lm, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = TokenLoss(tiny_lm(), kernel="fused")
    with pytest.raises(ConfigError, match=r"^training.loss_kernel='fused': the model is on cpu, not on a CUDA device; "
                                          r"set training.loss_kernel=auto"):
        model(**collate(*random_examples(2), [0, 1], packed=True))
    with pytest.raises(ValueError, match="kernel='on': one of auto, fused, chunked"):
        TokenLoss(tiny_lm(), kernel="on")


def test_the_config_key_reaches_the_training_model(tiny_lm, accelerator):
    from tokenclean.config import TrainingConfig
    from tokenclean.train import prepare
    for kernel in ("chunked", "auto"):
        p = prepare(accelerator, tiny_lm(), 8, TrainingConfig(loss_kernel=kernel, mixed_precision="no"), seed=0)
        assert accelerator.unwrap_model(p.model).kernel == kernel


def test_fused_without_cuda_stops_before_any_model_loads(tmp_path):
    """The CLI, as a user runs it: one line naming the override and the extra, exit 2, no run started."""
    env = {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "0"}
    proc = run_cli([*TINY, "training.loss_kernel=fused"], tmp_path / "run", env=env, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("tokenclean:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    why = "no CUDA device is available" if LIGER else "liger-kernel is not installed"
    assert lines[0] == (f"tokenclean: error: training.loss_kernel='fused': {why}; the fused loss needs a CUDA device "
                        "and liger-kernel>=0.8.2 (pip install 'tokenclean[gpu]'): install them, or set "
                        "training.loss_kernel=auto to use the chunked path here")
    assert not (tmp_path / "run" / "manifest.json").exists()


# -- CUDA: the fused path's numerics, and packed batches on the GPU ------------------------------------------------


@pytest.mark.skipif(not LIGER, reason="needs liger-kernel (pip install 'tokenclean[gpu]')")
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vocab, hidden", SHAPES)
@pytest.mark.parametrize("tie", [False, True])
def test_fused_matches_chunked_on_cuda(vocab, hidden, mode, tie):
    result = compare("cuda", vocab, hidden, mode, tie)
    print(mode, vocab, hidden, tie, json.dumps(result))
    check(result, mode)


@pytest.mark.skipif(not LIGER, reason="needs liger-kernel (pip install 'tokenclean[gpu]')")
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_auto_takes_the_fused_path_on_cuda_and_scores_like_chunked():
    lm = make_lm(1000, 64).cuda()
    ids, tgt = random_examples(6, seed=3, vocab=1000)
    batch = {k: v.cuda() for k, v in collate(ids, tgt, range(6), packed=True).items()}
    auto = TokenLoss(lm).eval()
    assert auto.resolve_kernel("cuda") == "fused"
    with torch.no_grad():
        a, b = auto(**batch), TokenLoss(lm, kernel="chunked").eval()(**batch)
    assert auto.path == "fused"
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not LIGER, reason="needs liger-kernel (pip install 'tokenclean[gpu]')")
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_a_lora_head_takes_the_chunked_path_on_cuda():
    from peft import LoraConfig, get_peft_model
    lm = get_peft_model(make_lm(1000, 64).cuda(), LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    assert TokenLoss(lm).resolve_kernel("cuda") == "chunked"
    with pytest.raises(ConfigError, match="not a plain nn.Linear"):
        TokenLoss(lm, kernel="fused").resolve_kernel("cuda")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_packed_equals_padded_on_cuda_with_bf16_weights(attn):
    """The GPU attention kernels on packed rows (position_ids restart per example; flash-attention runs varlen on
    the rows flattened): the same losses as one example per padded row, bf16 weights, whichever loss path."""
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    lm = make_lm(1000, 64, attn=attn).to("cuda", torch.bfloat16)
    ids, tgt = random_examples(10, seed=5, vocab=1000, max_len=40)
    model = TokenLoss(lm).eval()
    with torch.no_grad():
        packed = model(**{k: v.cuda() for k, v in collate(ids, tgt, range(10), packed=True).items()})
        padded = model(**{k: v.cuda() for k, v in collate(ids, tgt, range(10)).items() if k != "weights"}) \
            if attn == "sdpa" else None
        one = [model(**{k: v.cuda() for k, v in collate(ids, tgt, [i], packed=True).items()}) for i in range(10)]
    torch.testing.assert_close(packed, torch.cat(one), rtol=2e-2, atol=2e-2)
    if padded is not None:
        torch.testing.assert_close(packed, padded, rtol=2e-2, atol=2e-2)


# -- CPU, slow: the kernel itself through Triton's interpreter ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not LIGER, reason="needs liger-kernel and triton (pip install 'tokenclean[gpu]')")
def test_fused_matches_chunked_through_the_triton_interpreter():
    code = ("import json; from tests.test_fused_loss import compare, SHAPES, MODES\n"
            "print(json.dumps([[m, v, h, compare('cpu', v, h, m)] for v, h in SHAPES for m in MODES]))")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for mode, vocab, hidden, result in json.loads(proc.stdout.splitlines()[-1]):
        print(mode, vocab, hidden, json.dumps(result))
        check(result, mode)
