"""Pictures by URL in the chat API: http(s) only from allow-listed hosts, through the SSRF guard, with a
size cap and a deadline; ``tuwen://`` keys of pictures sent before. A real picture server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.localredis import free_port
from tuwen.pipeline.remote import RemotePictures
from tuwen.pipeline.ssrf import UrlGuard
from tests.gateway.conftest import Gateway
from tests.gateway.test_openai import chat_gateway, knows, sdk  # noqa: F401 - chat_gateway: fixture
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

Keys = Callable[..., str]
SAMPLE = load_samples()[3]
PICTURE = SAMPLE.path.read_bytes()


@pytest.fixture(scope="module")
def pictures() -> Iterator[str]:
    """``http://127.0.0.1:<port>``: /picture.png, /moved (302 to it), /gone (404), /declared-big
    (Content-Length 100 MB), /endless (no length, 64 KiB chunks for ever), /slow (a byte every 0.2 s)."""
    port = free_port()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/picture.png":
                self.reply(200, PICTURE, {"Content-Type": "image/png"})
            elif self.path == "/moved":
                self.reply(302, b"", {"Location": "/picture.png"})
            elif self.path == "/declared-big":
                self.send_response(200)
                self.send_header("Content-Length", str(100 * 1024 * 1024))
                self.end_headers()
                self.wfile.write(PICTURE)
            elif self.path in ("/endless", "/slow"):
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                piece = b"\0" * (65536 if self.path == "/endless" else 1)
                try:
                    for _ in range(10_000):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.flush()
                        if self.path == "/slow":
                            time.sleep(0.2)
                except OSError:
                    pass  # the fetcher hung up, as it should
            else:
                self.reply(404, b"not here", {})

        def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    server.shutdown()
    server.server_close()


def picture_turn(url: str, question: str = SAMPLE.question) -> dict[str, object]:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": question}]}


def test_an_allow_listed_picture_url_is_fetched_and_answered(chat_gateway: Gateway, pictures: str,
                                                            new_key: Keys) -> None:
    with sdk(chat_gateway, new_key()) as client:
        # When a request names a picture on an allowed host
        answer = client.chat.completions.create(model="tuwen", messages=[picture_turn(f"{pictures}/picture.png")],
                                                max_tokens=32)
        # Then it is fetched, stored for the owner like an upload, and answered
        again = client.chat.completions.create(
            model="tuwen", messages=[picture_turn("tuwen://images/" + hashlib.sha256(PICTURE).hexdigest())],
            max_tokens=32)
    assert knows(answer.choices[0].message.content or "", SAMPLE)
    assert again.choices[0].message.content == answer.choices[0].message.content


def test_picture_urls_that_cannot_be_had_are_refused_with_codes(chat_gateway: Gateway, gateway: Gateway,
                                                                 worker: WorkerProcess, pictures: str,
                                                                 new_key: Keys) -> None:
    port = pictures.rsplit(":", 1)[1]
    cases = {f"{pictures}/moved": "image_url_failed",  # redirects are not followed: the next hop skips the guard
             f"{pictures}/gone": "image_url_failed",
             f"{pictures}/declared-big": "image_too_large",
             f"http://localhost:{port}/picture.png": "image_url_not_allowed",  # only 127.0.0.1 is on the list
             "http://user:pw@127.0.0.1/picture.png": "invalid_image_url"}
    got = {}
    with sdk(chat_gateway, new_key()) as client:
        for url in cases:
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="tuwen", messages=[picture_turn(url)])
            got[url] = info.value.code
            assert info.value.param == "messages[0].content[0].image_url.url"
    assert got == cases
    # A gateway with no allow-list (the default) fetches nothing
    with sdk(gateway, new_key()) as client, pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tuwen", messages=[picture_turn(f"{pictures}/picture.png")])
    assert info.value.code == "image_url_not_allowed"


def fetch_code(fetcher: RemotePictures, url: str) -> str:
    with pytest.raises(InvalidInput) as info:
        fetcher.fetch(url)
    return info.value.code


def test_the_fetch_is_guarded_capped_and_bounded_in_time(pictures: str) -> None:
    guarded = RemotePictures(UrlGuard(("127.0.0.1",), allow_private=False, what="image_url"), 1024 * 1024, 5)
    capped = RemotePictures(UrlGuard(("127.0.0.1",), allow_private=True, what="image_url"), 256 * 1024, 1.0)
    try:
        # A loopback address is refused unless private addresses are allowed (the SSRF guard)
        assert fetch_code(guarded, f"{pictures}/picture.png") == "image_url_not_allowed"
        # A body without a length is cut at the cap; a trickle at the deadline
        started = time.monotonic()
        assert fetch_code(capped, f"{pictures}/endless") == "image_too_large"
        assert fetch_code(capped, f"{pictures}/slow") == "image_url_failed"
        assert time.monotonic() - started < 5
        assert capped.fetch(f"{pictures}/picture.png") == PICTURE
    finally:
        guarded.close()
        capped.close()
