"""Loading models and writing HF-format checkpoints that hand one stage's model to the next.

A checkpoint is a plain transformers directory (config.json, model.safetensors, tokenizer files): LoRA is merged
into it, so any round can be evaluated, exported or used as the next reference with `from_pretrained`. With
`pipeline.lora=continue` the adapter is kept beside it (adapter/) so the next round can continue training it.
Directories are written under a temporary name (per process) and renamed, so a checkpoint directory is complete or
absent; its checksums.json records every file's size and hash, checked whenever it is loaded (rundir.py).

torch and transformers are imported where used: check_model_dir runs before anything heavy loads.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from pathlib import Path

from tokenclean.config import ConfigError, ModelConfig
from tokenclean.io import fingerprint, fsync_tree
from tokenclean.rundir import check_checksums, on_main, write_checksums

log = logging.getLogger(__name__)

WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# weights in pickle files: loading them can run any code the file carries, so they are refused, never read
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "*.bin", "*.pt", "*.pth", "*.ckpt")
CONVERT = ("python -c \"from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; "
           "M.from_pretrained('{src}').save_pretrained('{dst}'); T.from_pretrained('{src}').save_pretrained('{dst}')\"")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_model_dir(path: str, name: str | None = None) -> str:
    """Fail early (ConfigError; DamagedError for a checkpoint whose checksums differ), naming what is missing and
    where, unless `path` holds a loadable model: a readable config.json, every weight file (complete, for
    safetensors: as long as its header says), tokenizer files. `name`: what the user asked for (model.name_or_path,
    e.g. builtin:tiny). Returns path."""
    p, name = Path(path), name or str(path)
    fix = (f"delete {p} and it is rebuilt on the next run" if name.startswith("builtin:") else
           "point model.name_or_path at a complete Hugging Face model directory (config.json, weights, tokenizer)")

    def fail(what: str):
        raise ConfigError(f"model.name_or_path={name!r}: {what}; {fix}")
    try:
        config = json.loads((p / "config.json").read_text())
    except FileNotFoundError:
        fail(f"no config.json in {p}")
    except (OSError, ValueError) as e:
        fail(f"{p / 'config.json'} is unreadable ({e})")
    if not isinstance(config, dict):
        fail(f"{p / 'config.json'} is not a JSON object")
    check_no_custom_code(config, p, name)
    index = next((p / w for w in WEIGHTS if (p / w).exists()), None)
    if index is None:
        pickled = next((f for pattern in PICKLE_WEIGHTS for f in sorted(p.glob(pattern))), None)
        if pickled is not None:
            raise ConfigError(
                f"model.name_or_path={name!r}: {pickled} holds pickle weights, which tokenclean never loads "
                f"(unpickling can run code); convert it once, on a machine you trust, to safetensors: "
                f"{CONVERT.format(src=p, dst=f'{p}-safetensors')} and use model.name_or_path={p}-safetensors")
        fail(f"no weights in {p} (looked for {', '.join(WEIGHTS)})")
    shards = [index]
    if index.name.endswith(".index.json"):
        try:
            shards = [p / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError, AttributeError) as e:
            fail(f"{index} is unreadable ({e})")
    for shard in shards:
        problem = "missing" if not shard.is_file() else _safetensors_problem(shard)
        if problem:
            fail(f"{shard} is {problem}")
    if not any((p / f).exists() for f in TOKENIZER_FILES):
        fail(f"no tokenizer in {p} (looked for {', '.join(TOKENIZER_FILES)})")
    check_checksums(p)
    return str(path)


def check_no_custom_code(config: dict, path: Path, name: str) -> None:
    """A config.json naming custom code (`auto_map`) is loaded with transformers' own class for its model_type and
    the custom code is never imported (trust_remote_code stays off); with a model_type transformers does not know,
    there is nothing safe to load it with: ConfigError."""
    if not config.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING
    if config.get("model_type") not in CONFIG_MAPPING:
        raise ConfigError(f"model.name_or_path={name!r}: {path / 'config.json'} needs custom code (auto_map: "
                          f"{', '.join(sorted(config['auto_map']))}; model_type {config.get('model_type')!r} is "
                          f"not one transformers knows), which tokenclean never runs; use a model transformers "
                          "supports")
    log.info("%s names custom code (auto_map); it is not run: transformers' own %s classes load it", path,
             config["model_type"])


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be complete (its header gives every tensor's byte range), or None."""
    if path.suffix != ".safetensors":
        return None
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        try:
            header = json.loads(f.read(n)) if 0 <= n <= size - 8 else None
            end = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            return f"damaged (no valid safetensors header; {size} bytes)"
    return None if end == size else f"truncated or damaged ({size} bytes, its header says {end})"


def model_fingerprint(path: str) -> str:
    """A cheap identity of a checkpoint directory (hashing 140 GB of weights is not cheap): its config.json and each
    weight file's name, size and first MiB (the safetensors header and the first tensors)."""
    p = Path(path)
    parts = [(p / "config.json").read_text() if (p / "config.json").exists() else ""]
    for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
        with open(f, "rb") as fh:
            parts += [f.name, f.stat().st_size, fh.read(1 << 20)]
    return fingerprint(*parts)


