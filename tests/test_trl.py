"""TRL's SFTTrainer on tokenclean's decisions (tokenclean/integrations/trl.py), against tokenclean itself.

One CLI run of the tiny model with soft weights trains its final stage for 3 optimiser steps of 4 examples and
writes cleaned.parquet; `python -m tokenclean.export --format hf` turns it into a datasets directory. Then:
- one batch: WeightedSFTTrainer's loss equals sum(w * l) / sum(w) from tokenclean's TokenLoss within 1e-6 (fp32),
  and with 0/1 weights it equals TRL's own SFTTrainer loss on the same labels;
- three optimiser steps of WeightedSFTTrainer on the export, in the order of tokenclean's plan of the final stage
  (train.plan_steps with the stage's seed; TRL samples sequentially), end at tokenclean's final weights within the
  tolerance of the 1-vs-2-process tests (tests/test_distributed.py);
- micro-batches of 4 x 1 accumulation step and 2 x 2 end at the same weights.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.cli import ROOT, run_cli, weights

STEPS, BATCH = 3, 4
JOB = ["model=tiny", "tracking=none", "data.limit=120", "selection.method=soft", f"training.max_steps={STEPS}",
       f"training.batch_size={BATCH}", f"training.micro_batch_size={BATCH}", "training.schedule=constant",
       "training.warmup_ratio=0", "cache=false"]
RTOL_FRO, ATOL_MAX = 1e-4, 1e-3     # tests/test_distributed.py's tolerance for sums taken in another order


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    run_cli(JOB, run_dir=root / "run")
    from tokenclean.export import export
    export(root / "run", "hf", root / "hf")
    return root


def base_dir():
    from tokenclean.assets import resolve_model
    return resolve_model("builtin:tiny")


def trainer(data, out, micro=BATCH, accumulation=1, steps=STEPS, weighted=True):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from tokenclean.integrations.trl import WeightedSFTTrainer
    from tokenclean.models import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir(), dtype=torch.float32)
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
                     max_steps=steps, learning_rate=2e-3, lr_scheduler_type="constant", warmup_steps=0,
                     weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", adam_epsilon=1e-8, bf16=False,
                     max_length=None, train_sampling_strategy="sequential", logging_steps=1, save_strategy="no",
                     report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    cls = WeightedSFTTrainer if weighted else SFTTrainer
    return cls(model=model, args=args, train_dataset=data, processing_class=load_tokenizer(base_dir()))


def final_plan(n: int) -> np.ndarray:
    """The examples of tokenclean's final-stage steps, in order."""
    from tokenclean.config import TrainingConfig
    from tokenclean.pipelines.job import stage_seed
    from tokenclean.train import plan_steps
    cfg = TrainingConfig(batch_size=BATCH, micro_batch_size=BATCH, max_steps=STEPS)
    return np.concatenate(plan_steps(n, cfg, stage_seed(42, "final")))


def exported(run):
    from datasets import load_from_disk
    return load_from_disk(str(run / "hf"))


def test_the_export_holds_the_runs_float_weights_and_labels(run):
    data = exported(run)
    assert {"input_ids", "labels", "weights", "response_mask", "record_index"} <= set(data.column_names)
    row = data[0]
    w, labels = np.asarray(row["weights"]), np.asarray(row["labels"])
    assert ((w > 0) == (labels != -100)).all()                  # a token is labelled exactly where it weighs
    assert 0 < w[w > 0].min() < 1 and w.max() <= 1              # soft weights, not a mask
    assert "| selection | method=soft, keep_ratio=0.6" in (run / "hf" / "README.md").read_text()


def test_trl_own_sft_trainer_trains_on_the_export_as_it_is(run, tmp_path):
    """The hf export with every column (weights, response_mask, record_index): TRL's plain SFTTrainer takes it
    without a change and trains on its labels."""
    tr = trainer(exported(run), tmp_path / "plain", steps=2, weighted=False)
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert tr.state.global_step == 2 and len(losses) == 2 and all(0 < float(x) < 10 for x in losses)


def one_batch(data, idx, tr):
    """The collated batch of examples idx and its weight sum, as WeightedSFTTrainer's step sees them."""
    batch = tr.data_collator([data[int(i)] for i in idx])
    batches, total = tr.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    return batches[0], total


