"""Hydra multirun sweeps (one run directory per point) and the metrics every run records."""
import json

from tests.cli import TINY, load_array, run_cli


def test_sweep_runs_each_point_in_its_own_directory(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(["-m", *TINY, "data.limit=120", "selection.keep_ratio=0.4,0.8", f"hydra.sweep.dir={sweep}"])
    points = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(points) == 2 and all("selection.keep_ratio=" in p for p in points)
    ratios = []
    for p in points:
        summary = json.loads((sweep / p / "summary.json").read_text())
        keep = load_array(sweep / p / "keep")
        assert int(keep.values.sum()) == summary["tokens_kept"]
        ratios.append(summary["tokens_kept"] / summary["tokens_target"])
        assert (sweep / p / "final" / "model.safetensors").exists()
    assert abs(ratios[0] - 0.4) < 1e-3 and abs(ratios[1] - 0.8) < 1e-3


def test_metrics_jsonl_and_offline_wandb(tmp_path):
    run_dir = tmp_path / "run"
    run_cli([*TINY, "data.limit=120", "pipeline=self_evolving", "pipeline.chunks=3", "tracking=wandb",
             "tracking.project=tokenclean-test"], run_dir, env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)})
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if "round/tokens_kept" in r]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["round/kept_ratio"] == 1.0 for r in rounds[:1])
    assert all(abs(r["round/kept_ratio"] - 0.6) < 0.01 for r in rounds[1:])
    assert all("round/eval_loss" in r and "round/train_seconds" in r for r in rounds)
    train = [r for r in records if "train/loss" in r]
    steps = [r["train/step"] for r in train]
    assert steps == sorted(steps) and len(set(r["stage"] for r in train)) == 3   # one x-axis across the rounds
    assert any("eval/loss" in r for r in records)
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
