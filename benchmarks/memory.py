"""Scoring peak memory: tokenclean's chunked LM head (TokenLoss) against the full fp32 logits, for SmolLM2's vocabulary
and two larger ones; rewrites its section of results/performance.md.

  python -m benchmarks.memory

Every cell runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from benchmarks.common import (
    MODELS,
    PERFORMANCE,
    child_main,
    code_commit,
    collect,
    command,
    machine,
    spawn,
    table,
    write_section,
)

MODULE = "memory"
SMOLLM2 = MODELS["smollm2"].name_or_path


def _memory(spec: dict) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tokenclean.assets import resolve_model
    from tokenclean.dist import make_accelerator
    from tokenclean.losses import TokenLoss, collate, token_losses
    from tokenclean.ragged import Ragged

    torch.manual_seed(0)
    vocab = spec["vocab"]
    if vocab == "smollm2":
        lm = AutoModelForCausalLM.from_pretrained(resolve_model(SMOLLM2), dtype=torch.float32)
    else:   # SmolLM2's width, 2 layers, this vocabulary: the LM head is what scales with it
        lm = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=int(vocab), hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
            num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048))
    lm.eval()
    v = lm.config.vocab_size
    rng = np.random.default_rng(0)
    n, length, prompt = spec["examples"], spec["length"], int(spec["length"] * (1 - spec["response"]))
    ids = Ragged.from_list([rng.integers(0, v, length) for _ in range(n)], np.int64)
    target = Ragged.from_list([np.r_[np.zeros(prompt, bool), np.ones(length - prompt, bool)] for _ in range(n)],
                              bool)
    acc = make_accelerator("no")
    with torch.no_grad():
        lm(input_ids=torch.zeros(1, 8, dtype=torch.long))            # warm-up: allocator and kernels
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if spec["kind"] == "chunked":
        token_losses(acc, TokenLoss(lm, spec["chunk"]), ids, target, spec["batch"], 0)
    else:
        with torch.no_grad():
            for lo in range(0, n, spec["batch"]):
                b = collate(ids, target, range(lo, min(lo + spec["batch"], n)), 0)
                logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
                F.cross_entropy(logits[:, :-1].flatten(0, 1), b["input_ids"][:, 1:].flatten(), reduction="none")
                del logits
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"vocab": v, "kind": spec["kind"], "baseline_mb": round(base), "peak_mb": round(peak),
            "scoring_mb": round(peak - base), "seconds": round(time.perf_counter() - t0, 2)}


def run(a, argv) -> None:
    rows = []
    small = a.small_chunk
    for vocab in a.vocabs.split(","):
        got = {}
        for kind, chunk in (("full_logits", a.chunk), ("chunked", a.chunk), ("chunked_small", small)):
            spec = {"vocab": vocab, "kind": kind.replace("_small", ""), "examples": a.examples, "length": a.length,
                    "response": a.response, "batch": a.batch, "chunk": chunk}
            got[kind] = collect(spawn("benchmarks.memory", ["_child", "memory", json.dumps(spec)]), kind)
            print(kind, got[kind], flush=True)
        f, c, cs = got["full_logits"], got["chunked"], got["chunked_small"]
        logits_gb = a.batch * a.length * f["vocab"] * 4 / 2**30
        rows.append([f"{f['vocab']:,}" + (" (SmolLM2-135M)" if vocab == "smollm2" else " (2-layer Llama)"),
                     f"{logits_gb:.2f}", f["baseline_mb"],
                     f"{f['peak_mb']} / {f['scoring_mb']}", f"{c['peak_mb']} / {c['scoring_mb']}",
                     f"**{c['peak_mb'] / f['peak_mb']:.2f}x** / **{c['scoring_mb'] / max(f['scoring_mb'], 1):.2f}x**",
                     f"{cs['peak_mb']} / {cs['scoring_mb']}",
                     f"**{cs['peak_mb'] / f['peak_mb']:.2f}x** / **{cs['scoring_mb'] / max(f['scoring_mb'], 1):.2f}x**",
                     f"{f['seconds']} / {c['seconds']} / {cs['seconds']}"])
    resp = int(a.length * a.response) * a.batch
    lines = ["## Scoring peak memory: chunked LM head vs full fp32 logits", "",
             f"Command: `{command(MODULE, argv)}`", "", f"Commit: {code_commit()}.", "",
             f"{a.examples} examples of {a.length} random tokens ({a.response:.0%} of them response: {resp} response "
             f"positions per batch), batch {a.batch}, fp32, no gradient. chunked = `tokenclean.losses.token_losses` "
             "(TokenLoss: the decoder once, then the LM head and cross-entropy over the response positions only, "
             f"in chunks of `training.loss_chunk_size` positions: the default {a.chunk}, which here holds a whole "
             f"batch, and {small}); full logits = the plain computation (`lm(...).logits.float()` for the whole "
             "batch, then cross-entropy). Peak RSS (ru_maxrss) of a fresh process per cell, as 'peak / scoring': "
             "scoring is the peak minus the peak after loading the model and one warm-up forward (what the pass "
             "itself adds). 128k-262k: SmolLM2's width (576) with 2 layers and that vocabulary, random weights "
             "from a config.", "",
             *table(["vocabulary", "fp32 logits of one batch (GB)", "model loaded (MB)", "full logits (MB)",
                      f"chunked, {a.chunk} (MB)", "ratio: peak / scoring", f"chunked, {small} (MB)",
                      "ratio: peak / scoring", "seconds: full / chunked / small chunks"], rows), "",
             "Goal: at most 0.5x.", "", f"Machine: {machine()}."]
    write_section("memory", "\n".join(lines), Path(a.out))


def main(argv=None) -> None:
    if child_main({"memory": _memory}):
        return
    argv = list(argv if argv is not None else sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocabs", default="smollm2,128256,262144")
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=384)
    ap.add_argument("--response", type=float, default=0.6)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--small-chunk", type=int, default=256)
    ap.add_argument("--out", default=str(PERFORMANCE))
    run(ap.parse_args(argv), argv)


if __name__ == "__main__":
    main()
