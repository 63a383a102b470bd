"""Training state on disk without pickle: a nested value (dicts, lists, tuples, numbers, strings, torch tensors,
numpy arrays) as `<stem>.json` (the structure, every scalar in place) beside `<stem>.safetensors` (every tensor and
array, by name). Nothing read back can run code, unlike an unpickled file (torch.save, pickle): a resume
state lives on a shared disk, and whoever can write there must not be able to run code in the next job.

What it holds, exactly: the optimiser's and scheduler's state dicts (integer keys, 0-d tensors), the Python, numpy and
torch random streams (tuples, uint32 arrays, byte tensors), and the online selector's decisions. A type outside that
set is a bug in the caller and raises TypeError when written, never silently converted.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# numpy dtypes torch.from_numpy takes as they are; others (uint32: the Mersenne Twister's state) go as int64
AS_IS = {np.dtype(t) for t in ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64")}


def save_tree(value, stem: Path) -> None:
    """Write `value` as stem.json + stem.safetensors (plain writes: callers publish the directory atomically)."""
    import torch
    from safetensors.torch import save_file
    tensors: dict = {}

    def enc(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, torch.Tensor):
            name = f"t{len(tensors)}"
            v = v.detach().cpu().contiguous()
            # safetensors refuses a view of a larger storage; copying every tensor would double a large optimiser
            # state in host memory, so only views are copied
            tensors[name] = v.clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
            return {"tensor": name}
        if isinstance(v, np.ndarray):
            if v.dtype not in AS_IS and v.dtype.kind not in "ui":
                raise TypeError(f"cannot store a numpy array of dtype {v.dtype}")
            name = f"t{len(tensors)}"
            tensors[name] = torch.from_numpy(np.ascontiguousarray(v if v.dtype in AS_IS else v.astype(np.int64)))
            return {"array": name, "dtype": v.dtype.str}
        if isinstance(v, np.generic):
            return {"scalar": v.dtype.str, "value": v.item()}
        if isinstance(v, tuple):
            return {"tuple": [enc(x) for x in v]}
        if isinstance(v, list):
            return [enc(x) for x in v]
        if isinstance(v, dict):
            if not all(isinstance(k, (str, int)) for k in v):
                raise TypeError(f"cannot store dict keys of types {sorted({type(k).__name__ for k in v})}")
            return {"dict": [[k, enc(x)] for k, x in v.items()]}
        raise TypeError(f"cannot store a {type(v).__name__} in a training state")

    structure = enc(value)
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(structure))


def load_tree(stem: Path):
    """The value `save_tree` wrote at stem."""
    from safetensors.torch import load_file
    tensors = load_file(str(stem.with_suffix(".safetensors")))

    def dec(v):
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not isinstance(v, dict):
            return v
        if "tensor" in v:
            return tensors[v["tensor"]]
        if "array" in v:
            return tensors[v["array"]].numpy().astype(np.dtype(v["dtype"]))
        if "scalar" in v:
            return np.dtype(v["scalar"]).type(v["value"])
        if "tuple" in v:
            return tuple(dec(x) for x in v["tuple"])
        return {k: dec(x) for k, x in v["dict"]}

    return dec(json.loads(stem.with_suffix(".json").read_text()))
