"""Fuzzed inputs (issue 20, item 5): generated data files and config overrides are either accepted or refused with the
one-line error (a UserError); no other exception escapes, and reading or validating writes nothing. The default
suite runs a fixed seed and a small budget (`FAST`); `pytest -m slow` runs the same properties with a larger one."""
import json
import os
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import tokenclean.__main__ as cli
from tokenclean.config import UserError
from tokenclean.data import read_conversations, tokenize

FAST = settings(max_examples=120, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LARGE = settings(FAST, max_examples=3000)

# -- data files -------------------------------------------------------------------------------------------------------
ODD_TEXT = st.sampled_from(["", " ", "\n", "\ud800", "\udfff x", "\x00", "\u202e", "é", "🙂" * 3, "\r\n", "\ufeff",
                            "x" * 100_000])
TEXT = st.text(max_size=40) | ODD_TEXT
NUMBER = (st.integers(min_value=-(2 ** 80), max_value=2 ** 80) | st.floats(allow_nan=True, allow_infinity=True))
JSON = st.recursive(st.none() | st.booleans() | NUMBER | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)
ROLE = st.sampled_from(["user", "assistant", "system", "tool", "", "USER", "bot"]) | JSON
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": TEXT | JSON}, optional={"train": JSON})
RECORD = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=4) | JSON}),
    st.fixed_dictionaries({"prompt": TEXT | JSON, "completion": TEXT | st.lists(MESSAGE, max_size=2) | JSON}),
    st.fixed_dictionaries({"instruction": TEXT | JSON, "output": TEXT | JSON},
                          optional={"input": TEXT | JSON, "system": TEXT | JSON}),
    JSON,
)
# a line of a JSON Lines file: a record as some writer would write it, cut short, or not JSON at all
LINE = st.one_of(
    st.builds(lambda r, ascii_: json.dumps(r, ensure_ascii=ascii_), RECORD, st.booleans()),
    st.builds(lambda r, k: json.dumps(r)[:k], RECORD, st.integers(0, 30)),
    TEXT,
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
)
ENCODING = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"])


def encode(text: str, encoding: str) -> bytes:
    # lone surrogates go out as the bytes a sloppy writer produces; latin-1 replaces what it cannot hold
    return text.encode(encoding, errors="surrogatepass" if encoding.startswith("utf") else "replace")


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    """(file name, its bytes): JSON Lines most of the time, else one JSON document."""
    encoding = draw(ENCODING)
    if draw(st.integers(0, 3)):
        return "data.jsonl", encode("\n".join(draw(st.lists(LINE, max_size=6))), encoding)
    doc = draw(st.lists(RECORD, max_size=4) | st.fixed_dictionaries({"data": st.lists(RECORD, max_size=4)}) | JSON)
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    return "data.json", encode(text[: draw(st.integers(0, len(text)))] if draw(st.booleans()) else text, encoding)


def files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


@pytest.fixture(scope="module")
def tokenizer():
    from tokenclean.assets import resolve_model
    from tokenclean.models import load_tokenizer
    return load_tokenizer(resolve_model("builtin:tiny"))


def read_and_tokenize(case, on_error, tokenizer) -> str:
    """What the job does with a data file, up to the tokens: 'accepted' or 'refused' (asserting the refusal's
    contract); any other exception fails the property."""
    name, content = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / name).write_bytes(content)
        before = files(root)
        try:
            records, _ = read_conversations(str(root / name), on_error=on_error)
            for r in records:
                assert r["messages"] and all(m["role"] in ("system", "user", "assistant")
                                             and isinstance(m["content"], str) for m in r["messages"])
            records.fingerprint()
            tokenize(records, tokenizer, 64)
            outcome = "accepted"
        except UserError as e:
            line = " ".join(str(e).split())
            assert line and (name in line or "template" in line or "data.max_length" in line), line
            outcome = "refused"
        assert files(root) == before    # nothing written beside the input, nothing changed
    return outcome


def check_data(case, on_error, tokenizer):
    event(read_and_tokenize(case, on_error, tokenizer))   # counted by --hypothesis-show-statistics


@FAST
@given(case=data_files(), on_error=st.sampled_from(["raise", "skip"]))
def test_a_generated_data_file_is_read_or_refused_in_one_line(case, on_error, tokenizer):
    check_data(case, on_error, tokenizer)


