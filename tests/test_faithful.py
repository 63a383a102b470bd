"""Faithful to the paper (issue 18): every arm of a comparison trains on the same pool, the published self-evolving
variant (first_reference=warmup) starts from the warm-up model, and the paper presets carry the reference code's
recipe."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import tokenclean.__main__ as cli
from tests.cli import TINY, load_array, run_cli, same_weights
from tokenclean.config import TrainingConfig, validate
from tokenclean.pipelines.inputs import read_data, tokenize_data, uses_warmup

ARMS = ("full", "random", "rho", "fixed", "self_evolving", "self_evolving_published")


def composed(overrides):
    with initialize_config_dir(config_dir=cli.conf_dir(), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


@pytest.fixture(scope="module")
def tokenizer():
    from tokenclean.assets import resolve_model
    from tokenclean.models import load_tokenizer
    return load_tokenizer(resolve_model("builtin:tiny"))


def pools(configs, tokenizer) -> dict:
    """{arm: (pool fingerprint, warm-up fingerprint or None, warm-up source)} as each arm's job would build them."""
    out = {}
    for arm, cfg in configs.items():
        validate(cfg)
        records, skipped = read_data(cfg)
        d = tokenize_data(cfg, records, skipped, tokenizer)
        out[arm] = (d.train.fingerprint(), d.warmup.fingerprint() if d.warmup is not None and uses_warmup(cfg)
                    else None, d.warmup_source)
    return out


@pytest.mark.parametrize("family", ["llama3b", "llama8b"])
def test_every_paper_arm_trains_on_the_same_pool_and_the_reference_arms_on_the_same_warmup(tmp_path, tokenizer,
                                                                                          family):
    pool, warm = tmp_path / "pool.jsonl", tmp_path / "warmup.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"answer {i}"}) + "\n" for i in range(30)))
    warm.write_text("".join(json.dumps({"prompt": f"w{i}", "completion": f"clean {i}"}) + "\n" for i in range(10)))
    local = [f"model.name_or_path={tmp_path}", f"data.train={pool}", f"data.warmup={warm}", "data.max_length=32"]
    got = pools({arm: composed([f"experiment=paper_{family}_{arm}", *local]) for arm in ARMS}, tokenizer)
    assert len({fp for fp, _, _ in got.values()}) == 1            # one pool for every arm: all 30 records
    needs = {arm for arm, (_, w, _) in got.items() if w is not None}
    assert needs == {"rho", "fixed", "self_evolving_published"}   # the arms that train on the warm-up set ...
    assert len({got[a][1] for a in needs}) == 1                   # ... train on the same one, from the file
    assert {a: src for a, (_, _, src) in got.items()} == {a: "file" if a in needs else "none" for a in ARMS}


def test_a_carved_warmup_split_is_carved_for_every_arm(tokenizer):
    """The built-in data carve their warm-up set from the pool: then every arm, baselines and both pipelines
    included, loses the same examples, so their pools stay identical."""
    arms = {"full": ["selection=all"], "random": ["selection=random"], "fixed": [],
            "self_evolving": ["pipeline=self_evolving"],
            "published": ["pipeline=self_evolving", "pipeline.first_reference=warmup"]}
    tiny = ["model=tiny", "data.limit=60", "data.eval_size=10"]
    got = pools({a: composed([*tiny, *o]) for a, o in arms.items()}, tokenizer)
    assert len({fp for fp, _, _ in got.values()}) == 1
    assert {src for _, _, src in got.values()} == {"carved"}
    assert got["fixed"][1] == got["published"][1] is not None and got["full"][1] is None


