"""tokenclean.evaluation: lm-eval on local task data, on the built-in tiny model, never touching the HF hub."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenclean.evaluation import OFFLINE_TASKS, TASKS_DIR, EvalError, check_tasks, evaluate, summarize
from tokenclean.tasks import local_data

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
SMALL = ["arc_easy", "sciq", "boolq"]


@pytest.fixture(scope="module", autouse=True)
def cli_run(tiny_dir, tmp_path_factory):
    """The reference: the lm_eval CLI with lm-eval's built-in tasks AND ours (--include_path). Autouse, so its
    subprocess starts with the first test and runs (~25 s) while the others do. Call it to wait for its results JSON
    and per-document samples ({task: {doc_id: sample}})."""
    out = tmp_path_factory.mktemp("cli")
    env = {k: v for k, v in os.environ.items() if k != local_data.ENV}  # the default data root
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_dir},dtype=float32",
           "--tasks", ",".join(SMALL), "--include_path", str(TASKS_DIR), "--limit", "20", "--batch_size", "8",
           "--device", "cpu", "--seed", "1234", "--output_path", str(out), "--log_samples"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    @functools.cache
    def wait():
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, log[-3000:]
        (path,) = out.glob("*/results_*.json")
        samples = {}
        for task in SMALL:
            (f,) = out.glob(f"*/samples_{task}_*.jsonl")
            samples[task] = {s["doc_id"]: s for s in map(json.loads, f.read_text().splitlines())}
        return json.loads(path.read_text()), samples

    yield wait
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def small(tiny_dir):
    """The in-process run that the CLI's must equal, with the network cut: it must need none."""
    import socket

    def cut(*a, **k):
        raise AssertionError(f"network access: {a} {k}")
    connect = socket.socket.connect

    def local_only(sock, addr):
        return connect(sock, addr) if sock.family == socket.AF_UNIX else cut(addr)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", cut)
        mp.setattr(socket.socket, "connect", local_only)
        return evaluate(tiny_dir, SMALL, limit=20)


# ----------------------------------------------------------------------------------------------------------------------
# checks before any model loads


@pytest.fixture
def no_model_load(monkeypatch):
    import lm_eval

    def fail(*a, **k):
        raise AssertionError("simple_evaluate (which loads the model) was called")
    monkeypatch.setattr(lm_eval, "simple_evaluate", fail)


@pytest.mark.parametrize("task", ["tydiqa", "logiqa", "gsm8k"])
def test_task_without_offline_data_fails_before_model_load(task, tiny_dir, no_model_load):
    with pytest.raises(EvalError, match=rf"no offline data ships for {task}; .*eval\.include_path=<dir>"):
        evaluate(tiny_dir, ["arc_easy", task], limit=5)
    with pytest.raises(EvalError, match=task):
        check_tasks([task])


@pytest.mark.parametrize("limit", [0.5, 1.0, True, 0, -3, "10"])
def test_limit_must_be_a_count(limit, tiny_dir, no_model_load):
    with pytest.raises(EvalError, match="eval.limit"):
        evaluate(tiny_dir, ["sciq"], limit=limit)


def test_few_shot_only_where_a_few_shot_split_ships(tiny_dir, no_model_load):
    with pytest.raises(EvalError, match="arc_easy, boolq ship no few-shot split"):
        evaluate(tiny_dir, ["mmlu", "arc_easy", "boolq"], num_fewshot=3)
    with pytest.raises(EvalError, match="eval.num_fewshot"):
        evaluate(tiny_dir, ["mmlu"], num_fewshot=-1)


@pytest.mark.parametrize("name, tasks", [("none", []), ("default", SMALL),
                                         ("paper", ["mmlu", "arc_challenge", "hellaswag", "boolq", "truthfulqa_mc1",
                                                    "truthfulqa_mc2"])])
