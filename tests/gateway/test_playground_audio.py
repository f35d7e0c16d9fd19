"""The playground takes a spoken question (issue 28, part 6), in a real headless Chromium whose microphone is a
file (``--use-file-for-fake-audio-capture``): record, stop, send with a picture, see the transcript and the
answer; then an audio file chosen instead. Real gateway, speech and picture workers, Redis, S3."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need
from tests.gateway.conftest import Gateway
from tests.gateway.test_playground import CHROMIUM, SHOTS, requests_to_chat, with_key
from tests.workers.test_speech import spoken
from tuwen.workers.bench.process import WorkerProcess
from tuwen.workers.demo.samples import load_samples

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture
def question_wav(tmp_path: Path) -> Path:
    path = tmp_path / "question.wav"
    path.write_bytes(spoken(seed=31, text=load_samples()[4].question))
    return path


@pytest.fixture
def page(question_wav: Path) -> Iterator[Any]:
    need(shutil.which(CHROMIUM) is not None, f"{CHROMIUM} is not installed (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={question_wav}"])
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 820}, locale="zh-CN",
                                          permissions=["microphone"])
            yield context.new_page()
        finally:
            browser.close()


def test_the_playground_records_a_question_and_shows_its_transcript_and_answer(
        page: Any, gateway: Gateway, speech_worker: WorkerProcess, worker: WorkerProcess,
        new_key: Callable[..., str], question_wav: Path) -> None:
    sample = load_samples()[4]
    bodies = requests_to_chat(page)
    with_key(page, gateway.url, new_key())
    page.set_input_files("#picture", str(sample.path))
    # Given a question recorded from the (fake) microphone for two seconds
    page.click("#record")
    page.wait_for_timeout(2000)
    page.click("#record")
    page.wait_for_function("() => document.querySelector('#spoken').textContent.length > 0", timeout=10_000)
    # When it is sent with no typed question
    page.click("#send")
    # Then the turn shows what the speech stage heard, and the answer comes
    page.wait_for_selector(".transcript", timeout=60_000)
    assert page.inner_text(".transcript").startswith("听到：") and len(page.inner_text(".transcript")) > 3
    assert page.inner_text(".assistant .text").strip()
    sent = bodies[-1]["messages"][-1]["content"]
    assert [p["type"] for p in sent] == ["image_url", "input_audio"] and sent[1]["input_audio"]["format"] == "wav"
    # And an audio file works alike; the follow-up sends the first question as its transcript, not as audio again
    page.set_input_files("#audio", str(question_wav))
    page.wait_for_function("() => document.querySelector('#spoken').textContent.length > 0", timeout=10_000)
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll('.transcript').length === 2", timeout=60_000)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "playground-spoken.png"), full_page=True)
    history = bodies[-1]["messages"]
    assert [p["type"] for p in history[0]["content"]] == ["image_url", "text"]
    assert history[-1]["content"][-1]["type"] == "input_audio"
