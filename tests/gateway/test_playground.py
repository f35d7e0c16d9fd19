"""The playground in a real headless Chromium (Debian's, driven by Playwright): paste a key, upload a
picture, ask in Chinese, watch the answer stream in, ask a follow-up. Real gateway, worker, Redis, S3."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need
from tests.gateway.conftest import Gateway
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CHROMIUM = "/usr/bin/chromium"
#: Screenshots go under build/ (ignored), never over tracked files.
SHOTS = Path(__file__).resolve().parents[2] / "build" / "playground"

Keys = Callable[..., str]


@pytest.fixture
def page() -> Iterator[Any]:
    need(shutil.which(CHROMIUM) is not None, f"{CHROMIUM} is not installed (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield browser.new_page(viewport={"width": 1200, "height": 820}, locale="zh-CN")
        finally:
            browser.close()


def test_playground_streams_an_answer_and_a_follow_up(page: Any, gateway: Gateway, worker: WorkerProcess,
                                                      new_key: Keys) -> None:
    sample = load_samples()[4]  # 请数一数这张练习题里有几个圆形。 → 4个
    bodies: list[dict[str, Any]] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data or "{}"))
            if r.url.endswith("/v1/chat/completions") else None)
    page.goto(gateway.url + "/playground")
    # Given a key pasted in, the models loaded, and a picture chosen
    page.fill("#key", new_key())
    page.dispatch_event("#key", "change")
    page.wait_for_function("() => document.querySelector('#model').value.includes('@')", timeout=20_000)
    page.set_input_files("#picture", str(sample.path))
    page.wait_for_function("() => document.querySelector('#preview').style.display === 'block'")
    # And the page noting each text the answer shows as it streams in
    page.evaluate("""() => { window.seen = []; new MutationObserver(() => {
        const turns = document.querySelectorAll('.turn.assistant'), text = turns.length ? turns[0].textContent : '';
        if (text && text !== window.seen[window.seen.length - 1]) window.seen.push(text);
      }).observe(document.querySelector('#chat'), {subtree: true, characterData: true, childList: true}); }""")
    # When a question is asked in Chinese
    page.fill("#question", sample.question)
    page.click("#send")
    # Then the answer appears in the conversation, streamed, and names the picture's fact
    page.wait_for_function("() => document.querySelectorAll('.turn.assistant').length === 1 && "
                           "!document.querySelector('#send').disabled", timeout=60_000)
    first = page.inner_text(".turn.assistant >> nth=0")
    assert all(fact in first for fact in sample.facts), first
    assert page.locator(".turn.error").count() == 0
    assert "first token" in page.inner_text("#status")
    seen = page.evaluate("window.seen")  # the answer grew piece by piece, each a prefix of the next
    assert len(seen) >= 2 and seen[-1] == first and all(b.startswith(a) for a, b in zip(seen, seen[1:])), seen
    # When a follow-up is asked without a new picture
    page.fill("#question", "图中有几个圆形？请再数一数。")
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll('.turn.assistant').length === 2 && "
                           "!document.querySelector('#send').disabled", timeout=60_000)
    second = page.inner_text(".turn.assistant >> nth=1")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "playground.png"), full_page=True)
    # Then it is answered about the same picture, which the page named by its stored key this time
    assert page.locator(".turn.error").count() == 0, page.inner_text("#chat")
    assert all(fact in second for fact in sample.facts), second
    assert [b["stream"] for b in bodies] == [True, True]
    history = bodies[1]["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"] and history[1]["content"] == first
    assert history[0]["content"][0]["image_url"]["url"].startswith("tuwen://images/")
    assert bodies[0]["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