def test_hydra_presets_fit_the_schema(name, tasks, monkeypatch):
    from omegaconf import OmegaConf

    from tokenclean import fetch
    from tokenclean.config import EvalConfig

    monkeypatch.setenv(fetch.ENV, str(REPO / "tests/data/fetched"))   # TruthfulQA: the two-question fixture

    preset = OmegaConf.load(REPO / f"conf/eval/{name}.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), preset))
    assert cfg.tasks == tasks
    check_tasks(cfg.tasks)  # only tasks that ship


def test_data_root_must_exist(tmp_path, monkeypatch):
    with pytest.raises(EvalError, match="not a directory"):
        check_tasks(["sciq"], data_root=tmp_path / "missing")
    monkeypatch.setenv(local_data.ENV, str(tmp_path / "missing"))
    with pytest.raises(EvalError, match="not a directory"):
        check_tasks(["sciq"])
    monkeypatch.setenv(local_data.ENV, str(tmp_path))  # the variable wins over the installed copy ...
    assert local_data.resolve_root() == tmp_path
    assert local_data.resolve_root(REPO) == REPO  # ... and an explicit root over the variable


def test_every_shipped_task_and_only_ours_are_known():
    manager = check_tasks(OFFLINE_TASKS)
    assert {"mmlu_anatomy", "mmlu_stem"} <= set(manager.all_tasks)
    for name in manager.all_subtasks:  # no built-in lm-eval task (which reads the hub) got indexed
        assert Path(manager.task_index[name].yaml_path).is_relative_to(TASKS_DIR), name


def test_include_path_adds_a_task(tmp_path):
    (tmp_path / "my_sciq.yaml").write_text(f"include: {TASKS_DIR / 'sciq.yaml'}\ntask: my_sciq\n")
    with pytest.raises(EvalError, match="my_sciq"):
        check_tasks(["my_sciq"])
    assert "my_sciq" in check_tasks(["my_sciq", "sciq"], include_path=tmp_path).all_tasks
    with pytest.raises(EvalError, match="include_path"):
        check_tasks(["sciq"], include_path=tmp_path / "missing")


# our task -> lm-eval's own config of it, and the fields we deliberately changed (the data, and what follows from it)
LM_EVAL_CONFIGS = {
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "sciq": "sciq/sciq.yaml",
    "boolq": "super_glue/boolq/default.yaml", "copa": "super_glue/copa/default.yaml", "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
    "winogrande": "winogrande/default.yaml", "commonsense_qa": "commonsense_qa/default.yaml",
    "social_iqa": "siqa/siqa.yaml",
    "truthfulqa_mc1": "truthfulqa/truthfulqa_mc1.yaml", "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml",
    **{p.stem: f"mmlu/default/{p.name}" for p in (TASKS_DIR / "mmlu").glob("mmlu_*.yaml")},
}
OURS_ONLY = {"custom_dataset", "dataset_kwargs", "dataset_path", "dataset_name", "training_split", "test_split",
             "num_fewshot", "tag", "metadata"}


def raw_config(path: Path) -> dict:
    """A task YAML as written, its includes merged, `!function f` read as the dotted name of f."""
    import lm_eval
    import yaml

    class Loader(yaml.SafeLoader):
        pass
    rel = path.parent.relative_to(Path(lm_eval.__file__).parent / "tasks") if "lm_eval" in path.parts else None
    Loader.add_constructor("!function", lambda loader, node: (f"lm_eval.tasks.{'.'.join(rel.parts)}." if rel else "")
                           + loader.construct_scalar(node))
    cfg = yaml.load(path.read_text(), Loader=Loader)
    include = cfg.pop("include", None)
    return {**(raw_config(path.parent / include) if include else {}), **cfg}


def test_configs_mirror_lm_evals_own():
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks"
    assert set(LM_EVAL_CONFIGS) - {n for n in LM_EVAL_CONFIGS if n.startswith("mmlu_")} == \
        set(OFFLINE_TASKS) - {"mmlu"} | {"truthfulqa_mc1", "truthfulqa_mc2"}
    assert len(LM_EVAL_CONFIGS) == 13 + 57
    for task, rel in LM_EVAL_CONFIGS.items():
        ours = raw_config(TASKS_DIR / ("mmlu" if task.startswith("mmlu_") else "") / f"{task}.yaml")
        theirs = raw_config(builtin / rel)
        if task == "boolq":  # google/boolq's bool `answer` is super_glue's `label`
            assert (ours.pop("doc_to_target"), theirs.pop("doc_to_target")) == ("{{answer|int}}", "label")
        if task == "truthfulqa_mc2":  # the same formula, our copy (lm-eval's utils imports sacrebleu, rouge_score)
            assert (ours.pop("process_results"), theirs.pop("process_results")) == (
                "tokenclean.tasks.truthfulqa.process_results_mc2", "lm_eval.tasks.truthfulqa.utils.process_results_mc2")
        metrics = [{k: v for k, v in m.items() if k == "metric"} for m in theirs.pop("metric_list")]
        assert [{"metric": m["metric"]} for m in ours.pop("metric_list")] == metrics, task
        for key in OURS_ONLY:
            ours.pop(key, None), theirs.pop(key, None)
        assert ours == theirs, task
    for group in ("_mmlu.yaml", "_mmlu_humanities.yaml", "_mmlu_other.yaml", "_mmlu_social_sciences.yaml",
                  "_mmlu_stem.yaml"):
        assert raw_config(TASKS_DIR / "mmlu" / group) == raw_config(builtin / "mmlu/default" / group), group


def test_mmlu_prompt_is_five_shot_from_dev():
    from datasets import load_from_disk

    task = check_tasks(["mmlu"]).load(["mmlu_anatomy"])["tasks"]["mmlu_anatomy"]
    root = local_data.resolve_root() / "hails/mmlu_no_train/anatomy"
    dev, test = load_from_disk(str(root / "dev")), load_from_disk(str(root / "test"))
    assert task.config.num_fewshot == 5 and len(task.eval_docs) == len(test) == 135

    def block(doc, answer):
        opts = "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", doc["choices"]))
        return f"{doc['question'].strip()}{opts}\nAnswer:{answer}"
    shots = "\n\n".join(block(d, " " + "ABCD"[d["answer"]]) for d in dev)  # all 5 dev docs, in order
    expected = f"The following are multiple choice questions (with answers) about anatomy.\n\n{shots}\n\n"
    assert task.fewshot_context(test[0], 5) == expected + block(test[0], "")


