"""One place for each kind of name: every error code is in the ErrorCode catalogue, docs/errors.md is
generated from it, and every Redis key prefix comes from tuwen.pipeline.keys."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from tuwen.pipeline.errors import ErrorCode

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for layer in ("storage", "pipeline", "workers") for p in sorted((ROOT / layer).rglob("*.py"))]


def codes_in(source: str) -> set[str]:
    """String literals used as error codes: ``code="x"``, ``code = "x"``, ``{"code": "x"}``, and the code
    argument of ``ApiError(status, "x", ...)`` / ``_failed(job, "x", ...)``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.keyword) and node.arg == "code" and isinstance(node.value, ast.Constant):
            found.add(node.value.value)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and any(
                isinstance(t, ast.Name) and t.id == "code" for t in node.targets):
            found.add(node.value.value)
        elif isinstance(node, ast.Dict):
            found |= {v.value for k, v in zip(node.keys, node.values)
                      if isinstance(k, ast.Constant) and k.value == "code" and isinstance(v, ast.Constant)}
        elif isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in ("ApiError", "error_response", "_failed", "openai_error"):
                found.add(node.args[1].value)
    return {c for c in found if isinstance(c, str)}


def test_every_code_in_the_tree_is_in_the_catalogue() -> None:
    known = {c.value for c in ErrorCode}
    unknown = {f"{code} ({path.relative_to(ROOT)})" for path in SOURCES
               for code in codes_in(path.read_text(encoding="utf-8")) - known}
    assert not unknown, sorted(unknown)


def test_the_scan_finds_codes_in_every_form() -> None:
    sample = ('raise X("m", code="a")\nclass E:\n    code = "b"\nd = {"code": "c"}\nApiError(404, "d", "m")\n'
              'self._failed(job, "e", "m")\n')
    assert codes_in(sample) == {"a", "b", "c", "d", "e"}


def test_docs_errors_page_is_generated_from_the_catalogue() -> None:
    out = subprocess.run([sys.executable, "-m", "tuwen.pipeline.errors"], capture_output=True, text=True,
                         check=True)
    assert (ROOT / "docs" / "errors.md").read_text(encoding="utf-8") == out.stdout, \
        "regenerate: python -m tuwen.pipeline.errors > docs/errors.md"


def test_every_redis_key_prefix_comes_from_the_keys_module() -> None:
    spelled = re.compile(r"""["']tuwen:[a-z_]""")
    outside = [f"{p.relative_to(ROOT)}:{n}" for p in SOURCES if p.name != "keys.py"
               for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if spelled.search(line)]
    assert not outside, outside


def test_docs_configuration_page_is_generated_from_the_settings() -> None:
    out = subprocess.run([sys.executable, "-m", "tuwen.pipeline.settings_doc"], capture_output=True, text=True,
                         check=True)
    assert (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8") == out.stdout, \
        "regenerate: python -m tuwen.pipeline.settings_doc > docs/configuration.md"
    assert "TUWEN_HOOK_" not in out.stdout and "FAULT" not in out.stdout and "NULL_MODEL" not in out.stdout
    undocumented = [line for line in out.stdout.splitlines() if line.startswith("| `TUWEN_") and line.endswith("|  |")]
    assert not undocumented, undocumented


def test_every_codes_retryable_flag_is_the_same_everywhere() -> None:
    """Issue 23: the catalogue says once whether a retry may help; docs/errors.md, an exception made with the
    code, and every exception class say the same (ModelError said no where the catalogue said yes)."""
    import tuwen.pipeline.gateway.apikeys  # noqa: F401 - their exception classes register as subclasses
    import tuwen.pipeline.bulk.lock  # noqa: F401
    from tuwen.pipeline.errors import TuwenError

    doc = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (yes|no) \|", doc, re.M))
    assert set(rows) == {c.value for c in ErrorCode}
    for code in ErrorCode:
        assert rows[code.value] == ("yes" if code.retryable else "no"), code
        assert TuwenError("probe", code=code.value).retryable == code.retryable, code

    def subclasses(cls: type) -> list[type]:
        return [s for c in cls.__subclasses__() for s in (c, *subclasses(c))]

    classes = subclasses(TuwenError)
    assert len(classes) >= 8
    for cls in classes:
        assert cls.retryable == ErrorCode(cls.code).retryable, (cls.__name__, cls.code)