def load_tokenizer(path: str):
    """The tokenizer at `path`; ConfigError when it cannot be loaded or has no token to pad with."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001  transformers raises many kinds; all mean the same here
        raise ConfigError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {' '.join(str(e).split())}") \
            from None
    if tok.pad_token_id is None:  # padding is masked out everywhere; any id will do, eos is the convention
        if tok.eos_token is None:
            raise ConfigError(f"the tokenizer in {path} has neither a pad token nor an eos token (padding needs one): "
                              f"set \"pad_token\" or \"eos_token\" in {Path(path) / 'tokenizer_config.json'}")
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, mcfg: ModelConfig, seed: int, adapter: str | None = None, lora: bool | None = None):
    """A causal LM from `path` (a checkpoint: checked against its checksums first); with LoRA enabled, wrapped in
    a fresh adapter (seeded) or the one at `adapter`."""
    import torch
    from transformers import AutoModelForCausalLM
    check_checksums(Path(path))
    if adapter:
        check_checksums(Path(adapter).parent)   # the adapter is kept inside the checkpoint it was merged into
    kwargs = {"dtype": getattr(torch, mcfg.dtype), "use_safetensors": True, "trust_remote_code": False}
    if mcfg.attn_implementation:
        kwargs["attn_implementation"] = mcfg.attn_implementation
    lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    lm.config.use_cache = False
    if lora if lora is not None else mcfg.lora.enabled:
        from peft import PeftModel, get_peft_model
        torch.manual_seed(seed)  # LoRA's A matrices are random: the same seed gives the same adapter
        if adapter:
            if not (Path(adapter) / "adapter_model.safetensors").is_file():   # peft would fall back to a pickle
                raise ConfigError(f"{adapter}: no adapter_model.safetensors (tokenclean loads adapters from "
                                  f"safetensors only); delete the checkpoint that holds it and rerun the stage")
            lm = PeftModel.from_pretrained(lm, adapter, is_trainable=True)
        else:
            lm = get_peft_model(lm, peft_config(mcfg))
    return lm


def peft_config(mcfg: ModelConfig):
    from peft import LoraConfig
    return LoraConfig(r=mcfg.lora.r, lora_alpha=mcfg.lora.alpha, lora_dropout=mcfg.lora.dropout,
                      target_modules=list(mcfg.lora.target_modules), task_type="CAUSAL_LM")


def save_checkpoint(accelerator, model, tokenizer, out_dir: str | os.PathLike, start_dir: str,
                    mcfg: ModelConfig, keep_adapter: bool = False) -> None:
    """Write the prepared TokenLoss `model` as a merged HF checkpoint at out_dir. Every rank must call it
    (ZeRO-3 gathers the sharded weights collectively); rank 0 writes. A failed write (a full disk) removes its
    temporary directory and raises an OSError naming out_dir and the space the checkpoint needs."""
    import torch
    from transformers import AutoModelForCausalLM

    from tokenclean.dist import not_sharded
    state = accelerator.get_state_dict(model)
    out_dir = Path(out_dir)

    def write():
        lm_state = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
        tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
        try:
            if mcfg.lora.enabled:
                # merge on a CPU copy: under ZeRO-3 the live modules hold only shards
                from peft import get_peft_model
                with not_sharded(accelerator):
                    lm = AutoModelForCausalLM.from_pretrained(start_dir, dtype=getattr(torch, mcfg.dtype),
                                                              use_safetensors=True, trust_remote_code=False)
                    lm = get_peft_model(lm, peft_config(mcfg))
                missing, unexpected = lm.load_state_dict(lm_state, strict=False)
                assert not unexpected and not [k for k in missing if "lora_" in k], (missing, unexpected)
                if keep_adapter:
                    lm.save_pretrained(tmp / "adapter")
                lm = lm.merge_and_unload()
                lm.save_pretrained(tmp)
            else:
                accelerator.unwrap_model(model).lm.save_pretrained(tmp, state_dict=lm_state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_checksums(tmp)
            fsync_tree(tmp)
            shutil.rmtree(out_dir, ignore_errors=True)  # a stage redone after a crash replaces its old output
            os.replace(tmp, out_dir)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            code = _errno(e)
            if not code:
                raise
            need = sum(v.numel() * v.element_size() for v in lm_state.values())
            free = shutil.disk_usage(out_dir.parent).free if out_dir.parent.exists() else 0
            raise OSError(code, f"{os.strerror(code)} (the checkpoint needs about {need / 2**20:,.0f} MiB, "
                                f"{free / 2**20:,.0f} MiB are free there)", str(out_dir)) from e
    on_main(accelerator, write)


def _errno(e: Exception) -> int | None:
    """The OS error behind e: safetensors (Rust) reports one as SafetensorError("... Os { code: 28, ... }")."""
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"Os \{ code: (\d+)", str(e))
    return int(found.group(1)) if found else None
