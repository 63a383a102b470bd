"""The real CLI on the tiny model: files written, exact kept counts, reloadable checkpoints, errors before loading."""
import json
import math

import numpy as np
import pytest
import torch

from tests.cli import TINY, load_array, run_cli, stages


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fixed") / "run"
    # cache=false: every stage computed here, whatever other tests left in the shared score cache
    proc = run_cli([*TINY, "cache=false"], run_dir)
    return run_dir, proc


def test_fixed_pipeline_writes_every_stage(fixed_run):
    run_dir, proc = fixed_run
    assert list(stages(run_dir)) == ["base_losses", "reference", "select", "final"]
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "final/model.safetensors", "final/tokenizer.json",
                 "final/config.json", "reference/model.safetensors", "losses/base.values.npy", "scores.json",
                 "keep.json", "cleaned.parquet", "report.html"):
        assert (run_dir / name).exists(), name
    assert "held-out loss" in proc.stdout and str(run_dir / "final") in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    # 240 records: 24 held out for eval, 20% of the remaining 216 (43) for the warm-up reference, 173 cleaned
    target = load_array(run_dir / "keep")  # same layout as the train split
    assert len(target) == 173
    assert summary["tokens_target"] == 11211
    assert summary["tokens_kept"] == math.floor(0.6 * 11211) == 6726
    assert int(load_array(run_dir / "keep").values.sum()) == 6726
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    # where the time went, as the package measured it: every part this pipeline ran, adding up to the total
    for kind in ("wall", "cpu"):
        parts = summary["timers"][kind]
        assert {"setup", "load", "train", "eval", "base_pass", "reference_pass", "checkpoint", "select",
                "report"} <= parts.keys(), parts
        assert abs(sum(v for k, v in parts.items() if k != "total") - parts["total"]) < 0.05, parts


def test_scores_are_base_minus_reference_and_keep_the_top(fixed_run):
    run_dir, _ = fixed_run
    base, ref = load_array(run_dir / "losses/base"), load_array(run_dir / "losses/reference")
    scores, keep = load_array(run_dir / "scores"), load_array(run_dir / "keep")
    np.testing.assert_array_equal(scores.values, base.values - ref.values)
    s = scores.values
    kept, dropped = s[keep.values], s[~keep.values & ~np.isnan(s)]
    assert kept.min() >= dropped.max()
    assert not np.isnan(s[keep.values]).any()


def test_cleaned_dataset_has_labels_trl_can_use(fixed_run):
    """cleaned.parquet: token ids and a `labels` column, -100 on prompt and dropped tokens, as HF/TRL expect."""
    import datasets

    run_dir, _ = fixed_run
    ds = datasets.load_dataset("parquet", data_files=str(run_dir / "cleaned.parquet"), split="train")
    keep = load_array(run_dir / "keep")
    assert ds.column_names == ["input_ids", "attention_mask", "labels", "response_mask", "record_index"]
    assert len(ds) == len(keep)
    for i in (0, len(ds) - 1):
        labels = np.array(ds[i]["labels"])
        ids = np.array(ds[i]["input_ids"])
        np.testing.assert_array_equal(labels != -100, keep[i])
        np.testing.assert_array_equal(labels[keep[i]], ids[keep[i]])
    assert sum(int((np.array(r) != -100).sum()) for r in ds["labels"]) == 6726
    html = (run_dir / "report.html").read_text()
    assert "kept 6,726 of 11,211 response tokens" in html and 'class="d"' in html


