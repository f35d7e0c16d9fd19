"""The pages for people work offline: /docs and /redoc load every script and style from the gateway
itself (FastAPI's defaults load them from a CDN, so /docs was blank without a network), and
/playground is served. A real uvicorn server over the session's Redis and S3."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import tuwen.pipeline.gateway
from tests.gateway.conftest import Gateway
from tests.gateway.test_playground import page  # noqa: F401 - the browser fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

STATIC = Path(tuwen.pipeline.gateway.__file__).parent / "static"
ASSET_TYPES = ("javascript", "text/css", "image/png")


def references(html: str) -> list[str]:
    """Every ``<script src>`` and ``<link href>`` of a page."""
    return re.findall(r"""<(?:script|link)\b[^>]*?\b(?:src|href)\s*=\s*["']([^"']+)["']""", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_everything_from_the_gateway(parked_gateway: Gateway, page: str) -> None:
    with parked_gateway.client() as anonymous:
        # Given the page, as a browser without a network would get it
        html = anonymous.get(page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        # Then it names nothing outside the gateway (no CDN, no web fonts, no validator badge)
        assert "://" not in html.text, re.findall(r"\S*://\S*", html.text)
        refs = references(html.text)
        assert len(refs) >= 2 and all(ref.startswith("/") and not ref.startswith("//") for ref in refs), refs
        # And every script, style and icon it loads is there, with its type
        assets = {ref: anonymous.get(ref) for ref in refs}
        spec = anonymous.get("/openapi.json")
        metrics = anonymous.get("/metrics").text
    for ref, asset in assets.items():
        assert asset.status_code == 200 and len(asset.content) > 1000, ref
        assert any(kind in asset.headers["content-type"] for kind in ASSET_TYPES), (ref, asset.headers)
    assert "/openapi.json" in html.text and spec.status_code == 200
    # The assets are counted under their mount, never under each file's path
    assert 'route="/docs/assets"' in metrics and ".js\"" not in metrics


def test_playground_and_static_files_are_served(parked_gateway: Gateway) -> None:
    page = (STATIC / "playground.html").read_bytes()
    with parked_gateway.client() as anonymous:
        playground = anonymous.get("/playground")
        static = anonymous.get("/static/playground.html")
        outside = [anonymous.get(path) for path in ("/static/../settings.py", "/static/%2e%2e/settings.py",
                                                    "/static/missing.html")]
        posted = anonymous.post("/static/playground.html")
    assert playground.status_code == 200 and playground.headers["content-type"].startswith("text/html")
    assert playground.content == page and "tuwen 图文" in playground.text
    assert static.status_code == 200 and static.content == page
    # Nothing outside static/ is reachable, and errors keep the gateway's envelope
    assert [r.status_code for r in outside] == [404, 404, 404]
    assert all(r.json()["error"]["code"] == "not_found" for r in outside[1:])
    assert posted.status_code == 405 and posted.json()["error"]["code"] == "method_not_allowed"


def test_the_pages_work_under_their_content_security_policy(page: Any, parked_gateway: Gateway) -> None:
    """Swagger UI, ReDoc and the playground in a real Chromium: each renders, breaks no rule of its
    policy (the browser reports every refused script, style, picture or fetch) and asks no other host."""
    refused: list[str] = []
    elsewhere: list[str] = []
    page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    page.on("request", lambda r: elsewhere.append(r.url)
            if not r.url.startswith((parked_gateway.url + "/", "data:", "blob:")) else None)
    page.add_init_script("document.addEventListener('securitypolicyviolation', e => (window.refused = "
                         "(window.refused || []).concat([e.violatedDirective + ' ' + e.blockedURI])));")
    seen = {}
    # Swagger UI lists the operations, and one opens
    page.goto(parked_gateway.url + "/docs")
    page.wait_for_selector(".opblock-summary-path[data-path='/v1/chat/completions']", timeout=30_000)
    page.click(".opblock-summary-path[data-path='/v1/chat/completions']")
    page.wait_for_selector(".opblock-body", timeout=10_000)
    seen["/docs"] = page.evaluate("window.refused || []")
    # ReDoc renders the document (its menu and an operation), without the logo it fetched from a CDN
    page.goto(parked_gateway.url + "/redoc")
    page.wait_for_selector("h2:has-text('OpenAI-compatible chat completion')", timeout=30_000)
    page.wait_for_timeout(500)
    seen["/redoc"] = page.evaluate("window.refused || []")
    assert page.locator("img[alt='redocly logo']").count() == 0
    # The playground's script runs (it is a file now, not inline)
    page.goto(parked_gateway.url + "/playground")
    page.wait_for_function("() => typeof say === 'function' && document.querySelector('#send') !== null")
    seen["/playground"] = page.evaluate("window.refused || []")
    assert seen == {"/docs": [], "/redoc": [], "/playground": []} and not refused, (seen, refused)
    assert not elsewhere, elsewhere
