"""benchmarks.gpu --dry-run on a CPU: every check listed in order with its budget (at most 9 minutes together), the
CPU-capable parts run at a tiny size and written to the report as they finish."""
import pytest

from benchmarks import gpu


def test_budgets_fit_nine_minutes_and_the_cuda_tests_come_first():
    todo = gpu.checks("tiny", "runs/gpu")
    assert sum(c.budget for c in todo) <= gpu.TOTAL == 540
    assert [c.name for c in todo][:2] == ["cuda_tests", "default_job_bf16"] and todo[-1].name == "paper_smoke"
    assert todo[-1].budget == 0                       # the paper's comparison takes what is left
    assert all(c.budget > 0 for c in todo[:-1])


def test_dry_run_lists_every_command_and_runs_the_throughput_part(tmp_path):
    out = tmp_path / "gpu.md"
    assert gpu.main(["--dry-run", "--parts", "throughput_smollm2,zero3_1gpu", "--out", str(out),
                     "--runs", str(tmp_path / "runs")]) == 0
    text = out.read_text()
    todo = gpu.checks("tiny", str(tmp_path / "runs"))
    for i, c in enumerate(todo, 1):
        assert f"| {i} | {c.name}: " in text
    assert "| 1 | cuda_tests: CUDA tests: fused vs chunked losses and gradients, packed vs padded (sdpa, flash) " \
        "| 100 |" in text
    assert "## zero3_1gpu: needs CUDA (GPU budget 70 s)" in text
    head, part = text.split("## throughput_smollm2: ok in ", 1)
    assert "--arch tiny --rows 4 --seq 64 --steps 2" in part
    lines = part.splitlines()
    (i,) = [j for j, line in enumerate(lines) if line.startswith("| tiny |")]
    result = dict(zip((c.strip() for c in lines[i - 2].strip("|").split("|")),
                      (c.strip() for c in lines[i].strip("|").split("|"))))
    assert int(result["score_tokens_per_s"]) > 0 and int(result["train_tokens_per_s"]) > 0
    assert result["tokens"] == str(4 * 3 * 64) and result["score_mfu_2N"] == "None"   # no peak known for a CPU
    assert "## default_job_bf16" not in text            # not asked for


def test_unknown_part_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        gpu.main(["--dry-run", "--parts", "warp_drive", "--out", str(tmp_path / "gpu.md")])


def test_without_cuda_a_real_run_is_refused(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is there")
    with pytest.raises(SystemExit):
        gpu.main(["--out", str(tmp_path / "gpu.md")])
