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
    argument of ``ApiError("x", ...)`` / ``openai_error("x", ...)`` / ``_failed(job, "x", ...)``."""
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
        elif isinstance(node, ast.Call) and node.args:
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            at = {"ApiError": 0, "error_response": 0, "openai_error": 0, "_failed": 1}.get(str(name))
            if at is not None and len(node.args) > at and isinstance(node.args[at], ast.Constant):
                found.add(node.args[at].value)
    return {c for c in found if isinstance(c, str)}


def test_every_code_in_the_tree_is_in_the_catalogue() -> None:
    known = {c.value for c in ErrorCode}
    unknown = {f"{code} ({path.relative_to(ROOT)})" for path in SOURCES
               for code in codes_in(path.read_text(encoding="utf-8")) - known}
    assert not unknown, sorted(unknown)


def test_the_scan_finds_codes_in_every_form() -> None:
    sample = ('raise X("m", code="a")\nclass E:\n    code = "b"\nd = {"code": "c"}\nApiError("d", "m")\n'
              'self._failed(job, "e", "m")\nopenai_error("f", "m", param="p")\n')
    assert codes_in(sample) == {"a", "b", "c", "d", "e", "f"}


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


def doc_rows() -> dict[str, tuple[int, bool]]:
    """docs/errors.md's table: each code's HTTP status and whether a retry may help."""
    doc = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    return {code: (int(status), retry == "yes")
            for code, status, retry in re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \| (yes|no) \|", doc, re.M)}


def test_every_codes_retryable_flag_and_status_are_the_same_everywhere() -> None:
    """Issue 23: the catalogue says once per code whether a retry may help and which HTTP status answers it.
    docs/errors.md, an exception made with the code, every exception class, and every way an error is
    answered say the same: tuwen's routes, the OpenAI-compatible ones (400 for 422), a failed job there, and a
    Batch API error line. (A real job's result: tests/pipeline/test_error_map.py.)"""
    import tuwen.pipeline.bulk.lock  # noqa: F401 - their exception classes register as subclasses
    import tuwen.pipeline.bulk.manifest  # noqa: F401
    import tuwen.pipeline.gateway.batch_keeper  # noqa: F401
    from tuwen.pipeline.bulk.model import Bulk, BulkState, RequestCounts
    from tuwen.pipeline.bulk.openai_outputs import STOPPED, openai_line
    from tuwen.pipeline.errors import TuwenError
    from tuwen.pipeline.gateway.chat_jobs import failure
    from tuwen.pipeline.gateway.errors import ApiError
    from tuwen.pipeline.gateway.openai_errors import as_openai
    from tuwen.pipeline.schema import ErrorInfo, JobResult, JobStatus

    rows = doc_rows()
    assert set(rows) == {c.value for c in ErrorCode}
    bulk = Bulk(id="batch_probe", state=BulkState.in_progress, input="probe", owner="probe",
                request_counts=RequestCounts(total=1), created_at=0.0, expires_at=1.0)
    for code in ErrorCode:
        openai = 400 if code.status == 422 else code.status
        assert rows[code.value] == (code.status, code.retryable), code
        error = TuwenError("probe", code=code.value)
        assert (error.retryable, error.status) == (code.retryable, code.status), code
        assert ApiError(code.value, "probe").status_code == code.status, code
        assert as_openai(error).status == openai, code
        failed = JobResult(id="probe", status=JobStatus.failed, error=ErrorInfo.of(code.value, "probe"))
        assert failed.error is not None and failed.error.retryable == code.retryable, code
        assert failure("probe", failed, 1.0).status == openai, code
        line, ok = openai_line(bulk, {"n": 1, "c": "probe", "j": "probe"}, failed)
        assert not ok and (line["response"] is None if code.value in STOPPED else
                           (line["response"]["status_code"], line["response"]["body"]["error"]["code"])
                           == (openai, code.value)), (code, line)

    def subclasses(cls: type) -> list[type]:
        return [s for c in cls.__subclasses__() for s in (c, *subclasses(c))]

    classes = subclasses(TuwenError)
    assert len(classes) >= 11
    for cls in classes:
        member = ErrorCode(cls.code)
        assert cls.retryable == member.retryable, (cls.__name__, cls.code)
        assert cls.__new__(cls).status == member.status, (cls.__name__, cls.code)


def test_every_code_in_the_catalogue_is_given_somewhere() -> None:
    """A code that nothing gives is a promise the docs make for nothing (image_fetch_failed and
    unsupported_image_encoding were such codes): every code is named somewhere in the tree, as a string or
    as ``ErrorCode.<code>``."""
    given: set[str] = set()
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == "ErrorCode":
                node.body = []  # the catalogue itself does not count
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                given.add(node.value)
            elif isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "ErrorCode":
                given.add(node.attr)
    assert not {c.value for c in ErrorCode} - given
