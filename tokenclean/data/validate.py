"""Record shapes and their validation: every accepted shape is normalised to ``{"messages": [...]}``.

Every record comes out as ``{"messages": [{"role", "content"}, ...]}`` with roles ``system | user | assistant``. An
assistant message may carry ``"train": False`` (set for the assistant turns inside a TRL conversational *prompt*,
which TRL does not train on); every other assistant turn is a target. The shapes (see `read_conversations`):
``messages``, ``prompt_completion`` (plain strings or TRL's conversational lists) and ``instruction`` (Alpaca).
`detect_shape` picks a file's shape from its first records' keys; `validator` gives the function that checks and
normalises one record of a shape, raising `BadRecord` with the reason.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from tokenclean.data.errors import BadRecord, key_list, type_name

ROLES = ("system", "user", "assistant")
SHAPES = ("messages", "prompt_completion", "instruction")


def detect_shape(objs: Iterable[Any]) -> str | None:
    """The shape most of `objs` have by their keys (``messages``; ``prompt``/``completion``;
    ``instruction``/``output``), or None when none has any of them."""
    votes = dict.fromkeys(SHAPES, 0)
    for o in objs:
        if not isinstance(o, dict):
            continue
        if "messages" in o:
            votes["messages"] += 1
        elif "prompt" in o or "completion" in o:
            votes["prompt_completion"] += 1
        elif "instruction" in o or "output" in o:
            votes["instruction"] += 1
    best = max(votes, key=votes.get)
    return best if votes[best] else None


def _require(rec: dict, key: str) -> Any:
    if key not in rec:
        raise BadRecord(f"record has no '{key}' field (keys: {key_list(rec)})")
    return rec[key]


def _string(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{label} is {type_name(value, article=True)}, expected a string")
    return value


def _check_messages(msgs: Any, label: str, need_target: bool, allow_empty: bool = False,
                    context_only: bool = False) -> list[dict]:
    if not isinstance(msgs, (list, tuple)):
        raise BadRecord(f"'{label}' is {type_name(msgs, article=True)}, expected a list of {{role, content}} messages")
    if not msgs and not allow_empty:
        raise BadRecord(f"'{label}' is an empty list")
    out = []
    for i, m in enumerate(msgs):
        where = f"'{label}[{i}]'"
        sub = f"{label}[{i}]"
        if not isinstance(m, dict):
            raise BadRecord(f"{where} is {type_name(m, article=True)}, expected an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise BadRecord(f"{where} has no '{key}' field (keys: {key_list(m)})")
        role = m["role"]
        if not isinstance(role, str):
            raise BadRecord(f"'{sub}.role' is {type_name(role, article=True)}, expected a string")
        if role not in ROLES:
            raise BadRecord(f"{where} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = _string(m["content"], f"'{sub}.content'")
        msg = {"role": role, "content": content}
        if role == "assistant":
            if not content.strip():
                raise BadRecord(f"{where} is an assistant turn with an empty response")
            train = m.get("train")
            train = True if train is None else train  # Arrow/parquet fill absent struct fields with null
            if not isinstance(train, bool):
                raise BadRecord(f"'{sub}.train' is {type_name(train, article=True)}, expected true or false")
            if context_only or not train:
                msg["train"] = False
        out.append(msg)
    if need_target and not any(m["role"] == "assistant" and m.get("train", True) for m in out):
        raise BadRecord(f"'{label}' has no assistant turn, so there is nothing to train on")
    return out


def _v_messages(rec: dict) -> dict:
    return {"messages": _check_messages(_require(rec, "messages"), "messages", need_target=True)}


def _v_prompt_completion(rec: dict) -> dict:
    prompt, completion = _require(rec, "prompt"), _require(rec, "completion")
    if isinstance(prompt, str):
        head = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)):
        head = _check_messages(prompt, "prompt", need_target=False, allow_empty=True, context_only=True)
    else:
        raise BadRecord(f"'prompt' is {type_name(prompt, article=True)}, expected a string or a list of messages")
    if isinstance(completion, str):
        if not completion.strip():
            raise BadRecord("'completion' is empty (an empty response cannot be trained on)")
        tail = [{"role": "assistant", "content": completion}]
    elif isinstance(completion, (list, tuple)):
        tail = _check_messages(completion, "completion", need_target=True)
    else:
        raise BadRecord(f"'completion' is {type_name(completion, article=True)}, expected a string or a list of "
                        "messages")
    return {"messages": head + tail}


def _v_instruction(rec: dict) -> dict:
    instruction = _string(_require(rec, "instruction"), "'instruction'")
    output = _string(_require(rec, "output"), "'output'")
    inp = rec.get("input")
    inp = "" if inp is None else _string(inp, "'input'")
    system = rec.get("system")
    system = "" if system is None else _string(system, "'system'")
    if not output.strip():
        raise BadRecord("'output' is empty (an empty response cannot be trained on)")
    user = instruction + ("\n\n" + inp if inp.strip() else "")
    msgs = [{"role": "system", "content": system}] if system.strip() else []
    return {"messages": msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}


def _no_shape(rec: dict) -> dict:
    raise BadRecord(f"record matches no known shape (keys: {key_list(rec)}); expected 'messages', "
                    "'prompt'+'completion' or 'instruction'+'output'",
                    "Convert the data to one of these shapes, or set data.format.")


_VALIDATORS = {"messages": _v_messages, "prompt_completion": _v_prompt_completion, "instruction": _v_instruction}


def validator(shape: str | None) -> Callable[[dict], dict]:
    """The function that validates one record of `shape` and returns it normalised to ``{"messages": [...]}``,
    raising BadRecord with the reason; for shape None (no shape detected) one that refuses every record."""
    return _VALIDATORS[shape] if shape else _no_shape
