import os

# One intra-op thread per process, in this process (set before torch is imported) and in every CLI run and launch
# it starts: the tests' models are tiny, and two OpenMP threads per process cost far more than they give, most of
# all when another process holds the other core. The pinned numbers hold either way (tests/test_loss_curve.py,
# tests/test_cli.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_lm():
    """A 2-layer Llama with a 64-token vocabulary, randomly initialised from a fixed seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(seed=0, tie=False):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=tie)
        return LlamaForCausalLM(cfg).eval()
    return make


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The built-in tiny model's HF directory, built once per module into a private cache."""
    from tokenclean.assets import resolve_model
    mp = pytest.MonkeyPatch()
    mp.setenv("TOKENCLEAN_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        yield resolve_model("builtin:tiny")
    finally:
        mp.undo()


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    return Accelerator(cpu=True)


def random_examples(n, seed=0, vocab=64, min_len=5, max_len=20, prompt=3):
    """Ragged ids and target masks: the first `prompt` tokens of each example are the prompt."""
    from tokenclean.ragged import Ragged
    rng = np.random.default_rng(seed)
    ids, tgt = [], []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        ids.append(rng.integers(1, vocab, size=length).astype(np.int32))
        t = np.zeros(length, dtype=bool)
        t[prompt:] = True
        tgt.append(t)
    return Ragged.from_list(ids, np.int32), Ragged.from_list(tgt, bool)
