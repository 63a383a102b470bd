"""Loading models and writing HF-format checkpoints that hand one stage's model to the next.

A checkpoint is a plain transformers directory (config.json, model.safetensors, tokenizer files): LoRA is merged
into it, so any round can be evaluated, exported or used as the next reference with `from_pretrained`. With
`pipeline.lora=continue` the adapter is kept beside it (adapter/) so the next round can continue training it.
Directories are written under a temporary name and renamed, so a checkpoint directory is complete or absent.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenclean.config import ModelConfig
from tokenclean.dist import not_sharded
from tokenclean.rundir import fingerprint, fsync_tree

log = logging.getLogger(__name__)


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
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:  # padding is masked out everywhere; any id will do, eos is the convention
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, mcfg: ModelConfig, seed: int, adapter: str | None = None, lora: bool | None = None):
    """A causal LM from `path`; with LoRA enabled, wrapped in a fresh adapter (seeded) or the one at `adapter`."""
    kwargs = {"dtype": getattr(torch, mcfg.dtype)}
    if mcfg.attn_implementation:
        kwargs["attn_implementation"] = mcfg.attn_implementation
    lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    lm.config.use_cache = False
    if lora if lora is not None else mcfg.lora.enabled:
        from peft import PeftModel, get_peft_model
        torch.manual_seed(seed)  # LoRA's A matrices are random: the same seed gives the same adapter
        if adapter:
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
    (ZeRO-3 gathers the sharded weights collectively); rank 0 writes."""
    state = accelerator.get_state_dict(model)
    out_dir = Path(out_dir)
    if accelerator.is_main_process:
        state = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if mcfg.lora.enabled:
            # merge on a CPU copy: under ZeRO-3 the live modules hold only shards
            from peft import get_peft_model
            with not_sharded(accelerator):
                lm = get_peft_model(AutoModelForCausalLM.from_pretrained(start_dir, dtype=getattr(torch, mcfg.dtype)),
                                    peft_config(mcfg))
            missing, unexpected = lm.load_state_dict(state, strict=False)
            assert not unexpected and not [k for k in missing if "lora_" in k], (missing, unexpected)
            if keep_adapter:
                lm.save_pretrained(tmp / "adapter")
            lm = lm.merge_and_unload()
            lm.save_pretrained(tmp)
        else:
            accelerator.unwrap_model(model).lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)  # a stage redone after a crash replaces its old output
        os.replace(tmp, out_dir)
    accelerator.wait_for_everyone()
