"""Pictures by URL in the chat API: http(s) fetched by default from public addresses, never from private ones
(the SSRF guard, on every redirect too), with a size cap, a redirect limit and one deadline for the whole
fetch; an optional hosts list, an off switch; ``tuwen://`` keys of pictures sent before. A real picture
server on 127.0.0.1 (tests reach it through the test-only switch that allows private addresses)."""

from __future__ import annotations

import gzip
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.jobs import PREFIX
from tests.ports import free_port
from tuwen.pipeline.gateway.remote import RemotePictures
from tuwen.pipeline.settings import Settings
from tuwen.pipeline.gateway.ssrf import UrlGuard
from tests.conftest import TIMING
from tests.gateway.conftest import Gateway, gateway_settings, start_gateway
from tests.gateway.test_openai import chat_gateway, knows, sdk  # noqa: F401 - chat_gateway: fixture
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

Keys = Callable[..., str]
SAMPLE = load_samples()[3]
PICTURE = SAMPLE.path.read_bytes()
#: The picky gateway's and fetcher's limits: small, so the tests are quick.
CAP, DEADLINE_S, HOPS = 64 * 1024, 1.5, 2


@pytest.fixture(scope="module")
def pictures() -> Iterator[str]:
    """``http://127.0.0.1:<port>``: /picture.png; /moved (302 to it); /hops/<n> (n redirects, then the
    picture); /to?<url> (302 to url); /gone (404); /busy (503); /declared-big (Content-Length 100 MB);
    /big and /big-chunked (more than CAP bytes, with and without a length); /endless (no length, 64 KiB
    chunks for ever); /slow (a byte every 0.2 s); /slow-head (its headers, a byte every 0.2 s); /gzip."""
    port = free_port()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path, _, query = self.path.partition("?")
            if path == "/picture.png":
                self.reply(200, PICTURE, {"Content-Type": "image/png"})
            elif path == "/moved":
                self.reply(302, b"", {"Location": "/picture.png"})
            elif path.startswith("/hops/"):
                left = int(path.rsplit("/", 1)[1])
                self.reply(302, b"", {"Location": f"/hops/{left - 1}" if left > 1 else "/picture.png"})
            elif path == "/to":
                self.reply(307, b"", {"Location": query})
            elif path == "/busy":
                self.reply(503, b"busy", {})
            elif path == "/gzip":
                self.reply(200, gzip.compress(PICTURE), {"Content-Type": "image/png", "Content-Encoding": "gzip"})
            elif path == "/big":
                self.reply(200, PICTURE + b"\0" * CAP, {"Content-Type": "image/png"})
            elif path == "/declared-big":
                self.send_response(200)
                self.send_header("Content-Length", str(100 * 1024 * 1024))
                self.end_headers()
                self.wfile.write(PICTURE)
            elif path == "/slow-head":
                self.trickle(b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * 200 + b"\r\n\r\n")
            elif path in ("/endless", "/slow", "/big-chunked"):
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                piece = b"\0" * (1 if path == "/slow" else 65536)
                try:
                    for _ in range(10_000 if path != "/big-chunked" else CAP // len(piece) + 1):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.flush()
                        if path == "/slow":
                            time.sleep(0.2)
                    self.wfile.write(b"0\r\n\r\n")
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

        def trickle(self, raw: bytes) -> None:
            try:
                for i in range(len(raw)):
                    self.wfile.write(raw[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def picky_gateway(pipeline_settings: Settings, worker: WorkerProcess) -> Iterator[Gateway]:
    """The session worker's queues; any host (no hosts list), private addresses allowed (the test-only switch:
    the picture server is on 127.0.0.1), small limits: CAP bytes, DEADLINE_S, HOPS redirects."""
    gw = start_gateway(pipeline_settings.model_copy(update={"max_image_bytes": CAP}), gateway_settings(
        gateway_image_url_allow_private=True, gateway_image_url_timeout_s=DEADLINE_S,
        gateway_image_url_max_redirects=HOPS))
    yield gw
    gw.stop()


def picture_turn(url: str, question: str = SAMPLE.question) -> dict[str, object]:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": question}]}


def refusal(gateway: Gateway, token: str, url: str) -> openai.BadRequestError:
    with sdk(gateway, token) as client, pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tuwen", messages=[picture_turn(url)], max_tokens=8)
    assert info.value.param == "messages[0].content[0].image_url.url", info.value.body
    return info.value


def stored(settings: Settings) -> tuple[set[str], set[str]]:
    """Every stored picture and every job: a refused request must add to neither."""
    client = Client(settings)
    return set(client.images.objects.list("images/")), set(client.jobs.redis.scan_iter(PREFIX + "*"))


# -- through the gateway --------------------------------------------------------------------------------------
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


def test_picture_urls_that_cannot_be_had_are_refused_with_codes(chat_gateway: Gateway, pictures: str,
                                                                 new_key: Keys) -> None:
    port = pictures.rsplit(":", 1)[1]
    cases = {f"{pictures}/gone": "image_url_failed",
             f"{pictures}/declared-big": "image_too_large",
             f"http://localhost:{port}/picture.png": "image_url_not_allowed",  # only 127.0.0.1 is on the list
             f"{pictures}/to?http://localhost:{port}/picture.png": "image_url_not_allowed",  # so on every hop
             "http://user:pw@127.0.0.1/picture.png": "invalid_image_url"}
    token = new_key()
    got = {url: refusal(chat_gateway, token, url).code for url in cases}
    assert got == cases


def test_by_default_private_addresses_are_refused_and_nothing_is_stored(gateway: Gateway, pictures: str,
                                                                        new_key: Keys) -> None:
    # Given a gateway as deployed: remote pictures on, no hosts list, private addresses refused
    assert gateway.gw.gateway_image_urls and not gateway.gw.gateway_image_url_hosts
    assert not gateway.gw.gateway_image_url_allow_private
    port = pictures.rsplit(":", 1)[1]
    urls = [f"{pictures}/picture.png", f"http://localhost:{port}/picture.png", f"http://[::1]:{port}/picture.png",
            f"http://[::ffff:127.0.0.1]:{port}/picture.png", f"http://0.0.0.0:{port}/picture.png",
            f"http://2130706433:{port}/picture.png", f"http://127.1:{port}/picture.png",  # 127.0.0.1, spelled oddly
            "http://10.0.0.1/a.png", "http://172.16.5.4/a.png", "http://192.168.1.1/a.png", "http://100.64.0.1/a.png",
            "http://169.254.169.254/latest/meta-data/", "http://224.0.0.1/a.png", "http://240.0.0.1/a.png",
            "http://[fd00::1]/a.png", "http://[fe80::1]/a.png", "http://[::]/a.png", "https://[64:ff9b::a00:1]/a.png"]
    before = stored(gateway.settings)
    # When a request names a picture at each
    token = new_key()
    refused = {url: refusal(gateway, token, url) for url in urls}
    # Then each is refused with image_url_not_allowed, naming the address, and nothing is stored
    assert {url: e.code for url, e in refused.items()} == {url: "image_url_not_allowed" for url in urls}
    assert all("non-public address" in e.message for e in refused.values()), [e.message for e in refused.values()]
    assert stored(gateway.settings) == before


def test_a_public_picture_is_answered_also_through_redirects_within_the_limit(picky_gateway: Gateway,
                                                                              pictures: str, new_key: Keys) -> None:
    # Given a gateway with no hosts list (the test switch stands in for a public address)
    with sdk(picky_gateway, new_key()) as client:
        # When a request names the picture, directly and behind as many redirects as the limit takes
        direct = client.chat.completions.create(model="tuwen", messages=[picture_turn(f"{pictures}/picture.png")],
                                                max_tokens=32)
        moved = client.chat.completions.create(model="tuwen", messages=[picture_turn(f"{pictures}/hops/{HOPS}")],
                                               max_tokens=32)
    # Then both are answered with the picture's fact
    assert knows(direct.choices[0].message.content or "", SAMPLE), direct.choices[0].message.content
    assert moved.choices[0].message.content == direct.choices[0].message.content


@pytest.mark.xdist_group(TIMING)
def test_the_limits_of_a_fetch_each_have_their_code(picky_gateway: Gateway, pictures: str, new_key: Keys) -> None:
    cases = {f"/hops/{HOPS + 1}": "image_url_too_many_redirects",
             "/big": "image_too_large",  # with a Content-Length
             "/big-chunked": "image_too_large",  # without one, cut as the bytes arrive
             "/slow": "image_url_timeout",  # a byte every 0.2 s: each read is quick, the whole is not
             "/slow-head": "image_url_timeout",  # even while the headers trickle in
             "/busy": "image_url_failed",
             "/gzip": "image_url_failed"}
    before = stored(picky_gateway.settings)
    token = new_key()
    took, got = {}, {}
    for path in cases:
        started = time.monotonic()
        got[path] = refusal(picky_gateway, token, pictures + path).code
        took[path] = time.monotonic() - started
    assert got == cases
    # The trickles are cut at the deadline (not a read timeout's multiple of it)
    assert DEADLINE_S <= took["/slow"] < DEADLINE_S + 1.5 and DEADLINE_S <= took["/slow-head"] < DEADLINE_S + 1.5, took
    assert stored(picky_gateway.settings) == before


def test_remote_pictures_can_be_switched_off(pipeline_settings: Settings, worker: WorkerProcess, pictures: str,
                                             new_key: Keys) -> None:
    # Given a gateway with remote pictures off (the test switch on, so only the off switch refuses)
    off = start_gateway(pipeline_settings, gateway_settings(gateway_image_urls=False,
                                                            gateway_image_url_allow_private=True))
    try:
        # When a request names a picture URL
        error = refusal(off, new_key(), f"{pictures}/picture.png")
    finally:
        off.stop()
    # Then it is refused, saying remote pictures are off and what to send instead
    assert error.code == "image_url_not_allowed" and "remote pictures are off" in error.message, error.message
    assert "data: URL" in error.message


# -- the fetcher itself ---------------------------------------------------------------------------------------
def fetch_error(fetcher: RemotePictures, url: str) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        fetcher.fetch(url)
    return info.value


@dataclass(frozen=True)
class LoopbackIsPublic(UrlGuard):
    """The real guard, except that it takes the address 127.0.0.1 itself for a public one: the tests' stand-in
    for a public server that redirects to a private address."""

    def _resolve(self, host: str, port: int) -> str:
        return "127.0.0.1" if host == "127.0.0.1" else super()._resolve(host, port)


def test_every_redirect_hop_passes_the_guard(pictures: str) -> None:
    port = pictures.rsplit(":", 1)[1]
    fetcher = RemotePictures(LoopbackIsPublic(("*",), allow_private=False, what="image_url"), CAP, 5)
    try:
        assert fetcher.fetch(f"{pictures}/moved") == PICTURE  # a hop to the same "public" address
        for private in (f"http://localhost:{port}/picture.png", f"http://[::1]:{port}/picture.png",
                        "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/a.png"):
            error = fetch_error(fetcher, f"{pictures}/to?{private}")
            assert error.code == "image_url_not_allowed" and "redirected" in error.message, (private, error.message)
        assert fetch_error(fetcher, f"{pictures}/to?file:///etc/passwd").code == "image_url_failed"
    finally:
        fetcher.close()


def test_the_fetch_is_guarded_capped_and_bounded_in_time(pictures: str) -> None:
    guarded = RemotePictures(UrlGuard(("127.0.0.1",), allow_private=False, what="image_url"), 1024 * 1024, 5)
    capped = RemotePictures(UrlGuard(("*",), allow_private=True, what="image_url"), 256 * 1024, 1.0,
                            max_redirects=1)
    off = RemotePictures(UrlGuard(("*",), allow_private=True, what="image_url"), 256 * 1024, 1.0, enabled=False)
    try:
        # A loopback address is refused unless private addresses are allowed (the SSRF guard)
        assert fetch_error(guarded, f"{pictures}/picture.png").code == "image_url_not_allowed"
        assert fetch_error(off, f"{pictures}/picture.png").code == "image_url_not_allowed"
        # A body without a length is cut at the cap; a trickle at the deadline, retryable
        started = time.monotonic()
        assert fetch_error(capped, f"{pictures}/endless").code == "image_too_large"
        slow = fetch_error(capped, f"{pictures}/slow")
        assert (slow.code, slow.retryable) == ("image_url_timeout", True)
        assert time.monotonic() - started < 5
        # An error status is retryable when a retry can help: 503 yes, 404 no
        assert [(e.code, e.retryable) for e in (fetch_error(capped, f"{pictures}/busy"),
                                                fetch_error(capped, f"{pictures}/gone"))] == [
            ("image_url_failed", True), ("image_url_failed", False)]
        # One redirect is followed, two are too many
        assert capped.fetch(f"{pictures}/hops/1") == PICTURE
        assert fetch_error(capped, f"{pictures}/hops/2").code == "image_url_too_many_redirects"
        assert capped.fetch(f"{pictures}/picture.png") == PICTURE
    finally:
        guarded.close()
        capped.close()
        off.close()
