"""Every experiment preset composes into the typed config and passes validation (given a model and a data file)."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import tokenclean.__main__ as cli
from tokenclean import scorers
from tokenclean.config import validate

PRESETS = sorted(p.stem for p in (Path(cli.conf_dir()) / "experiment").glob("*.yaml"))


def composed(preset, overrides=()):
    with initialize_config_dir(config_dir=cli.conf_dir(), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=[f"experiment={preset}", *overrides]))


def test_the_paper_presets_are_all_there():
    for model in ("llama3b", "llama8b"):
        for method in ("full", "random", "rho", "fixed", "self_evolving"):
            assert f"paper_{model}_{method}" in PRESETS
    assert "laptop" in PRESETS


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_validates(tmp_path, preset):
    data = tmp_path / "pool.jsonl"
    data.write_text('{"prompt": "hi", "completion": "hello"}\n')
    local = [f"model.name_or_path={tmp_path}", f"data.train={data}"]
    cfg = composed(preset, [] if preset == "laptop" else local)
    validate(cfg)
    scorers.validate(cfg)
    if preset.startswith("paper_"):
        # the reference code's recipe
        assert (cfg.model.lora.enabled, cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == \
            (True, 64, 16, 0.1)
        assert (cfg.training.lr, cfg.training.schedule, cfg.training.warmup_ratio, cfg.training.epochs) == \
            (1e-4, "linear", 0.03, 1)
        assert (cfg.training.batch_size, cfg.data.max_length, cfg.training.mixed_precision) == (48, 2048, "bf16")
        assert (cfg.data.limit, cfg.pipeline.chunks, cfg.selection.keep_ratio) == (50000, 5, 0.6)
        assert set(cfg.eval.tasks) == {"mmlu", "arc_challenge", "hellaswag", "boolq", "truthfulqa_mc1",
                                       "truthfulqa_mc2"}
        method = preset.split("_", 2)[2]
        assert cfg.selection.method == {"full": "all", "random": "random", "rho": "sample"}.get(method, "global")
        assert cfg.pipeline.name == ("self_evolving" if method.startswith("self_evolving") else "fixed")
        assert cfg.name == f"paper-{preset.split('_')[1]}-{method}"


def test_a_paper_preset_without_a_model_path_says_so():
    with pytest.raises(Exception, match="name_or_path"):
        composed("paper_llama3b_fixed")
