"""Running on one device or many: the accelerator, SLURM's environment, models built outside ZeRO-3, gathering,
and the rule that every rank runs the same forward passes.

The rule: under DDP every backward all-reduces, and under ZeRO-3 every forward gathers each module's shards
collectively (and checks that the ranks call the same modules in the same order). A rank that has no example for a
pass therefore still runs one (`batch_or_placeholder`): a real example with every position masked out, whose loss
is a zero still connected to the graph (losses.TokenLoss).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from datetime import timedelta

import torch


def slurm_to_torch_env() -> None:
    """Under srun/submitit (one task per GPU, no launcher), derive torch.distributed's variables from SLURM's."""
    env = os.environ
    if "WORLD_SIZE" in env or int(env.get("SLURM_NTASKS", 1)) <= 1 or "SLURM_PROCID" not in env:
        return
    first = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True,
                           text=True, check=True).stdout.split()[0]
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
               LOCAL_WORLD_SIZE=env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0],
               MASTER_ADDR=env.get("MASTER_ADDR", first),
               MASTER_PORT=env.get("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)))


def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def make_accelerator(mixed_precision: str = "auto"):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    mp = mixed_precision
    if mp == "auto":
        mp = "bf16" if bf16_supported() else "no"
    slurm_to_torch_env()
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        from accelerate.state import AcceleratorState
        state = AcceleratorState._shared_state
        if "_mixed_precision" in state and state["_mixed_precision"] != mp:
            # accelerate's state is one per process: a library that made an Accelerator of its own before this one
            # (lm-eval's model does, with no mixed precision) would make ours raise. One process, nothing to sync:
            # start the state afresh with ours.
            AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=mp)
    # gloo when there is no GPU (DeepSpeed on CPU needs it spelled out); a bounded timeout, so a rank that dies
    # takes the others down with an error instead of leaving them waiting forever
    handler = InitProcessGroupKwargs(backend=None if torch.cuda.is_available() else "gloo",
                                     timeout=timedelta(seconds=int(os.environ.get("TOKENCLEAN_TIMEOUT", 1800))))
    # without a GPU, plain multi-process (DDP) needs cpu=True, else accelerate records DistributedType.NO: no barrier,
    # no gradient sync, every rank trains alone; DeepSpeed needs cpu=False, else accelerate silently runs DDP instead
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    acc = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available() and not use_deepspeed,
                      kwargs_handlers=[handler])
    if acc.distributed_type.value == "NO" or acc.num_processes != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate set up {acc.distributed_type} with "
                           f"{acc.num_processes} process(es): the ranks would not synchronise")
    return acc


@contextlib.contextmanager
def not_sharded(accelerator):
    """Build a whole model in this process alone. Under ZeRO-3 accelerate registers its DeepSpeed config with
    transformers, which then builds every model inside deepspeed.zero.Init: sharded, and collectively (a broadcast
    per parameter), so a model built on rank 0 only would wait forever for the other ranks."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config
    if plugin is None or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def gather(accelerator, items: list) -> list:
    """Every rank's list items, on every rank, in rank order."""
    if accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object
    return gather_object(items)


def batch_or_placeholder(collate, idx, fallback) -> dict:
    """collate(idx), or, when this rank has no example for this pass, collate(fallback) with every position masked
    out, so that it still runs the pass (see the module's docstring)."""
    if len(idx):
        return collate(idx)
    batch = collate(fallback)
    batch["mask"][:] = False
    batch.pop("weights", None)
    return batch
