"""Nothing read from disk can run code: resume states are safetensors + JSON (tokenclean/state_files.py), weights load
from safetensors only (a directory with pickle weights is refused in one line), custom model code is never run."""
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cli import TINY, run_cli
from tests.conftest import random_examples
from tokenclean.config import ConfigError, TrainingConfig
from tokenclean.scorers.online import OnlineSelector
from tokenclean.scorers.self_online import learned_since_base
from tokenclean.state_files import load_tree, save_tree
from tokenclean.train import Checkpoints, fit, load_state, prepare, rng_state

ROOT = Path(__file__).resolve().parents[1]
UNSAFE = re.compile(r"torch\.load\(|pickle\.load\(|weights_only\s*=\s*False|allow_pickle\s*=\s*True|"
                    r"trust_remote_code\s*=\s*True|np\.load\([^)]*allow_pickle")


def test_no_loader_that_unpickles_is_left_in_the_package_or_the_benchmarks():
    assert UNSAFE.search('state = torch.load(path, weights_only=False)')          # the pattern can fail
    hits = [f"{f.relative_to(ROOT)}:{i}" for d in ("tokenclean", "benchmarks") for f in sorted((ROOT / d).rglob("*.py"))
            for i, line in enumerate(f.read_text().splitlines(), 1) if UNSAFE.search(line)]
    assert hits == []


def same(a, b):
    """Exact equality of nested states (tensors and arrays by dtype, shape and value)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b)
    else:
        assert a == b


def test_a_state_tree_comes_back_exactly(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    random.seed(3)
    np.random.seed(3)
    value = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(),
             "online": {"keep": np.array([0.5, 0.0], np.float32), "kept_times": np.array([1, 2], np.int32),
                        "scores": np.array([np.nan, 1.5], np.float32), "events": [(3, np.arange(2), np.ones(2))]},
             "stats": {"train_loss": [1.25, float("nan")], "step": np.int64(7), "flag": np.bool_(True)}}
    save_tree(value, tmp_path / "state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    back = load_tree(tmp_path / "state")
    same(back, value)
    assert back["rng"]["numpy"][1].dtype == np.uint32                       # the Mersenne Twister's own dtype
    with pytest.raises(TypeError, match="cannot store a set"):
        save_tree({"x": {1, 2}}, tmp_path / "bad")


def test_a_saved_training_state_has_no_pickle_and_resumes_exactly(tiny_lm, accelerator, tmp_path):
    """fit saves every step (online selector included) as JSON + safetensors; a fresh model and optimiser loaded
    from it hold the same weights, optimiser moments, schedule and selector decisions."""
    ids, tgt = random_examples(8, seed=7)
    cached = tgt.like(np.where(tgt.values, 2.0, np.nan).astype(np.float32))
    cfg = TrainingConfig(lr=1e-2, batch_size=4, micro_batch_size=2, max_steps=2, warmup_ratio=0.0,
                         mixed_precision="no")
    ck = Checkpoints(tmp_path / "state", every=1)
    lm = tiny_lm(seed=3)
    sel = OnlineSelector(learned_since_base, cached, tgt, "soft", 0.5)
    p = prepare(accelerator, lm, len(ids), cfg, 0)
    fit(accelerator, p, ids, tgt, cfg, 0, online=sel, checkpoints=ck)
    newest = sorted(ck.dir.glob("step_*"))[-1]
    assert newest.name == "step_000002"
    assert {f.suffix for f in newest.iterdir()} == {".json", ".safetensors"}
    lm2 = tiny_lm(seed=4)
    sel2 = OnlineSelector(learned_since_base, cached, tgt, "soft", 0.5)
    p2 = prepare(accelerator, lm2, len(ids), cfg, 0)
    step, stats = load_state(accelerator, p2, ck, sel2)
    assert step == 2 and len(stats["train_loss"]) == 2
    for a, b in zip(lm.parameters(), lm2.parameters()):
        assert torch.equal(a, b)
    same(p2.optimizer.state_dict()["state"], p.optimizer.state_dict()["state"])
    assert p2.scheduler.state_dict()["last_epoch"] == p.scheduler.state_dict()["last_epoch"] == 2
    same(sel2.shared_state(), sel.shared_state())
    assert sel2.prepasses == 2 and sel2.keep.dtype == np.float32


@pytest.fixture
def model(tmp_path):
    from tokenclean.assets import resolve_model
    shutil.copytree(resolve_model("builtin:tiny"), tmp_path / "model")
    return tmp_path / "model"


def test_pickle_weights_are_refused_before_anything_reads_them(model, tmp_path):
    from safetensors.torch import load_file
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    proc = run_cli([*TINY, f"model.name_or_path={model}"], tmp_path / "run", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("tokenclean:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"tokenclean: error: model.name_or_path='{model}': {model}/pytorch_model.bin holds "
                               "pickle weights, which tokenclean never loads")
    assert f"save_pretrained('{model}-safetensors')" in lines[0]
    assert f"model.name_or_path={model}-safetensors" in lines[0]
    assert not (tmp_path / "run" / "manifest.json").exists()


def name_custom_code(model: Path, marker: Path, model_type: str | None = None) -> None:
    """config.json and tokenizer_config.json point at custom code that, if imported, writes `marker`."""
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    if model_type:
        config["model_type"] = model_type
    (model / "config.json").write_text(json.dumps(config))
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil.Tokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tok))


def test_custom_code_named_by_a_model_is_never_run(model, tmp_path):
    marker = tmp_path / "ran"
    name_custom_code(model, marker)
    run_cli([*TINY, "data.limit=40", "data.eval_size=8", "training.max_steps=2", f"model.name_or_path={model}"],
            tmp_path / "run")
    assert not marker.exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (Path(summary["checkpoint"]) / "model.safetensors").is_file() and summary["eval_loss_after"] > 0


def test_custom_code_with_a_model_type_transformers_lacks_is_refused(model, tmp_path):
    from tokenclean.models import check_model_dir
    marker = tmp_path / "ran"
    name_custom_code(model, marker, model_type="evil-llm")
    with pytest.raises(ConfigError, match=f"{model}/config.json needs custom code \\(auto_map: AutoConfig, "
                                          "AutoModelForCausalLM; model_type 'evil-llm' .* tokenclean never runs"):
        check_model_dir(str(model))
    assert not marker.exists()