def test_one_batch_loss_equals_tokenclean_weighted_loss_and_trl_own_masked_loss(run, tmp_path):
    from tokenclean.losses import TokenLoss, collate
    from tokenclean.ragged import Ragged

    data = exported(run)
    idx = final_plan(len(data))[:BATCH]
    tr = trainer(data, tmp_path / "w")
    batch, total = one_batch(data, idx, tr)
    tr.model.train()
    with torch.no_grad():
        trl_loss = tr.compute_loss(tr.model, dict(batch), num_items_in_batch=total).item()

    ids = Ragged.from_list([np.asarray(r, np.int32) for r in data["input_ids"]], np.int32)
    w = Ragged.from_list([np.asarray(r, np.float32) for r in data["weights"]], np.float32)
    ours = collate(ids, w, idx, pad_id=tr.processing_class.pad_token_id)
    lm = TokenLoss(tr.model).train()
    with torch.no_grad():
        losses = lm(ours["input_ids"], ours["mask"], ours["attention_mask"])
    tokenclean_loss = ((losses * ours["weights"]).sum() / ours["weights"].sum()).item()
    assert abs(trl_loss - tokenclean_loss) < 1e-6, (trl_loss, tokenclean_loss)
    assert abs(total.item() - ours["weights"].sum().item()) < 1e-4

    # 0/1 weights (labels only): the loss of TRL's own SFTTrainer on the same labels
    hard = data.remove_columns("weights")
    tr_hard, tr_trl = trainer(hard, tmp_path / "h"), trainer(hard, tmp_path / "t", weighted=False)
    batch, total = one_batch(hard, idx, tr_hard)
    plain = {k: v for k, v in batch.items() if k != "weights"}
    tr_hard.model.train()
    tr_trl.model.train()
    with torch.no_grad():
        mine = tr_hard.compute_loss(tr_hard.model, dict(batch), num_items_in_batch=total).item()
        theirs = tr_trl.compute_loss(tr_trl.model, plain, num_items_in_batch=total).item()
    assert total.item() == (plain["labels"][:, 1:] != -100).sum().item()
    assert abs(mine - theirs) < 1e-6 and mine != trl_loss, (mine, theirs, trl_loss)


def close(a: dict, b: dict) -> tuple[float, float]:
    """(largest per-tensor relative Frobenius difference, largest element difference)."""
    rel = max(float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(a[k]), 1e-12)) for k in a)
    return rel, max(float(np.abs(a[k] - b[k]).max()) for k in a)


def trained(tr, out) -> dict:
    tr.train()
    tr.save_model(str(out))
    return weights(out)


def test_three_trl_steps_end_at_tokenclean_final_weights_and_micro_batches_do_not_matter(run, tmp_path):
    data = exported(run)
    ordered = data.select(final_plan(len(data)).tolist())
    trl_4x1 = trained(trainer(ordered, tmp_path / "a"), tmp_path / "a_model")
    ours, base = weights(run / "run" / "final"), weights(base_dir())
    moved = max(float(np.abs(ours[k] - base[k]).max()) for k in ours)
    rel, atol = close(ours, trl_4x1)
    assert moved > 5 * ATOL_MAX                                # three steps of lr 2e-3 moved weights by ~6e-3
    # measured: 3.0e-6 relative, 5.4e-6 largest element (rounding of sums taken in another order)
    assert rel <= RTOL_FRO and atol <= ATOL_MAX / 10, (rel, atol)
    trl_2x2 = trained(trainer(ordered, tmp_path / "b", micro=2, accumulation=2), tmp_path / "b_model")
    rel, atol = close(trl_4x1, trl_2x2)
    assert rel <= RTOL_FRO and atol <= ATOL_MAX / 10, (rel, atol)    # measured 2.2e-6, 4.0e-6
    # and the weights matter: training on the same examples with every weight 1 ends elsewhere
    ones = ordered.map(lambda r: {"weights": [float(x != -100) for x in r["labels"]]})
    rel, atol = close(trl_4x1, trained(trainer(ones, tmp_path / "c"), tmp_path / "c_model"))
    assert atol > ATOL_MAX, atol                                       # measured 1.2e-2


def test_two_ranks_of_two_examples_train_as_one_process_of_four(run, tmp_path):
    """The step's weight sum is gathered over the ranks: 2 processes x 2 examples (gloo) make the update of one
    process x 4 (the Trainer hands rank r every W-th batch of the sequential order, so a step holds the same 4)."""
    import subprocess

    from benchmarks.common import launch_command, launch_environment
    from tokenclean.io import cache_root

    data = exported(run)
    ordered = data.select(final_plan(len(data)).tolist())
    ordered.save_to_disk(str(tmp_path / "ordered"))
    one = trained(trainer(ordered, tmp_path / "one"), tmp_path / "one_model")
    cmd = launch_command("ddp.yaml", ["--num_processes", "2"], script=str(ROOT / "tests" / "dist" / "trl_train.py"))
    p = subprocess.run([*cmd, str(tmp_path / "ordered"), str(tmp_path / "two"), "2", "1"], cwd=ROOT,
                       env=launch_environment(cache_root()), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    rel, atol = close(one, weights(tmp_path / "two" / "model"))
    assert rel <= RTOL_FRO and atol <= ATOL_MAX / 10, (rel, atol)
