"""The gateway's shape (issue 12): a package of small modules, webhooks that import nothing of the
gateway, and limits that are the schema's own numbers, not copies."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tuwen.pipeline.schema import JOB_ID_MAX, JOB_ID_MIN, JOB_ID_PATTERN, MAX_NEW_TOKENS, MAX_URL_CHARS
from tests.gateway.conftest import Gateway
from tests.test_layering import ROOT, imports_of, module_name

#: Webhooks, the SSRF guard and API keys: gateway-only (issue 23 moved them in), yet apart from the rest of it.
NEIGHBOURS = [ROOT / "pipeline" / "gateway" / name for name in ("webhooks.py", "ssrf.py", "apikeys.py")]
GATEWAY = [p for p in sorted((ROOT / "pipeline" / "gateway").rglob("*.py")) if p not in NEIGHBOURS]


def functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(node.name, (node.end_lineno or node.lineno) - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("path", NEIGHBOURS, ids=lambda p: p.name)
def test_webhooks_and_the_guard_import_nothing_of_the_gateway(path: Path) -> None:
    found = imports_of(path.read_text(encoding="utf-8"), module_name("pipeline", path))
    apart = {module_name("pipeline", p) for p in NEIGHBOURS}
    assert not [(line, m) for line, m in found if m.startswith("tuwen.pipeline.gateway")
                and not any(m == a or m.startswith(a + ".") for a in apart)]


def test_modules_and_functions_stay_small() -> None:
    sizes = {p.relative_to(ROOT): len(p.read_text(encoding="utf-8").splitlines()) for p in GATEWAY + NEIGHBOURS}
    assert len(sizes) >= 12 and all(n <= (400 if ROOT / p in NEIGHBOURS else 300) for p, n in sizes.items()), sizes
    long = {(str(p.relative_to(ROOT)), name): n for p in GATEWAY + NEIGHBOURS for name, n in functions(p) if n > 60}
    assert not long, long


@pytest.mark.integration
def test_documented_limits_are_the_schemas(parked_gateway: Gateway) -> None:
    with parked_gateway.client() as anonymous:
        paths = anonymous.get("/openapi.json").json()["paths"]
    upload = paths["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    tokens = next(s for s in upload["max_new_tokens"]["anyOf"] if s["type"] == "integer")
    callback = next(s for s in upload["callback_url"]["anyOf"] if s["type"] == "string")
    job_id = next(p for p in paths["/v1/jobs/{job_id}"]["get"]["parameters"] if p["name"] == "job_id")["schema"]
    assert tokens["maximum"] == MAX_NEW_TOKENS and callback["maxLength"] == MAX_URL_CHARS
    assert (job_id["pattern"], job_id["minLength"], job_id["maxLength"]) == (JOB_ID_PATTERN, JOB_ID_MIN, JOB_ID_MAX)
