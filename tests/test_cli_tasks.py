"""Task accuracy inside a run: the base, the reference and the final model scored with lm-evaluation-harness on
local data, recorded in the manifest, metrics.jsonl and summary.json, equal to a direct evaluation of the
checkpoint; a task without offline data fails before any model loads."""
import json

from tests.cli import TINY, run_cli, stages

TASKS = ["eval.tasks=[sciq]", "eval.limit=8"]


def test_task_accuracy_of_every_model_is_recorded_and_matches_a_direct_evaluation(tmp_path):
    from tokenclean.evaluation import evaluate

    run = tmp_path / "run"
    proc = run_cli([*TINY, "data.limit=96", "data.eval_size=8", *TASKS], run)
    st = stages(run)
    assert list(st) == ["base_tasks", "base_losses", "reference", "select", "final"]
    summary = json.loads((run / "summary.json").read_text())
    for label in ("base", "reference", "final"):
        assert summary["tasks"][label]["sciq"]["n"] == 8
    direct = evaluate(run / "final", ["sciq"], limit=8, seed=42)
    assert summary["tasks"]["final"]["sciq"]["acc"] == direct["sciq"]["acc"]
    assert st["final"]["tasks"] == summary["tasks"]["final"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    task_rows = [r for r in rows if "task/sciq/acc" in r]
    assert [r["stage"] for r in task_rows] == ["base", "reference", "final"]
    assert "task sciq" in proc.stdout


def test_a_task_without_offline_data_fails_before_any_model_loads(tmp_path):
    proc = run_cli(["model=tiny", "tracking=none", "eval.tasks=[tydiqa]"], tmp_path / "run",
                   env={"TOKENCLEAN_CACHE": str(tmp_path / "cache")}, check=False)
    assert proc.returncode == 2
    assert "tydiqa" in proc.stderr and "eval.include_path" in proc.stderr
    assert not (tmp_path / "cache").exists()
    # a task whose data is fetched once (make eval-data), not yet fetched: the one-line fix, before any model loads
    proc = run_cli(["model=tiny", "tracking=none", "eval.tasks=[truthfulqa_mc2]"], tmp_path / "run2",
                   env={"TOKENCLEAN_CACHE": str(tmp_path / "cache"), "TOKENCLEAN_DATA": str(tmp_path / "data")},
                   check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "truthful_qa/questions.json is missing" in proc.stderr and "make data" in proc.stderr
    assert not (tmp_path / "cache").exists()