@pytest.mark.slow
@LARGE
@given(case=data_files(), on_error=st.sampled_from(["raise", "skip"]))
def test_a_generated_data_file_is_read_or_refused_in_one_line_large_budget(case, on_error, tokenizer):
    check_data(case, on_error, tokenizer)


def test_the_data_fuzzer_reaches_both_outcomes(tokenizer):
    """The generator is not vacuous: a valid file is accepted, a broken one refused."""
    good = ("data.jsonl", json.dumps({"prompt": "hi", "completion": "hello there"}).encode())
    assert read_and_tokenize(good, "raise", tokenizer) == "accepted"
    assert read_and_tokenize(("data.jsonl", b"{not json"), "raise", tokenizer) == "refused"
    assert read_and_tokenize(("data.jsonl", '{"prompt": "\ud800", "completion": "x"}'.encode(
        "utf-8", "surrogatepass")), "raise", tokenizer) == "refused"


# -- config overrides -------------------------------------------------------------------------------------------------
KEYS = ["model.name_or_path", "model.dtype", "model.lora.r", "model.lora.dropout", "data.train", "data.max_length",
        "data.limit", "data.warmup_fraction", "data.warmup_size", "data.eval_size", "data.eval_fraction",
        "data.format", "data.on_error", "data.template", "selection.method", "selection.keep_ratio",
        "selection.threshold", "selection.temperature", "training.lr", "training.epochs", "training.max_steps",
        "training.batch_size", "training.micro_batch_size", "training.warmup_ratio", "training.max_grad_norm",
        "training.save_every", "training.keep_checkpoints", "training.loss_chunk_size", "pipeline.name",
        "pipeline.chunks", "pipeline.chunk_sizes", "pipeline.chunk_fractions", "eval.limit", "eval.every",
        "eval.tasks", "scorer.name", "seed", "name", "resume", "nope", "training.lr_typo"]
GROUPS = ["model", "scorer", "selection", "pipeline", "training", "data", "tracking", "experiment"]
VALUE = st.one_of(
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-0.0", "0", "1", "null", "true", "", "[]", "[1,2]", "[0.5,0.6]",
                     "{a:1}", "${oops}", "${name}", "'quoted'", "\"x y\"", "a,b", "é", "🙂", "builtin:nope", "/nope",
                     "global", "soft", "self_evolving", "influence", "rho", "tiny"]),
    st.text(max_size=12),
)


@st.composite
def overrides(draw) -> list[str]:
    out = ["model=tiny"]
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.integers(0, 4)):
            out.append(f"{draw(st.sampled_from(KEYS))}={draw(VALUE)}")
        else:
            out.append(f"{draw(st.sampled_from(GROUPS))}={draw(VALUE)}")
    if draw(st.integers(0, 9)) == 0:
        out.append(f"+{draw(st.sampled_from(KEYS))}={draw(VALUE)}")
    return out


def configure(args: list[str]) -> str:
    """The CLI's path from overrides to a config that can run, in process: 'accepted' or 'refused' (in one line);
    any other exception fails the property."""
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            try:
                with initialize_config_dir(config_dir=cli.conf_dir(), version_base="1.3"):
                    cfg = compose("config", overrides=args)
            except Exception as e:   # before app() runs: main() turns every such error into its one line
                said = cli.composition_error(e).split(". `tokenclean --help`")[0].strip()
                assert said and said != type(e).__name__, said   # Hydra's or OmegaConf's own words, not a blank
                cfg = None
            outcome = "refused" if cfg is None else "accepted"
            if cfg is not None:
                cli.typed_config(cfg)
        except UserError as e:
            assert str(e).strip()
            outcome = "refused"
        finally:
            os.chdir(cwd)
        assert not any(Path(tmp).iterdir())    # validation writes nothing
    return outcome


@FAST
@given(args=overrides())
def test_generated_overrides_compose_or_are_refused_in_one_line(args):
    event(configure(args))


@pytest.mark.slow
@LARGE
@given(args=overrides())
def test_generated_overrides_compose_or_are_refused_in_one_line_large_budget(args):
    event(configure(args))


def test_the_config_fuzzer_reaches_both_outcomes():
    assert configure(["model=tiny", "selection.keep_ratio=0.5"]) == "accepted"
    assert configure(["model=tiny", "training.lr=1e400"]) == "refused"
    assert configure(["model=tiny", "+nope=1"]) == "refused"
