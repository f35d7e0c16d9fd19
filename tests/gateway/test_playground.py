"""The playground in a real headless Chromium (Debian's, driven by Playwright): paste a key, upload a
picture, ask in Chinese, watch the answer stream in, ask a follow-up; the page as a place to stay (Chinese
labels with English a click away, the key kept for the session, Enter sends, a new conversation forgets the
picture, thumbnails, the model count, a JSON schema box, the icon) and its layout at 1280, 390 and 360 px.
Real gateway, worker, Redis, S3."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
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
            yield browser.new_page(viewport={"width": 1280, "height": 820}, locale="zh-CN")
        finally:
            browser.close()


def test_playground_streams_an_answer_and_a_follow_up(page: Any, gateway: Gateway, worker: WorkerProcess,
                                                      new_key: Keys) -> None:
    sample = load_samples()[4]  # 请数一数这张练习题里有几个圆形。 → 4个
    bodies = requests_to_chat(page)
    # Given a key pasted in, the models loaded, and a picture chosen
    with_key(page, gateway.url, new_key())
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
    assert "首个 token" in page.inner_text("#status")
    # And the question shows its picture, a thumbnail of the bytes sent (no "[+ picture]")
    thumb = page.locator(".turn.user >> nth=0").locator("img.thumb")
    assert thumb.get_attribute("src").startswith("data:image/png;base64,")
    assert page.evaluate("() => document.querySelector('.turn.user img.thumb').naturalWidth") > 0
    assert "picture]" not in page.inner_text("#chat")
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


def requests_to_chat(page: Any) -> list[dict[str, Any]]:
    """The bodies of the chat requests the page sends from now on."""
    bodies: list[dict[str, Any]] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data or "{}"))
            if r.url.endswith("/v1/chat/completions") else None)
    return bodies


def with_key(page: Any, url: str, key: str) -> None:
    page.goto(url + "/playground")
    page.fill("#key", key)
    page.dispatch_event("#key", "change")
    page.wait_for_function("() => document.querySelector('#model').value.includes('@')", timeout=20_000)


def answered(page: Any, n: int) -> str:
    """Wait for the n-th answer to end; returns its text."""
    page.wait_for_function(f"() => document.querySelectorAll('.turn.assistant, .turn.error').length === {n} && "
                           "!document.querySelector('#send').disabled", timeout=60_000)
    return str(page.inner_text(f".turn >> nth={2 * n - 1}"))


def test_labels_are_chinese_with_english_a_click_away_and_the_key_stays_for_the_session(
        page: Any, gateway: Gateway, worker: WorkerProcess, new_key: Keys) -> None:
    key = new_key()
    page.goto(gateway.url + "/playground")
    # Given the page as it opens: Chinese labels

    def labels() -> list[str]:
        return [page.inner_text("label[for=key]"), page.inner_text("#send"), page.inner_text("#reset")]

    assert labels() == ["API 密钥", "发送", "新对话"] and page.evaluate("document.documentElement.lang") == "zh-CN"
    # When EN is clicked, English; when 中文 is clicked, Chinese again (kept across a reload meanwhile)
    page.click("#lang")
    assert labels() == ["API key", "Send", "New conversation"] and page.inner_text("#lang") == "中文"
    page.reload()
    assert labels()[1] == "Send"
    page.click("#lang")
    assert labels() == ["API 密钥", "发送", "新对话"] and page.evaluate("document.documentElement.lang") == "zh-CN"
    # When a key is pasted, the models load and the page counts the live workers' models, not the aliases
    page.fill("#key", key)
    page.dispatch_event("#key", "change")
    page.wait_for_function("() => document.querySelector('#model').value.includes('@')", timeout=20_000)
    with gateway.client(key) as api:
        listed = [m["id"] for m in api.get("/v1/models").json()["data"]]
    workers = [m for m in listed if "@" in m]
    assert "tuwen" in listed and len(workers) >= 1
    assert page.inner_text("#status") == f"{len(workers)} 个模型在线"
    assert page.locator("#model option").count() == len(listed)
    # Then a reload keeps the key (sessionStorage) and loads the models again by itself
    page.reload()
    page.wait_for_function("() => document.querySelector('#model').value.includes('@')", timeout=20_000)
    assert page.input_value("#key") == key and page.inner_text("#status") == f"{len(workers)} 个模型在线"


def test_enter_sends_shift_enter_breaks_and_a_new_conversation_forgets_the_picture(
        page: Any, gateway: Gateway, worker: WorkerProcess, new_key: Keys) -> None:
    sample = load_samples()[2]  # 图形是什么颜色的？ → 蓝色
    bodies = requests_to_chat(page)
    with_key(page, gateway.url, new_key())
    page.set_input_files("#picture", str(sample.path))
    page.wait_for_function("() => document.querySelector('#preview').style.display === 'block'")
    # Given a question typed on two lines: Shift+Enter makes a new line and sends nothing
    page.click("#question")
    page.keyboard.type("图形是什么")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("颜色的？")
    assert page.input_value("#question") == "图形是什么\n颜色的？" and bodies == []
    # When Enter is pressed, it is sent, with the picture, and answered with the picture's fact
    page.keyboard.press("Enter")
    first = answered(page, 1)
    assert all(fact in first for fact in sample.facts), first
    assert len(bodies) == 1 and bodies[0]["messages"][0]["content"][0]["type"] == "image_url"
    assert bodies[0]["messages"][0]["content"][1]["text"] == "图形是什么\n颜色的？"
    # When a new conversation starts, the transcript and the picture are gone
    page.click("#reset")
    assert page.locator(".turn").count() == 0
    assert page.evaluate("() => getComputedStyle(document.querySelector('#preview')).display") == "none"
    assert page.input_value("#picture") == ""
    # Then the next question is sent alone: no earlier turn, no picture
    page.fill("#question", "你好")
    page.press("#question", "Enter")
    answered(page, 1)
    assert len(bodies) == 2 and len(bodies[1]["messages"]) == 1
    assert [part["type"] for part in bodies[1]["messages"][0]["content"]] == ["text"]
    assert page.locator(".turn.user img").count() == 0


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["shape", "count"],
          "properties": {"shape": {"enum": ["圆形", "三角形", "正方形", "长方形"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 9}}}


def test_the_json_schema_box_asks_for_structured_answers_and_shows_them_parsed(
        page: Any, gateway: Gateway, worker: WorkerProcess, new_key: Keys) -> None:
    sample = load_samples()[4]
    bodies = requests_to_chat(page)
    with_key(page, gateway.url, new_key())
    # Given a schema in the box, a budget the object fits in, and a picture
    page.click("#structured summary")
    page.fill("#schema", json.dumps(SCHEMA, ensure_ascii=False))
    page.fill("#max", "48")
    page.set_input_files("#picture", str(sample.path))
    page.wait_for_function("() => document.querySelector('#preview').style.display === 'block'")
    # When a question is asked
    page.fill("#question", sample.question)
    page.press("#question", "Enter")
    answered(page, 1)
    # Then it went as response_format json_schema, and the page shows the answer parsed, valid against it
    assert bodies[0]["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "playground", "schema": SCHEMA, "strict": True}} and bodies[0]["max_tokens"] == 48
    assert page.inner_text(".turn.assistant .parsed-label") == "解析后的 JSON"
    shown = json.loads(page.inner_text(".turn.assistant .parsed"))
    jsonschema.validate(shown, SCHEMA)
    assert shown == json.loads(page.inner_text(".turn.assistant .text"))
    # And a schema that is not JSON is refused in the page, nothing sent
    page.fill("#schema", "{not json")
    page.fill("#question", sample.question)
    page.press("#question", "Enter")
    assert "JSON schema 不是有效的 JSON" in page.inner_text("#status") and len(bodies) == 1


def test_the_layout_holds_from_360_px_and_the_gateway_serves_an_icon(
        page: Any, gateway: Gateway, worker: WorkerProcess, new_key: Keys) -> None:
    sample = load_samples()[0]
    with_key(page, gateway.url, new_key())
    page.set_input_files("#picture", str(sample.path))
    page.wait_for_function("() => document.querySelector('#preview').style.display === 'block'")
    page.fill("#question", sample.question)
    page.press("#question", "Enter")
    answered(page, 1)
    SHOTS.mkdir(parents=True, exist_ok=True)
    for width, height in ((1280, 820), (390, 844), (360, 740)):
        page.set_viewport_size({"width": width, "height": height})
        time.sleep(0.2)  # a frame for the layout to settle
        # No horizontal overflow, and the transcript and the send button are visible inside the viewport
        inner = page.evaluate("innerWidth")
        assert page.evaluate("document.scrollingElement.scrollWidth") <= inner, width
        for selector in ("#chat", ".turn.assistant", "#send", "#question"):
            element = page.locator(selector)
            element.scroll_into_view_if_needed()
            box = element.bounding_box()
            assert element.is_visible() and box is not None, (width, selector)
            assert 0 <= box["x"] and box["x"] + box["width"] <= inner, (width, selector, box)
        send = page.locator("#send").bounding_box()
        assert send is not None and 0 <= send["y"] and send["y"] + send["height"] <= height, (width, send)
        if width != 360:
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(SHOTS / f"playground-{width}.png"), full_page=True)
    # The icon: linked from the page, served by the gateway itself, no key needed
    assert page.get_attribute("link[rel=icon]", "href") == "/favicon.ico"
    with gateway.client() as anonymous:
        icon = anonymous.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
    assert icon.content[:4] == b"\x00\x00\x01\x00" and len(icon.content) > 1000
