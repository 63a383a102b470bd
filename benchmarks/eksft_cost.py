"""EKSFT's cost (tokenclean/scorers/eksft.py): the peak memory of one training forward and backward with KL to a
reference and entropy, chunked (TokenLoss(reference=...)) against both models' full fp32 logits (the reference
code's computation), at a 49k and a 262k vocabulary with a tiny hidden size; and the time per optimiser step on the
tiny model against plain SFT. Rewrites its section of results/performance.md.

  python -m benchmarks.eksft_cost

Every memory cell runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from benchmarks.common import (
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

MODULE = "eksft_cost"


def _lm(vocab: int, hidden: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=1024))


def _memory(spec: dict) -> dict:
    import numpy as np
    import torch

    from tokenclean.losses import TokenLoss, collate
    from tokenclean.ragged import Ragged

    vocab, n, length = spec["vocab"], spec["batch"], spec["length"]
    lm, ref = _lm(vocab, spec["hidden"], 0).train(), _lm(vocab, spec["hidden"], 1).eval().requires_grad_(False)
    rng = np.random.default_rng(0)
    prompt = int(length * (1 - spec["response"]))
    ids = Ragged.from_list([rng.integers(0, vocab, length) for _ in range(n)], np.int64)
    target = Ragged.from_list([np.r_[np.zeros(prompt, bool), np.ones(length - prompt, bool)] for _ in range(n)], bool)
    b = collate(ids, target, range(n), 0)
    with torch.no_grad():
        lm(input_ids=b["input_ids"][:, :8])                 # warm-up: allocator and kernels
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if spec["kind"] == "full":     # the reference code: both models' [batch, length, V] logits, KL and entropy
        logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        with torch.no_grad():
            logq = torch.log_softmax(ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                                     .logits.float(), -1)
        logp = torch.log_softmax(logits, -1)
        p = logp.exp()
        m = b["mask"].float()
        loss = ((-(p * logp).sum(-1) + (p * (logp - logq)).sum(-1) + (p * p).sum(-1)) * m).sum()
        loss.backward()
    else:
        model, reference = TokenLoss(lm, spec["chunk"], "chunked"), TokenLoss(ref, spec["chunk"], "chunked")
        losses, terms = model(**b, reference=reference.reference_logits(**b))
        (losses.sum() + terms["entropy"].sum() + terms["kl"].sum() + terms["collision"].sum()).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"vocab": vocab, "kind": spec["kind"], "positions": int(b["mask"][:, 1:].sum()),
            "baseline_mb": round(base), "peak_mb": round(peak), "added_mb": round(peak - base),
            "seconds": round(time.perf_counter() - t0, 2)}


def _steps(spec: dict) -> dict:
    """Seconds per optimiser step on the tiny model: plain SFT (every response token) vs EKSFT."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.common import compose
    from tokenclean.assets import resolve_model
    from tokenclean.config import TrainingConfig
    from tokenclean.dist import make_accelerator
    from tokenclean.losses import TokenLoss
    from tokenclean.ragged import Ragged
    from tokenclean.scorers.eksft import EKSFTHook
    from tokenclean.train import fit, prepare

    torch.set_num_threads(spec["threads"])
    path = resolve_model("builtin:tiny")
    acc = make_accelerator("no")
    rng = np.random.default_rng(0)
    lm0 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    v, n, length = lm0.config.vocab_size, spec["examples"], spec["length"]
    ids = Ragged.from_list([rng.integers(0, v, length) for _ in range(n)], np.int64)
    target = Ragged.from_list([np.r_[np.zeros(length // 4, bool), np.ones(length - length // 4, bool)]
                               for _ in range(n)], bool)
    cfg = TrainingConfig(lr=1e-4, batch_size=spec["batch"], micro_batch_size=spec["micro"], warmup_ratio=0.0,
                         schedule="constant", mixed_precision="no")
    scfg, _ = compose(None, ["model=tiny", "scorer=eksft"])
    out = {}
    for kind in spec["kinds"]:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        hook = None
        if kind == "eksft":
            ref = TokenLoss(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)).eval()
            hook = EKSFTHook(scfg, target, ref.requires_grad_(False))
        p = prepare(acc, lm, n, cfg, 0)
        t0 = time.perf_counter()
        fit(acc, p, ids, target, cfg, 0, online=hook)
        out[kind] = (time.perf_counter() - t0) / len(p.steps)
    return {"vocab": v, "steps": n // spec["batch"], **{k: round(s, 4) for k, s in out.items()}}


def run(a, argv) -> None:
    rows = []
    for vocab in (int(x) for x in a.vocabs.split(",")):
        got = {}
        for kind, chunk in (("full", a.chunk), ("chunked", a.chunk), ("chunked_small", a.small_chunk)):
            spec = {"vocab": vocab, "kind": kind.replace("_small", ""), "batch": a.batch, "length": a.length,
                    "response": a.response, "hidden": a.hidden, "chunk": chunk}
            got[kind] = collect(spawn(f"benchmarks.{MODULE}", ["_child", "memory", json.dumps(spec)]), kind)
            print(kind, got[kind], flush=True)
        f, c, s = got["full"], got["chunked"], got["chunked_small"]
        rows.append([f"{vocab:,}", f"{a.batch * a.length * vocab * 4 / 2**20:.0f}", f["positions"],
                     f["added_mb"], f"{c['added_mb']} (**{c['added_mb'] / max(f['added_mb'], 1):.2f}x**)",
                     f"{s['added_mb']} (**{s['added_mb'] / max(f['added_mb'], 1):.2f}x**)",
                     f"{f['seconds']} / {c['seconds']} / {s['seconds']}"])
    steps = []
    for micro in (a.step_batch, a.step_batch // 2):
        spec = {"examples": a.step_examples, "batch": a.step_batch, "micro": micro, "length": a.step_length,
                "threads": 1, "kinds": ["sft", "eksft"]}
        r = collect(spawn(f"benchmarks.{MODULE}", ["_child", "steps", json.dumps(spec)]), "steps")
        print(r, flush=True)
        how = "one forward per step (ranks its own values)" if micro == a.step_batch else \
            f"{a.step_batch // micro} micro-batches per step (a no-grad pre-pass of both models)"
        steps.append([how, f"{r['sft'] * 1000:.1f}", f"{r['eksft'] * 1000:.1f}", f"**{r['eksft'] / r['sft']:.2f}x**"])
    lines = ["## EKSFT: KL to the reference from the chunked head, and its cost per step", "",
             f"Command: `{command(MODULE, argv)}`", "", f"Commit: {code_commit()}.", "",
             f"Memory: one training forward and backward of a 2-layer Llama of hidden size {a.hidden} (random "
             f"weights) and a reference of the same shape, batch {a.batch} x {a.length} tokens ({a.response:.0%} "
             "response), fp32. full = the reference code's computation: both models' [batch, length, V] logits, "
             "log-softmax, entropy, KL and sum p^2 with gradients through the current model's; chunked = "
             "TokenLoss(reference=...) (the decoders once, the two heads over the response positions only, "
             f"{a.chunk} positions per chunk, which here holds every response position, or {a.small_chunk}; "
             "the current one's recomputed in backward). Peak RSS (ru_maxrss) added over the models loaded, MB, "
             "a fresh process per cell.", "",
             *table(["vocabulary", "one model's fp32 logits (MB)", "response positions", "full logits (MB)",
                     f"chunked, {a.chunk} (MB)", f"chunked, {a.small_chunk} (MB)",
                     "seconds: full / chunked / small"], rows), "",
             f"Time per optimiser step on builtin:tiny, {a.step_examples} random examples of {a.step_length} tokens "
             f"(75% response), batch {a.step_batch}, one thread: plain SFT on every response token against "
             "scorer=eksft (the reference's decoder and head on every forward, entropy and KL per position; with "
             "several forwards per step, also the pre-pass of the current model).", "",
             *table(["step layout", "SFT (ms/step)", "EKSFT (ms/step)", "ratio"], steps), "",
             f"Machine: {machine()}."]
    write_section("eksft_cost", "\n".join(lines), Path(a.out))


def main(argv=None) -> None:
    if child_main({"memory": _memory, "steps": _steps}):
        return
    argv = list(argv if argv is not None else sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocabs", default="49152,262144")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--response", type=float, default=0.6)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--small-chunk", type=int, default=64)
    ap.add_argument("--step-examples", type=int, default=64)
    ap.add_argument("--step-batch", type=int, default=8)
    ap.add_argument("--step-length", type=int, default=64)
    ap.add_argument("--out", default=str(PERFORMANCE))
    run(ap.parse_args(argv), argv)


if __name__ == "__main__":
    main()
