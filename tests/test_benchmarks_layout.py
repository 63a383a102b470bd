"""benchmarks/ stands on its own: nothing under it imports tests/ (tests import the benchmarks, never the other way),
and its shared tables (benchmarks/common.py) agree with conf/."""
import ast
from pathlib import Path

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]


def imports_of_tests(source: str) -> list[int]:
    """The line numbers of the imports of `tests` (or a module under it) in `source`."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        if any(n == "tests" or n.startswith("tests.") for n in names):
            hits.append(node.lineno)
    return hits


def test_nothing_under_benchmarks_imports_tests():
    # the check can fail: each way of importing tests is found, inside a function too; a look-alike name is not
    assert imports_of_tests("import tests.cli\n") == [1]
    assert imports_of_tests("x = 1\ndef f():\n    from tests.test_x import y\n") == [3]
    assert imports_of_tests("from tests import conftest\nimport testsuite\nfrom mytests import a\n") == [1]
    files = sorted((ROOT / "benchmarks").rglob("*.py"))
    assert len(files) > 10
    hits = [f"{f.relative_to(ROOT)}:{n}" for f in files for n in imports_of_tests(f.read_text())]
    assert hits == []


def test_the_model_table_names_what_the_presets_name():
    for name, m in common.MODELS.items():
        if m.pretrained:
            continue
        cfg, _ = common.compose(name, [])
        assert cfg.model.name_or_path == m.name_or_path, name


def test_write_section_replaces_only_its_own_section(tmp_path, capsys):
    out = tmp_path / "perf.md"
    common.write_section("a", "first A", out, title="# T\n")
    common.write_section("b", "first B", out, title="# T\n")
    common.write_section("a", "second A", out, title="# T\n")
    text = out.read_text()
    assert text.startswith("# T\n") and "second A" in text and "first B" in text and "first A" not in text
    assert text.index("second A") < text.index("first B")