def test_an_arm_that_needs_a_warmup_set_and_has_none_says_how_to_give_one(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"prompt": "hi", "completion": "hello"}\n')
    proc = run_cli(["model=tiny", "tracking=none", "data=file", f"data.train={pool}"], tmp_path / "r", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "data.warmup=FILE" in proc.stderr and "data.warmup_fraction" in proc.stderr
    for baseline in (["selection=all"], ["selection=random"], ["pipeline=self_evolving", "selection=all"]):
        cfg = composed(["model=tiny", "data=file", f"data.train={pool}", *baseline])
        assert not uses_warmup(cfg)       # a baseline or round0 self-evolving needs no warm-up set


def test_a_warmup_file_wins_over_the_data_presets_carving(tmp_path, tokenizer):
    """chatterbot carves 20% of the pool; given data.warmup, nothing is carved, for any arm."""
    warm = tmp_path / "warmup.jsonl"
    warm.write_text("".join(json.dumps({"prompt": f"w{i}", "completion": f"clean {i}"}) + "\n" for i in range(10)))
    tiny = ["model=tiny", "data.limit=60", "data.eval_size=10", f"data.warmup={warm}"]
    got = pools({"fixed": composed(tiny), "full": composed([*tiny, "selection=all"])}, tokenizer)
    assert got["fixed"][0] == got["full"][0] and got["fixed"][2] == "file" and got["full"][2] == "none"
    records, skipped = read_data(composed(tiny))
    assert len(tokenize_data(composed(tiny), records, skipped, tokenizer).train) == 50   # 60 - 10 held out


def test_warmup_steps_ceil_and_the_reference_codes_floor():
    from tokenclean.train import warmup_steps
    ceil, floor = TrainingConfig(warmup_ratio=0.03), TrainingConfig(warmup_ratio=0.03, warmup_rounding="floor")
    assert [warmup_steps(ceil, n) for n in (8, 15, 33, 34, 100)] == [1, 1, 1, 2, 3]
    assert [warmup_steps(floor, n) for n in (8, 15, 33, 34, 100)] == [0, 0, 0, 1, 3]


def test_paper_presets_carry_the_reference_codes_recipe(tmp_path):
    for arm in ARMS:
        cfg = composed([f"experiment=paper_llama8b_{arm}", f"model.name_or_path={tmp_path}", "data.train=x.jsonl"])
        assert cfg.training.max_grad_norm == 0 and cfg.training.warmup_rounding == "floor"
        assert cfg.data.warmup_fraction is None and cfg.data.warmup_size is None
        assert cfg.pipeline.first_reference == ("warmup" if arm == "self_evolving_published" else "round0")


def test_published_variant_scores_the_first_chunk_with_exactly_the_warmup_models_losses(tmp_path):
    """first_reference=warmup: the reference stage is the fixed pipeline's own (same weights as a fixed run's
    reference), its stored losses score chunk 1, training continues from it, and every chunk is cleaned."""
    common = [*TINY, "cache=false", "pipeline.chunks=3"]
    fixed, published = tmp_path / "fixed", tmp_path / "published"
    run_cli(common, fixed)
    run_cli([*common, "pipeline=self_evolving", "pipeline.first_reference=warmup"], published)
    assert same_weights(fixed / "reference", published / "reference")
    chunks = json.loads((published / "chunks.json").read_text())
    assert len(chunks) == 3 and sorted(i for c in chunks for i in c) == list(range(len(load_array(fixed / "keep"))))
    assert not (published / "round_0").exists() and (published / "round_3" / "model").is_dir()
    ref = load_array(fixed / "losses/reference").select(chunks[0])
    base = load_array(fixed / "losses/base").select(chunks[0])
    r1 = load_array(published / "round_1/reference_losses")
    assert np.array_equal(r1.values, ref.values, equal_nan=True) and np.array_equal(r1.offsets, ref.offsets)
    scores = load_array(published / "round_1/scores")
    np.testing.assert_array_equal(scores.values, base.values - ref.values)
    # later rounds are scored by the model that trained the round before (not the warm-up model)
    r2 = load_array(published / "round_2/reference_losses")
    ref2 = load_array(fixed / "losses/reference").select(chunks[1])
    assert not np.allclose(r2.values, ref2.values, equal_nan=True)
    summary = json.loads((published / "summary.json").read_text())
    target = sum(int(load_array(published / f"round_{t}/keep").values.sum()) for t in (1, 2, 3))
    assert summary["first_reference"] == "warmup" and [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert summary["tokens_scored"] == summary["tokens_target"] == json.loads(
        (fixed / "summary.json").read_text())["tokens_target"]
    assert summary["tokens_kept"] == target == sum(math.floor(0.6 * r["tokens_target"]) for r in summary["rounds"])
    assert summary["pool"]["warmup_source"] == "carved" and summary["eval_loss_before"] is not None
    assert Path(published / "final").resolve() == (published / "round_3" / "model").resolve()
