"""What the benchmark harnesses share: the config composed and validated as the `tokenclean` command does it, the
model and method tables, child processes (a measurement in a fresh interpreter; a multi-process launch), the
provenance every results file starts with (the command, the commit, the package versions, the machine) and a
results file made of sections that each harness rewrites on its own.

Nothing here (or anywhere under benchmarks/) imports tests/: tests import the benchmarks, never the other way.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


# -- the model and method tables ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    preset: str             # conf/model/<preset>.yaml
    name_or_path: str       # the model that preset names (a harness that loads it without the config uses this)
    pretrained: bool = False    # tiny-chitchat: the preset's model after language modelling on chitchat (built once)


# --model NAME of every harness (each offers the ones it supports). tiny-chitchat is the tiny model pretrained on
# chitchat first: a base that knows some English, so that "what the base already knows" means something.
MODELS = {"smollm2": Model("smollm2", "builtin:smollm2-135m-instruct"),
          "tiny": Model("tiny", "builtin:tiny"),
          "tiny-chitchat": Model("tiny", "builtin:tiny", pretrained=True)}

# the cleaning methods as tokenclean overrides: every arm runs through the real pipelines (benchmarks/accuracy.py)
METHODS = {
    "full": ["selection=all"],
    "random": ["selection=random"],
    "fixed (influence)": ["scorer=influence"],
    "self-evolving (influence)": ["scorer=influence", "pipeline=self_evolving"],
    "rho (online)": ["scorer=rho"],
    "self_online": ["scorer=self_online"],
    "xtf": ["scorer=xtf"],
    "entropy": ["scorer=entropy"],
    "soft (influence)": ["scorer=influence", "selection=soft"],
    "profit": ["scorer=profit"],
    "forgetting": ["scorer=forgetting"],
    "eksft": ["scorer=eksft"],
    "sstoken": ["scorer=sstoken", "selection=sample"],   # ranks within each sample (its REL is normalised there)
}


def tiny_chitchat(steps: int = 600) -> str:
    """The tiny model after `steps` optimiser steps of language modelling on chitchat (every token of the
    conversations, 16 x 256 tokens per step), built once into the tokenclean cache."""
    import numpy as np

    from tokenclean.assets import cached, resolve_model

    def build(out: Path) -> None:
        import torch
        from accelerate import Accelerator

        from tokenclean.config import ModelConfig, TrainingConfig
        from tokenclean.data import read_records, tokenize
        from tokenclean.models import load_model, load_tokenizer
        from tokenclean.train import train
        src = resolve_model("builtin:tiny")
        tok = load_tokenizer(src)
        records, _ = read_records("builtin:chitchat")
        t = tokenize(records, tok, 256)
        every = t.input_ids.like(np.ones(len(t.input_ids.values), bool))
        every.values[t.input_ids.offsets[:-1]] = False
        lm = load_model(src, ModelConfig(name_or_path=src), 0)
        cfg = TrainingConfig(lr=3e-3, batch_size=16, micro_batch_size=16, max_steps=steps, mixed_precision="no",
                             warmup_ratio=0.05, schedule="cosine")
        torch.manual_seed(0)
        train(Accelerator(cpu=True), lm, t.input_ids, every, cfg, seed=0, pad_id=tok.pad_token_id, desc="pretrain")
        lm.save_pretrained(out)
        tok.save_pretrained(out)
    return cached(f"tiny-chitchat-{steps}-v1", build)


def model_path(model: str) -> str:
    """The model `--model NAME` trains (a built-in name, or the built tiny-chitchat directory)."""
    m = MODELS[model]
    return tiny_chitchat() if m.pretrained else m.name_or_path


def model_overrides(model: str) -> list[str]:
    m = MODELS[model]
    return [f"model={m.preset}"] + ([f"model.name_or_path={tiny_chitchat()}"] if m.pretrained else [])


# -- the config, as the command composes and checks it -------------------------------------------------------------
def compose(model: str | None, overrides=()):
    """The tokenclean config for `model` (a MODELS name; None: the config's default model) with tracking off and
    `overrides`, composed and checked as the command does (tokenclean.api.compose). Returns (the typed Config, the
    resolved dict the run directory records)."""
    from tokenclean.api import compose as compose_config
    return compose_config([*(model_overrides(model) if model else []), "tracking=none", *overrides])


# -- child processes --------------------------------------------------------------------------------------------------
def child_env(threads: int | None = None, **extra: str) -> dict:
    """The environment of a measured child: offline, no wandb; threads: torch's intra-op threads there (None:
    torch's default)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), BENCH_THREADS=str(threads))
    return env


def spawn(module: str, args: list[str], threads: int | None = None, **popen) -> subprocess.Popen:
    """`python -m <module> <args>` in a fresh interpreter from the repository root; its result is the last line of
    its stdout, as JSON (collect)."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=child_env(threads),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def collect(proc: subprocess.Popen, what: str, timeout: int = 7200) -> dict:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{err[-6000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run_children(module: str, jobs: list[tuple[str, str, dict]], threads: int | None, together: bool) -> dict:
    """jobs: (name, part, spec), each run as `python -m <module> _child <part> <spec>` (see child_main). together:
    all at once (each then sees the same machine load: the fair way to compare on a shared machine), else one after
    the other."""
    def start(part, spec):
        return spawn(module, ["_child", part, json.dumps(spec)], threads)
    results = {}
    if together:
        procs = [(name, start(part, spec)) for name, part, spec in jobs]
        for name, proc in procs:
            results[name] = collect(proc, name)
    else:
        for name, part, spec in jobs:
            results[name] = collect(start(part, spec), name)
    return results


def child_main(parts: dict) -> bool:
    """In a child started by run_children: run the part named on the command line, print its result as JSON and
    return True; otherwise return False (the harness's own command line)."""
    if len(sys.argv) < 2 or sys.argv[1] != "_child":
        return False
    if os.environ.get("BENCH_THREADS"):
        import torch
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    print(json.dumps(parts[sys.argv[2]](json.loads(sys.argv[3]))))
    return True


def free_port() -> int:
    """A free TCP port for a launch's rendezvous: other runs may launch on this machine at the same time, so never
    torch's default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_environment(cache: Path) -> dict:
    """The environment of an `accelerate launch`: no launcher variables inherited (RANK, MASTER_PORT, ACCELERATE_*),
    the score and model cache at `cache`, offline, no wandb, and a hang failing in 2 minutes."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ACCELERATE_")}
    env.update(TOKENCLEAN_CACHE=str(cache), WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", TOKENCLEAN_TIMEOUT="120")
    return env


def launch_command(config: str | None = None, launcher_args=(), script: str | None = None) -> list[str]:
    """`accelerate launch [--config_file launch/<config>] [launcher_args] --main_process_port <free> -m tokenclean`
    (or <script>); the tokenclean arguments go after it."""
    cmd = [ACCELERATE, "launch"]
    if config:
        cmd += ["--config_file", str(ROOT / "launch" / config)]
    cmd += [*launcher_args, "--main_process_port", str(free_port())]
    return cmd + ([str(script)] if script else ["-m", "tokenclean"])


# -- provenance --------------------------------------------------------------------------------------------------------
def code_commit() -> str:
    """The commit of the code this process runs, with "+dirty" when tracked files other than results/ differ from it
    (a harness rewriting its own results file does not make the code dirty)."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
                           capture_output=True, text=True)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


def package_versions() -> dict:
    """The versions of the packages that decide the numbers: a rebuilt environment can move them as a commit can."""
    from importlib.metadata import version
    return {p: version(p) for p in ("torch", "transformers", "accelerate", "lm_eval", "gguf", "numpy")}


def machine() -> str:
    """The machine in one line: CPU, cores, GPU (or none), the versions, the load average now."""
    import numpy
    import torch
    import transformers
    load = os.getloadavg()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, numpy {numpy.__version__}; "
            f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) at the end")


def command(module: str, argv: list[str]) -> str:
    """The command line that ran, as a user types it."""
    import shlex
    return f"python -m benchmarks.{module}" + ("" if not argv else " " + shlex.join(argv))


def commits_line(rows: list[dict]) -> str:
    """Which commits the rows of a resumable results file ran at (each row records its own)."""
    commits = sorted({r["commit"] for r in rows if r.get("commit")})
    missing = sum(not r.get("commit") for r in rows)
    return (f"Commits the rows ran at: {', '.join(commits) or 'none recorded'}"
            + (f" ({missing} rows ran before the harness recorded a row's commit)" if missing else "") + ".")


def provenance(cmd: str, commit: str | None = None) -> list[str]:
    """The lines a results file (or section) starts with: the exact command, the commit, the machine."""
    return [f"Command: `{cmd}`", "", f"Commit: {commit or code_commit()}. Machine: {machine()}.", ""]


# -- a results file of sections ----------------------------------------------------------------------------------------
PERFORMANCE = RESULTS / "performance.md"
PERFORMANCE_TITLE = ("# Performance: tokenclean at every scale\n\nEach section is written by its own command "
                     "(benchmarks/trl_compare.py, self_evolving_cost.py, memory.py, selection_speed.py, sweep.py), "
                     "which rewrites only that section; the command and the commit are at the top of each.\n")


def write_section(name: str, body: str, out: Path = PERFORMANCE, title: str = PERFORMANCE_TITLE) -> None:
    """Replace the section `name` of `out` (or append it), keeping every other section; a new file starts with
    `title`."""
    out = Path(out)
    begin, end = f"<!-- {out.stem}:{name} -->", f"<!-- /{out.stem}:{name} -->"
    text = out.read_text() if out.exists() else title
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(block)


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