# ----------------------------------------------------------------------------------------------------------------------
# runs on the tiny model


def test_counts_documents_and_averages(small):
    assert [small[t]["n"] for t in SMALL] == [20, 20, 20]
    assert small["average"]["acc"] == pytest.approx(sum(small[t]["acc"] for t in SMALL) / 3)
    assert set(small) == {*SMALL, "average"}


def test_mmlu_runs_five_shot(tiny_dir, monkeypatch):
    import lm_eval

    runs, real = [], lm_eval.simple_evaluate

    def spy(*args, **kwargs):  # keep lm-eval's full output, which evaluate() summarizes
        runs.append(real(*args, **kwargs))
        return runs[-1]
    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    res = evaluate(tiny_dir, ["mmlu"], limit=1)
    (out,) = runs
    subjects = [t for t in out["n-shot"] if t.startswith("mmlu_") and t in out["n-samples"]]
    assert len(subjects) == 57 and {out["n-shot"][s] for s in subjects} == {5}
    assert {out["configs"][s]["fewshot_split"] for s in subjects} == {"dev"}
    assert res["mmlu"]["n"] == 57 and res["average"]["acc"] == res["mmlu"]["acc"]
    assert res["mmlu"]["acc"] == pytest.approx(out["results"]["mmlu"]["acc,none"])


def test_equals_the_lm_eval_cli(small, cli_run):
    cli, samples = cli_run()
    assert {t: sorted(samples[t]) for t in SMALL} == {t: list(range(20)) for t in SMALL}  # the first `limit` docs
    for task, path in [("arc_easy", "ai2_arc/ARC-Easy"), ("sciq", "sciq/none"), ("boolq", "boolq/none")]:
        assert cli["configs"][task]["dataset_kwargs"]["path"] == path  # the CLI ran our config, not lm-eval's own
    assert summarize(cli, SMALL) == small
    assert set(small["arc_easy"]) == {"acc", "acc_norm", "n"} and set(small["boolq"]) == {"acc", "n"}


def test_data_root_switch(tiny_dir, cli_run, tmp_path):
    """A held-out half in the same layout (sciq docs 10..19 only) scores what the CLI scored on those documents of the
    installed copy; n is 10 with no limit (the installed copy has 1000)."""
    from datasets import load_from_disk

    src = load_from_disk(str(local_data.resolve_root() / "sciq/none/validation"))
    src.select(range(10, 20)).save_to_disk(str(tmp_path / "sciq/none/validation"))
    half = evaluate(tiny_dir, ["sciq"], data_root=tmp_path)["sciq"]
    docs = [cli_run()[1]["sciq"][i] for i in range(10, 20)]
    assert all(d["doc"]["question"] == q for d, q in zip(docs, src[10:20]["question"]))
    assert half == {"acc": sum(d["acc"] for d in docs) / 10, "acc_norm": sum(d["acc_norm"] for d in docs) / 10, "n": 10}