def test_checkpoint_reloads_with_the_same_losses(fixed_run):
    """The saved final model, loaded by plain transformers, gives the held-out loss the run reported."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenclean.data import read_records, split_indices, tokenize
    from tokenclean.losses import TokenLoss, token_losses

    run_dir, _ = fixed_run
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    records, _ = read_records("builtin:chatterbot", limit=240)
    data = tokenize(records, tok, max_length=256)
    eval_idx, _ = split_indices(len(data.input_ids), 24, 42)
    losses = token_losses(Accelerator(cpu=True), TokenLoss(model), data.input_ids.select(eval_idx),
                          data.target.select(eval_idx), batch_size=16, pad_id=tok.pad_token_id)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert np.nanmean(losses.values) == pytest.approx(summary["eval_loss_after"], rel=1e-5)


def test_baselines_run_through_the_same_pipeline(tmp_path):
    run_cli([*TINY, "selection=all"], tmp_path / "all")
    run_cli([*TINY, "selection=random"], tmp_path / "random")
    assert list(stages(tmp_path / "all")) == ["select", "final"]          # no reference, no scoring pass
    all_keep, rnd_keep = load_array(tmp_path / "all/keep"), load_array(tmp_path / "random/keep")
    assert int(all_keep.values.sum()) == 11211
    assert int(rnd_keep.values.sum()) == 6726
    assert not (rnd_keep.values & ~all_keep.values).any()


@pytest.mark.parametrize("override, message", [
    ("selection.keep_ratio=1.5", "selection.keep_ratio=1.5: must be in (0, 1]"),
    ("data.train=/nonexistent/data.jsonl", "data.train='/nonexistent/data.jsonl': no such file"),
    ("model.name_or_path=meta-llama/Llama-3.2-1B", "tokenclean never downloads"),
])
def test_bad_config_fails_before_any_model_loads(tmp_path, override, message):
    proc = run_cli(["model=tiny", "tracking=none", override], tmp_path / "run",
                   env={"TOKENCLEAN_CACHE": str(tmp_path / "cache")}, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "cache").exists()      # the tiny model was never built, let alone loaded


def test_a_value_outside_a_choice_is_rejected_at_composition(tmp_path):
    """Choices are typed (Enums): Hydra refuses the override itself, naming it and the choices, before anything."""
    proc = run_cli(["model=tiny", "tracking=none", "training.schedule=exponential"], tmp_path / "run",
                   env={"TOKENCLEAN_CACHE": str(tmp_path / "cache")}, check=False)
    assert proc.returncode != 0
    assert "training.schedule=exponential" in proc.stderr
    assert "Invalid value 'exponential', expected one of [linear, cosine, constant]" in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_unknown_key_is_rejected(tmp_path):
    proc = run_cli(["model=tiny", "training.lerning_rate=1e-4"], tmp_path / "run", check=False)
    assert proc.returncode != 0
    assert "Key 'lerning_rate' not in 'TrainingConfig'" in proc.stderr


def test_malformed_record_stops_before_any_model_loads(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "hi", "completion": "hello"}\n'
                    '{"prompt": "2+2?", "completion": "4"}\n'
                    '{"prompt": "what?", "answer": "oops"}\n')
    env = {"TOKENCLEAN_CACHE": str(tmp_path / "cache")}
    proc = run_cli(["model=tiny", "tracking=none", f"data.train={data}"], tmp_path / "run", env=env, check=False)
    assert proc.returncode == 2
    assert "sft.jsonl line 3: record has no 'completion' field" in proc.stderr
    assert "data.on_error=skip" in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_on_error_skip_counts_the_skipped_records(tmp_path):
    rows = [{"prompt": f"question {i}?", "completion": f"answer number {i}."} for i in range(60)]
    lines = [json.dumps(r) for r in rows]
    lines[10] = "{not json"
    lines[20] = json.dumps({"prompt": "x", "completion": "   "})
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    run_cli(["model=tiny", "tracking=none", f"data.train={data}", "data.on_error=skip", "data.eval_size=8",
             "selection=all"], run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["malformed_records_skipped"] == 2


def test_lora_and_a_separate_warmup_file(tmp_path):
    """LoRA training merged into a plain checkpoint; the reference learns from its own warm-up file."""
    from transformers import AutoModelForCausalLM

    from tokenclean.assets import builtin_records, resolve_model

    records = builtin_records("builtin:chatterbot")
    warmup = tmp_path / "warmup.jsonl"
    warmup.write_text("\n".join(json.dumps(r) for r in records[-40:]) + "\n")
    run_dir = tmp_path / "run"
    run_cli([*TINY, f"data.warmup={warmup}", "model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8",
             "training.lr=1e-2"], run_dir)
    manifest = stages(run_dir)
    assert manifest["reference"]["steps"] == 5                       # 40 warm-up records / batch 8
    assert len(load_array(run_dir / "keep")) == 216                  # nothing of train taken for the warm-up
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")  # a plain model: the adapter is merged
    base = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny"))
    names = [n for n, _ in final.named_parameters()]
    assert names == [n for n, _ in base.named_parameters()] and not any("lora" in n for n in names)
    changed = {n for (n, p), (_, q) in zip(final.named_parameters(), base.named_parameters()) if not torch.equal(p, q)}
    assert changed and all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                       "gate_proj.weight", "up_proj.weight", "down_proj.weight")) for n in changed)
    assert (run_dir / "final" / "adapter" / "adapter_config.json").exists()
