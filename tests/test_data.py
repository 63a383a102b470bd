"""tokenclean.data: reading/validating records, chat-template response masks, truncation, splits, fingerprints.

Tokenizers are built locally (a byte-level BPE trained on a few sentences); nothing comes from the hub.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from tokenclean.data import (
    DataError,
    TemplateError,
    read_records,
    render_plain,
    split_indices,
    tokenize,
    tokenizer_fingerprint,
)

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-3 style: bos written by the template itself, one end-of-turn token, no newline after it.
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n\n' + m['content'] + "
          "'<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}")
CORPUS = ["Hello there, how are you?", "The capital of France is Paris.", "I am fine, thank you!",
          "What is two plus two? Four.", "Be brief. Translate to French: good morning. Bonjour."] * 4

SYS, U1, A1, U2, A2 = "Be brief.", "Hello there", "I am fine, thank you!", "What is two plus two?", "Four."


def _backend(bos_post_processor: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


@pytest.fixture(scope="module")
def backends():
    return {"plain": _backend(True), "chat": _backend(False)}


def _fast(backend, **kw):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kw)


@pytest.fixture(scope="module")
def chatml(backends):
    t = _fast(backends["chat"], eos_token="<|im_end|>")
    t.chat_template = CHATML
    return t


@pytest.fixture(scope="module")
def plain(backends):  # no chat template, adds bos by default
    return _fast(backends["plain"], bos_token="<s>", eos_token="</s>")


def _conv(system=True, turns=2):
    msgs = [{"role": "system", "content": SYS}] if system else []
    msgs += [{"role": "user", "content": U1}, {"role": "assistant", "content": A1}]
    if turns == 2:
        msgs += [{"role": "user", "content": U2}, {"role": "assistant", "content": A2}]
    return {"messages": msgs}


def _segments(tok, ids, mask):
    """Decode each contiguous run of target tokens."""
    out, run = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m:
            run.append(i)
        elif run:
            out.append(tok.decode(run)), run.clear()
    if run:
        out.append(tok.decode(run))
    return out


# ------------------------------------------------------------------------------------------------ reading


EXPECTED = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "Translate to French\n\ngood morning"},
                  {"role": "assistant", "content": "Bonjour"}]},
]
SHAPED = {
    "messages": EXPECTED,
    "prompt_completion": [{"prompt": "What is 2+2?", "completion": "4"},
                          {"prompt": "Translate to French\n\ngood morning", "completion": "Bonjour"}],
    "trl_conversational": [{"prompt": [{"role": "user", "content": "What is 2+2?"}],
                            "completion": [{"role": "assistant", "content": "4"}]},
                           {"prompt": [{"role": "user", "content": "Translate to French\n\ngood morning"}],
                            "completion": [{"role": "assistant", "content": "Bonjour"}]}],
    "instruction": [{"instruction": "What is 2+2?", "input": "", "output": "4"},
                    {"instruction": "Translate to French", "input": "good morning", "output": "Bonjour"}],
}


def _write(path, records, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "json_list":
        path.write_text(json.dumps(records))
    elif kind == "json_data":
        path.write_text(json.dumps({"data": records}))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(records), path)
    elif kind == "parquet_pandas":
        import pandas as pd
        pd.DataFrame(records).to_parquet(path)
    elif kind in ("dataset", "dataset_dict"):
        import datasets
        ds = datasets.Dataset.from_list(records)
        if kind == "dataset_dict":
            ds = datasets.DatasetDict({"test": ds.select([0]), "train": ds})
        ds.save_to_disk(str(path))
    return str(path)


SUFFIX = {"jsonl": ".jsonl", "json_list": ".json", "json_data": ".json", "parquet": ".parquet",
          "parquet_pandas": ".parquet", "dataset": "", "dataset_dict": ""}


@pytest.mark.parametrize("kind", list(SUFFIX))
@pytest.mark.parametrize("shape", list(SHAPED))
def test_every_format_and_shape_gives_the_same_records(tmp_path, kind, shape):
    src = _write(tmp_path / f"d{SUFFIX[kind]}", SHAPED[shape], kind)
    records, skipped = read_records(src)
    assert skipped == 0
    assert records == EXPECTED
    forced = "prompt_completion" if shape == "trl_conversational" else shape
    assert read_records(src, fmt=forced)[0] == EXPECTED


def test_json_lines_saved_as_json_and_limit(tmp_path):
    src = _write(tmp_path / "d.json", SHAPED["prompt_completion"] * 3, "jsonl")  # JSON Lines named .json
    assert read_records(src)[0] == EXPECTED * 3
    assert read_records(src, limit=3)[0] == EXPECTED + EXPECTED[:1]
    assert read_records(src, limit=0) == ([], 0)


def test_system_and_multi_turn_and_trl_history(tmp_path):
    recs = [{"instruction": "Hi", "output": "Hello", "system": "Be kind."},
            {"instruction": "Hi", "input": "   ", "output": "Hello"}]
    got, _ = read_records(_write(tmp_path / "a.jsonl", recs, "jsonl"))
    assert got[0]["messages"][0] == {"role": "system", "content": "Be kind."}
    assert got[1]["messages"][0] == {"role": "user", "content": "Hi"}  # blank input is not appended
    trl = [{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "user", "content": "c"}],
            "completion": [{"role": "assistant", "content": "d"}]}]
    got, _ = read_records(_write(tmp_path / "t.jsonl", trl, "jsonl"))
    assert got[0]["messages"][1] == {"role": "assistant", "content": "b", "train": False}  # history, not a target
    assert got[0]["messages"][3] == {"role": "assistant", "content": "d"}
    got, _ = read_records(_write(tmp_path / "m.jsonl", [_conv()], "jsonl"))
    assert got == [_conv()]
    # parquet fills the absent 'train' field of other messages with null: still valid, still a target
    flagged = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "train": False},
                            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    got, _ = read_records(_write(tmp_path / "f.parquet", [flagged], "parquet"))
    assert got == [flagged]


GOOD_PC = json.dumps({"prompt": "p", "completion": "c"})
GOOD_MSG = json.dumps(_conv(turns=1))
BAD = {  # name: (good line used around it, bad line, words the message must contain)
    "bad_json": (GOOD_PC, '{"prompt": "p", ', ["invalid JSON"]),
    "not_object": (GOOD_PC, "[1, 2]", ["a list", "JSON object"]),
    "missing_completion": (GOOD_PC, json.dumps({"prompt": "p", "answer": "a"}),
                           ["no 'completion' field", "keys: prompt, answer", "data.on_error=skip"]),
    "completion_type": (GOOD_PC, json.dumps({"prompt": "p", "completion": 5}), ["'completion'", "a number"]),
    "prompt_type": (GOOD_PC, json.dumps({"prompt": None, "completion": "c"}), ["'prompt'", "null"]),
    "empty_completion": (GOOD_PC, json.dumps({"prompt": "p", "completion": "  \n"}), ["'completion'", "empty"]),
    "unknown_role": (GOOD_MSG, json.dumps({"messages": [{"role": "user", "content": "q"},
                                                        {"role": "bot", "content": "a"}]}),
                     ["'messages[1]'", "unknown role 'bot'"]),
    "missing_content": (GOOD_MSG, json.dumps({"messages": [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "text": "a"}]}),
                        ["'messages[1]'", "no 'content' field"]),
    "content_type": (GOOD_MSG, json.dumps({"messages": [{"role": "user", "content": ["q"]},
                                                        {"role": "assistant", "content": "a"}]}),
                     ["'messages[0].content' is a list, expected a string"]),
    "empty_assistant": (GOOD_MSG, json.dumps({"messages": [{"role": "user", "content": "q"},
                                                          {"role": "assistant", "content": " "}]}),
                        ["'messages[1]'", "empty response"]),
    "no_assistant": (GOOD_MSG, json.dumps({"messages": [{"role": "user", "content": "q"}]}),
                     ["'messages'", "no assistant turn"]),
    "messages_type": (GOOD_MSG, json.dumps({"messages": "hi"}), ["'messages'", "a string"]),
    "missing_messages": (GOOD_MSG, json.dumps({"conversation": []}), ["no 'messages' field"]),
    "missing_output": (json.dumps({"instruction": "i", "output": "o"}), json.dumps({"instruction": "i"}),
                       ["no 'output' field"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_records_raise_with_file_line_and_field(tmp_path, case):
    good, bad, words = BAD[case]
    path = tmp_path / "train_data.jsonl"
    path.write_text("\n".join([good, good, "", bad, good]) + "\n")  # the bad record is on line 4
    with pytest.raises(DataError) as e:
        read_records(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path} line 4: "), msg
    for w in words:
        assert w in msg, (w, msg)
    assert e.value.where == "line 4"
    records, skipped = read_records(str(path), on_error="skip")
    assert (len(records), skipped) == (3, 1)


def test_invalid_utf8_reported_with_its_line(tmp_path, caplog):
    path = tmp_path / "latin.jsonl"
    lines = [GOOD_PC.encode()] * 6
    lines[4] = '{"prompt": "caf\u00e9", "completion": "c"}'.encode("latin-1")  # line 5
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"latin\.jsonl line 5: invalid UTF-8 \(byte 0xe9"):
        read_records(str(path))
    with caplog.at_level(logging.WARNING, logger="tokenclean.data"):
        records, skipped = read_records(str(path), on_error="skip")
    assert (len(records), skipped) == (5, 1)
    assert "skipped 1 of 6" in caplog.text and "line 5: invalid UTF-8" in caplog.text
    jpath = tmp_path / "latin.json"
    jpath.write_bytes(b'[\n {"prompt": "a", "completion": "b"},\n {"prompt": "caf\xe9", "completion": "c"}\n]')
    with pytest.raises(DataError, match=r"latin\.json line 3: invalid UTF-8"):
        read_records(str(jpath), on_error="skip")  # a .json file cannot skip single records


def test_skip_counts_exactly_and_reports_reasons(tmp_path, caplog):
    lines = [GOOD_PC] * 10
    for i in (1, 4, 7):
        lines[i] = json.dumps({"prompt": "p"})
    lines[8] = "not json"
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines))
    with caplog.at_level(logging.WARNING, logger="tokenclean.data"):
        records, skipped = read_records(str(path), on_error="skip")
    assert (len(records), skipped) == (6, 4)
    assert "line 2: record has no 'completion' field" in caplog.text and "line 9: invalid JSON" in caplog.text
    pc = {"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]}
    assert read_records(str(path), on_error="skip", limit=2) == ([pc, pc], 1)  # stops after 2 valid records


def test_record_and_row_numbers_in_other_formats(tmp_path):
    recs = [{"prompt": "p", "completion": "c"}] * 3 + [{"prompt": "p", "completion": ""}]
    for kind, where in (("json_list", "record 4"), ("json_data", "record 4"), ("parquet", "row 4"),
                        ("dataset", "row 4")):
        src = _write(tmp_path / f"{kind}{SUFFIX[kind]}", recs, kind)
        with pytest.raises(DataError, match=rf"{kind}\S* {where}: 'completion' is empty"):
            read_records(src)
        assert read_records(src, on_error="skip")[1] == 1


def test_builtin_source(monkeypatch):
    import types
    fake = types.ModuleType("tokenclean.assets")
    fake.builtin_records = {"builtin:tiny": [EXPECTED[0], {"messages": [{"role": "user", "content": "q"}]}]}.get
    monkeypatch.setitem(sys.modules, "tokenclean.assets", fake)
    with pytest.raises(DataError, match="builtin:tiny record 2: 'messages' has no assistant turn"):
        read_records("builtin:tiny")
    assert read_records("builtin:tiny", on_error="skip") == (EXPECTED[:1], 1)


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken\.parquet: cannot read parquet"):
        read_records(str(tmp_path / "broken.parquet"), on_error="skip")
    (tmp_path / "bad.json").write_text('[{"prompt": "a",\n "completion": }]')
    with pytest.raises(DataError, match=r"bad\.json line 2: invalid JSON"):
        read_records(str(tmp_path / "bad.json"))
    (tmp_path / "obj.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match=r"obj\.json: top level is an object \(keys: rows\)"):
        read_records(str(tmp_path / "obj.json"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        read_records(str(tmp_path / "d.csv"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        read_records(str(tmp_path / "empty.jsonl"))
    (tmp_path / "odd.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"odd\.jsonl line 1: record matches no known shape \(keys: question"):
        read_records(str(tmp_path / "odd.jsonl"))
    src = _write(tmp_path / "pc.jsonl", SHAPED["prompt_completion"], "jsonl")
    with pytest.raises(DataError, match=r"line 1: record has no 'messages' field \(keys: prompt, completion\)"):
        read_records(src, fmt="messages")


def test_read_records_imports_neither_torch_nor_transformers(tmp_path):
    src = _write(tmp_path / "d.jsonl", SHAPED["instruction"], "jsonl")
    code = ("import sys; from tokenclean.data import read_records; read_records(sys.argv[1]); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, src], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ------------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("system", [True, False])
@pytest.mark.parametrize("turns", [1, 2])
def test_chatml_targets_are_assistant_content_plus_im_end(chatml, system, turns):
    rec = _conv(system, turns)
    td = tokenize([rec], chatml, 512)
    ids, mask = td.input_ids[0], td.target[0]
    assert chatml.decode(ids) == chatml.apply_chat_template(rec["messages"], tokenize=False)
    want = [A1 + "<|im_end|>", A2 + "<|im_end|>"][:turns]
    assert _segments(chatml, ids, mask) == want
    assert not mask[0] and td.input_ids.values.dtype == np.int32 and td.target.values.dtype == bool
    assert (td.n_truncated, td.n_truncated_targets, td.n_dropped) == (0, 0, 0)


@pytest.mark.parametrize("turns", [1, 2])
def test_plain_template_targets_and_bos(plain, turns):
    rec = _conv(True, turns)
    td = tokenize([rec], plain, 512)  # no chat template -> plain
    ids, mask = td.input_ids[0], td.target[0]
    assert ids[0] == plain.bos_token_id and ids[1] != plain.bos_token_id
    text = f"### System:\n{SYS}\n\n### User:\n{U1}\n\n### Assistant:\n{A1}</s>\n\n"
    if turns == 2:
        text += f"### User:\n{U2}\n\n### Assistant:\n{A2}</s>\n\n"
    assert render_plain(rec["messages"], "</s>") == text
    assert plain.decode(ids) == "<s>" + text
    assert _segments(plain, ids, mask) == [A1 + "</s>", A2 + "</s>"][:turns]


def test_plain_forced_on_a_chat_tokenizer_and_generation_prompt(chatml):
    td = tokenize([_conv(False, 1)], chatml, 512, template="plain")
    assert _segments(chatml, td.input_ids[0], td.target[0]) == [A1 + "<|im_end|>"]
    assert render_plain(_conv(False, 1)["messages"][:1], "</s>", add_generation_prompt=True).endswith(
        "### Assistant:\n")


def test_template_with_bos_is_not_doubled(backends):
    tok = _fast(backends["plain"], bos_token="<s>", eos_token="<|im_end|>")  # adds bos by default
    tok.chat_template = LLAMA3
    td = tokenize([_conv(True, 2)], tok, 512)
    ids = td.input_ids[0]
    assert ids[0] == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1
    assert _segments(tok, ids, td.target[0]) == [A1 + "<|im_end|>", A2 + "<|im_end|>"]
    # a template passed as a string overrides the tokenizer's own
    td2 = tokenize([_conv(True, 2)], tok, 512, template=CHATML)
    assert tok.decode(td2.input_ids[0]).startswith("<s><|im_start|>system\n")


def test_trl_history_assistant_turns_are_not_targets(chatml):
    msgs = [{"role": "user", "content": U1}, {"role": "assistant", "content": A1, "train": False},
            {"role": "user", "content": U2}, {"role": "assistant", "content": A2}]
    td = tokenize([{"messages": msgs}], chatml, 512)
    assert _segments(chatml, td.input_ids[0], td.target[0]) == [A2 + "<|im_end|>"]


def test_non_prefix_consistent_template_raises(backends):
    tok = _fast(backends["chat"], eos_token="<|im_end|>")
    # hides earlier assistant turns once a later turn exists (like templates that drop earlier reasoning)
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}"
                         "{{ '<|im_start|>assistant\n...<|im_end|>\n' }}{% else %}"
                         "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tokenize([_conv(True, 1)], tok, 512)  # one turn is fine
    with pytest.raises(TemplateError, match="not prefix-consistent on record 1, assistant turn 2"):
        tokenize([_conv(True, 1), _conv(True, 2)], tok, 512)


def test_truncation_counts_are_exact(chatml):
    rec1, rec2 = _conv(True, 1), _conv(False, 2)  # rec2's first answer starts earlier
    full = tokenize([rec1, rec2], chatml, 10_000)
    n1, n2 = full.input_ids.lengths
    m1, m2 = full.target[0], full.target[1]
    assert not m2[-1] and m2[-2]  # ChatML ends "...<|im_end|>" (target) "\n" (not)
    # cut only the final newline of rec2
    td = tokenize([rec1, rec2], chatml, n2 - 1)
    assert (td.n_truncated, td.n_truncated_targets, td.n_dropped) == (1 + int(n1 > n2 - 1), 0, 0)
    # cut rec2 inside its last answer: the lost targets are exactly those beyond the cut
    cut = n2 - 3
    td = tokenize([rec2], chatml, cut)
    assert (td.n_truncated, td.n_truncated_targets, td.n_dropped) == (1, int(m2[cut:].sum()), 0)
    assert td.input_ids.lengths.tolist() == [cut]
    np.testing.assert_array_equal(td.target[0], m2[:cut])
    # cut rec1 before its only answer: no target left -> dropped, rec2 kept
    first_target = int(np.argmax(m1))
    td = tokenize([rec1, rec2], chatml, first_target)
    assert td.n_dropped == 1 and td.n_truncated == 2 and td.record_indices.tolist() == [1]
    assert td.n_truncated_targets == int(m1.sum()) + int(m2[first_target:].sum())
    with pytest.raises(DataError, match="no example has a response token.*data.max_length"):
        tokenize([rec1], chatml, first_target)


def test_batch_matches_one_by_one(chatml, plain):
    recs = [_conv(s, t) for s in (True, False) for t in (1, 2)] * 3
    for tok in (chatml, plain):
        batch = tokenize(recs, tok, 50)  # cuts some, drops none
        assert batch.n_truncated > 0 and batch.n_dropped == 0 and len(batch) == len(recs)
        for i, r in enumerate(recs):
            one = tokenize([r], tok, 50)
            np.testing.assert_array_equal(batch.input_ids[i], one.input_ids[0])
            np.testing.assert_array_equal(batch.target[i], one.target[0])


def test_slow_tokenizer_is_refused(chatml):
    class Slow:
        is_fast = False
    with pytest.raises(TypeError, match="fast tokenizer"):
        tokenize([_conv()], Slow(), 16)


# ------------------------------------------------------------------------------------------------ split, fingerprint


def test_split_indices():
    a, b = split_indices(100, 0.2, seed=0)
    assert len(a) == 20 and len(b) == 80 and not set(a) & set(b) and sorted(set(a) | set(b)) == list(range(100))
    assert np.all(np.diff(a) > 0) and np.all(np.diff(b) > 0)
    a2, b2 = split_indices(100, 0.2, seed=0)
    np.testing.assert_array_equal(a, a2), np.testing.assert_array_equal(b, b2)
    assert not np.array_equal(split_indices(100, 0.2, seed=1)[0], a)
    assert len(split_indices(100, 7, seed=0)[0]) == 7 and len(split_indices(100, 0.29, seed=0)[0]) == 29
    assert len(split_indices(10, 10, seed=0)[1]) == 0
    for bad in (0, 0.0, -1, 1.5, 11, True):
        with pytest.raises(ValueError):
            split_indices(10, bad, seed=0)


def test_fingerprints(backends, chatml):
    recs = [_conv(True, 2)]
    fp = tokenize(recs, chatml, 512).fingerprint()
    assert fp == tokenize(recs, chatml, 512).fingerprint()
    other = [_conv(True, 1)]
    assert tokenize(other, chatml, 512).fingerprint() != fp
    assert tokenize(recs, chatml, 50).fingerprint() != fp  # truncation changes the data
    assert tokenize(recs, chatml, 512, template="plain").fingerprint() != fp
    same = _fast(_backend(False), eos_token="<|im_end|>")
    same.chat_template = CHATML
    assert tokenizer_fingerprint(same) == tokenizer_fingerprint(chatml)  # rebuilt identically
    assert tokenize(recs, same, 512).fingerprint() == fp
    same.chat_template = CHATML + "{# v2 #}"
    assert tokenizer_fingerprint(same) != tokenizer_fingerprint(chatml)
    plain_t = _fast(backends["plain"], bos_token="<s>", eos_token="</s>")
    assert tokenizer_fingerprint(plain_t) != tokenizer_fingerprint(chatml)


# ------------------------------------------------------------------------------------------------ large inputs


def _varied_records(n=60):
    """Multi-turn, system prompts, TRL history turns, non-ASCII text, long prompts (cut at max_length) and answers
    that start beyond it (dropped)."""
    rng = np.random.default_rng(0)
    words = " ".join(CORPUS[:5]).split() + ["caf\u00e9", "na\u00efve", "\u4f60\u597d", "\U0001f600"]

    def text(k):
        return " ".join(rng.choice(words, size=k))
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": text(3)}] if i % 3 == 0 else []
        for t in range(1 + i % 3):
            msgs.append({"role": "user", "content": text(40 if i % 7 == 0 else 4)})
            msgs.append({"role": "assistant", "content": text(2 + i % 5)})
            if i % 4 == 1 and t == 0 and i % 3:
                msgs[-1]["train"] = False   # TRL prompt history: context, not a target
        out.append({"messages": msgs})
    return out


def _reference(records, tok, max_length, template="auto"):
    """The obvious way, one record at a time: render, tokenize, mark the tokens overlapping a target span, add bos,
    cut at max_length, drop the examples left without a target."""
    from tokenclean.data import Examples, bos_to_add, render_chat, resolve_template
    from tokenclean.data.templates import render_plain_spans
    from tokenclean.ragged import Ragged
    chat, bos = resolve_template(tok, template), bos_to_add(tok)
    ids_l, tgt_l, kept, n_cut, n_cut_targets = [], [], [], 0, 0
    for i, r in enumerate(records):
        if chat is None:
            text, spans = render_plain_spans(r["messages"], tok.eos_token)
        else:
            (text,), (spans,) = render_chat([r], tok, chat)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [any(s < b and e > a for s, e in spans) for a, b in enc["offset_mapping"]]
        if bos is not None and (not ids or ids[0] != bos):
            ids, mask = [bos] + ids, [False] + mask
        mask[:1] = [False] * len(mask[:1])
        n_cut += len(ids) > max_length
        n_cut_targets += sum(mask[max_length:])
        if any(mask[:max_length]):
            ids_l.append(ids[:max_length]), tgt_l.append(mask[:max_length]), kept.append(i)
    return Examples(Ragged.from_list(ids_l, np.int32), Ragged.from_list(tgt_l, bool), np.array(kept, np.int64),
                    n_cut, n_cut_targets, len(records) - len(kept))


def _same_examples(a, b):
    for x, y in ((a.input_ids, b.input_ids), (a.target, b.target)):
        assert x.values.dtype == y.values.dtype and x.offsets.dtype == y.offsets.dtype == np.int64
        np.testing.assert_array_equal(x.values, y.values)
        np.testing.assert_array_equal(x.offsets, y.offsets)
    np.testing.assert_array_equal(a.record_indices, b.record_indices)
    assert (a.n_truncated, a.n_truncated_targets, a.n_dropped) == (b.n_truncated, b.n_truncated_targets, b.n_dropped)


@pytest.mark.parametrize("tok_name, template", [("chatml", "auto"), ("plain", "auto"), ("chatml", "plain")])
def test_streamed_tokenize_matches_a_simple_reference(request, tmp_path, monkeypatch, tok_name, template):
    import tokenclean.data as data
    tok = request.getfixturevalue(tok_name)
    records = _varied_records()
    src = _write(tmp_path / "v.jsonl", records, "jsonl")
    monkeypatch.setattr(data.records, "CHUNK", 7)             # many chunks, and Arrow batches, with records across them
    monkeypatch.setattr(data.tokens, "TOKENIZER_CHARS", 300)  # several tokenizer calls per chunk
    conversations, _ = data.read_conversations(src)
    assert len(conversations) == len(records) and list(conversations) == records
    want = _reference(records, tok, 48, template)
    assert want.n_truncated > 5 and want.n_dropped > 2 and want.n_truncated_targets > want.n_dropped
    _same_examples(tokenize(conversations, tok, 48, template), want)
    _same_examples(tokenize(records, tok, 48, template), want)
    _same_examples(tokenize(records, tok, 4096, template), _reference(records, tok, 4096, template))


def test_conversations_index_like_the_record_list(tmp_path, monkeypatch):
    import tokenclean.data as data
    monkeypatch.setattr(data.records, "CHUNK", 2)
    records = _varied_records(9)
    conv, _ = data.read_conversations(_write(tmp_path / "v.parquet", records, "parquet"))
    assert len(conv) == 9 and list(conv) == records == data.read_records(str(tmp_path / "v.parquet"))[0]
    assert conv[4] == records[4] and conv[-1] == records[-1] and conv[3:8] == records[3:8]
    assert conv[8:20] == [records[8]]
    assert conv[5:5] == [] and conv.content.num_chunks > 1
    with pytest.raises(IndexError):
        conv[9]


@pytest.mark.parametrize("kind, where", [("jsonl", "line 6"), ("parquet", "row 6"), ("dataset", "row 6")])
def test_streamed_errors_name_the_record_across_batches(tmp_path, monkeypatch, kind, where):
    """Reading in batches of 2 records: the 6th record's error still names it; skip and limit count across batches."""
    import tokenclean.data as data
    monkeypatch.setattr(data.records, "CHUNK", 2)
    recs = [{"prompt": f"p{i}", "completion": "c" if i != 5 else ""} for i in range(9)]
    src = _write(tmp_path / f"d{SUFFIX[kind]}", recs, kind)
    with pytest.raises(DataError) as e:
        data.read_conversations(src)
    assert str(e.value) == f"{src} {where}: 'completion' is empty (an empty response cannot be trained on). {SKIP}"
    conv, skipped = data.read_conversations(src, on_error="skip")
    assert (len(conv), skipped) == (8, 1) and conv[5]["messages"][0]["content"] == "p6"
    assert data.read_conversations(src, limit=5)[0][:] == [
        {"messages": [{"role": "user", "content": f"p{i}"}, {"role": "assistant", "content": "c"}]} for i in range(5)]
    conv, skipped = data.read_conversations(src, on_error="skip", limit=7)   # the first 7 valid ones
    assert skipped == 1 and [r["messages"][0]["content"] for r in conv] == ["p0", "p1", "p2", "p3", "p4", "p6", "p7"]


