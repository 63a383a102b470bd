"""Throughput and memory of the two hot loops: the scoring pass (per-token losses) and masked training.

  python -m benchmarks.speed --model tiny --out results/speed_tiny.md
  python -m benchmarks.speed --model smollm2 --examples 96 --out results/speed_smollm2.md

Each measurement runs in a fresh process, so its peak resident memory (ru_maxrss) is its own. Scoring compares
tokenclean's chunked LM head over response positions (TokenLoss) with the plain computation (full logits of the
whole batch, then cross-entropy), in fp32 and bf16 autocast; training runs `train.fit` on every response token.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from benchmarks.common import MODELS, code_commit, collect, command, provenance, spawn


def _setup(model: str, examples: int, max_length: int):
    from transformers import AutoModelForCausalLM

    from tokenclean.assets import resolve_model
    from tokenclean.data import read_records, tokenize
    from tokenclean.models import load_tokenizer

    path = resolve_model(MODELS[model].name_or_path)
    tok = load_tokenizer(path)
    records, _ = read_records("builtin:chatterbot", limit=examples)
    data = tokenize(records, tok, max_length)
    lm = AutoModelForCausalLM.from_pretrained(path)
    return lm, tok, data


def _measure(kind: str, model: str, precision: str, examples: int, max_length: int, batch: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator

    from tokenclean.config import TrainingConfig
    from tokenclean.losses import TokenLoss, collate, length_batches, token_losses
    from tokenclean.train import train

    torch.manual_seed(0)
    lm, tok, data = _setup(model, examples, max_length)
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if precision == "bf16" else "no")
    n_tokens = int(data.input_ids.lengths.sum())
    t0 = time.perf_counter()
    if kind == "score_chunked":
        token_losses(acc, TokenLoss(lm.to(acc.device)), data.input_ids, data.target, batch, tok.pad_token_id)
    elif kind == "score_full_logits":
        lm.to(acc.device).eval()
        with torch.no_grad():
            for idx in length_batches(data.input_ids.lengths, batch):
                b = {k: v.to(acc.device) for k, v in collate(data.input_ids, data.target, idx,
                                                             tok.pad_token_id).items()}
                with acc.autocast():
                    logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
                F.cross_entropy(logits[:, :-1].flatten(0, 1), b["input_ids"][:, 1:].flatten(), reduction="none")
    elif kind == "train":
        cfg = TrainingConfig(batch_size=batch, micro_batch_size=batch, mixed_precision=precision, warmup_ratio=0.0)
        train(acc, lm, data.input_ids, data.target, cfg, seed=0, pad_id=tok.pad_token_id)
    seconds = time.perf_counter() - t0
    return {"kind": kind, "model": model, "precision": precision, "examples": len(data.input_ids),
            "tokens": n_tokens, "response_tokens": int(np.count_nonzero(data.target.values)),
            "seconds": round(seconds, 2), "tokens_per_s": round(n_tokens / seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="tiny")
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # kind,precision: measure in this process
    argv = list(argv if argv is not None else sys.argv[1:])
    a = ap.parse_args(argv)
    if a.one:
        kind, precision = a.one.split(",")
        print(json.dumps(_measure(kind, a.model, precision, a.examples, a.max_length, a.batch)))
        return
    rows, commit = [], code_commit()
    for kind in ("score_chunked", "score_full_logits", "train"):
        for precision in ("no", "bf16"):
            rows.append(collect(spawn("benchmarks.speed", ["--model", a.model, "--examples", str(a.examples),
                                                           "--max-length", str(a.max_length), "--batch", str(a.batch),
                                                           "--one", f"{kind},{precision}"]), f"{kind} {precision}"))
            print(rows[-1], flush=True)
    lines = [f"# Throughput: {a.model}", "", *provenance(command("speed", argv), commit),
             f"{rows[0]['examples']} chatterbot examples, {rows[0]['tokens']} tokens ({rows[0]['response_tokens']} "
             f"response tokens), batch {a.batch}, max length {a.max_length}; tokens/s counts every input token.", "",
             "| pass | precision | seconds | tokens/s | peak RSS (MB) |", "|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['precision']} | {r['seconds']} | {r['tokens_per_s']} | {r['peak_rss_mb']} |"
              for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