SKIP = "Fix the record or set data.on_error=skip to skip such records."


def test_a_lone_surrogate_is_a_record_error_not_a_crash(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(GOOD_PC + "\n" + '{"prompt": "p", "completion": "bad \\ud83d"}\n' + GOOD_PC + "\n")
    with pytest.raises(DataError, match=r"s\.jsonl line 2: a text holds an unpaired surrogate \('\\ud83d'\)"):
        read_records(str(path))
    assert read_records(str(path), on_error="skip")[1] == 1


def test_subset_matches_ragged_select(chatml):
    t = tokenize(_varied_records(30), chatml, 4096)
    for idx in ([3, 0, 7, 7, 29], [0, 4, 5, 29], [], list(range(30))):
        s = t.subset(idx)
        for mine, ref in ((s.input_ids, t.input_ids.select(idx)), (s.target, t.target.select(idx))):
            assert mine.values.dtype == ref.values.dtype
            np.testing.assert_array_equal(mine.values, ref.values)
            np.testing.assert_array_equal(mine.offsets, ref.offsets)
        np.testing.assert_array_equal(s.record_indices, t.record_indices[idx])


def test_memory_grows_with_the_token_arrays_only(plain, tmp_path, monkeypatch):
    """Traced memory (tracemalloc: Python objects and numpy; Arrow's and the tokenizer's native buffers are not
    traced) over reading and tokenizing 1k and 4k short records in chunks of 256: the peak grows by at most 3x
    what the result arrays grow (built chunk by chunk, then concatenated: 2x), not with per-record Python objects
    (the earlier all-at-once path grew 27x the arrays)."""
    import tracemalloc

    import tokenclean.data as data
    monkeypatch.setattr(data.records, "CHUNK", 256)
    monkeypatch.setattr(data.tokens, "TOKENIZER_CHARS", 1 << 14)
    rng = np.random.default_rng(0)
    words = " ".join(CORPUS[:5]).split()
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for _ in range(4_000):
            f.write(json.dumps({"prompt": " ".join(rng.choice(words, size=rng.integers(2, 6))),
                                "completion": " ".join(rng.choice(words, size=rng.integers(2, 10)))}) + "\n")
    tokenize(data.read_conversations(str(path), limit=10)[0], plain, 64)  # warm caches outside the measurement

    def measure(n):
        tracemalloc.start()
        try:
            t = tokenize(data.read_conversations(str(path), limit=n)[0], plain, 64)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        arrays = sum(a.nbytes for a in (t.input_ids.values, t.input_ids.offsets, t.target.values, t.target.offsets,
                                        t.record_indices))
        return peak, arrays
    (p_small, a_small), (p_big, a_big) = measure(1_000), measure(4_000)
    assert a_big > 3 * a_small
    assert p_big - p_small < 3 * (a_big - a_small), (p_small, a_small, p_big, a_big)


def test_the_records_fingerprint_follows_their_content_not_their_file(tmp_path):
    from tokenclean.data import read_conversations
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5000)]   # more than one Arrow chunk
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "d.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    fp = read_conversations(str(jsonl))[0].fingerprint()
    assert read_conversations(str(parquet))[0].fingerprint() == fp        # the same records, another format
    assert read_conversations(str(jsonl), limit=4999)[0].fingerprint() != fp
    for change in ({"prompt": "q4999", "completion": "a4998"},              # one character
                   {"prompt": "q4999a", "completion": "4999"}):            # a character moved across messages
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in [*rows[:-1], change]))
        assert read_conversations(str(jsonl))[0].fingerprint() != fp, change
