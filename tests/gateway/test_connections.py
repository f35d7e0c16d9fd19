"""Connections the gateway must not hold: slow request heads (slowloris), slow bodies, and uploads
without a valid key (401 before the body is read). Raw sockets against a real uvicorn server that
runs with the options of ``tuwen gateway serve``."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tuwen.pipeline.settings import Settings
from tests.conftest import TIMING
from tests.faults import report
from tests.gateway.conftest import Gateway, gateway_settings, start_gateway
from tuwen.workers.demo.samples import load_samples

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120), pytest.mark.xdist_group(TIMING)]

Keys = Callable[..., str]
HEAD_S, BODY_S = 1.5, 2.5
SLACK_S = 1.0


@pytest.fixture(scope="module")
def guarded(parked_settings: Settings) -> Iterator[Gateway]:
    """A gateway with short read deadlines and the default upload limit (max_image_bytes + 64 KiB)."""
    gw = start_gateway(parked_settings, gateway_settings(gateway_header_timeout_s=HEAD_S,
                                                         gateway_body_timeout_s=BODY_S))
    yield gw
    gw.stop()


def connect(gateway: Gateway) -> socket.socket:
    parts = urlsplit(gateway.url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def until_closed(sock: socket.socket, deadline: float) -> tuple[float | None, bytes]:
    """Read until the server closes the connection: (seconds it took from now, what it sent), or
    (None, …) if it was still open at ``deadline``."""
    started, got = time.monotonic(), b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None, got
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return None, got
        except ConnectionResetError:
            return time.monotonic() - started, got
        if not chunk:
            return time.monotonic() - started, got
        got += chunk


def test_partial_request_heads_are_closed_at_the_header_timeout(guarded: Gateway, new_key: Keys) -> None:
    # Given 50 connections that each sent part of a request head, half of them a POST that stopped
    # inside a header, and one more that keeps trickling a header byte every 0.2 s
    partial = [b"GET /v1/jobs/0123", b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; bo"]
    socks = []
    for i in range(50):
        sock = connect(guarded)
        sock.sendall(partial[i % 2])
        socks.append(sock)
    opened = time.monotonic()
    trickler = connect(guarded)
    trickler.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    trickled: list[int] = []

    def trickle() -> None:
        try:
            while time.monotonic() - opened < HEAD_S + 5:
                trickler.sendall(b"a")
                trickled.append(1)
                time.sleep(0.2)
        except OSError:
            return

    threading.Thread(target=trickle, daemon=True).start()
    try:
        # When the header timeout passes, then the server has closed every one of them, with a 408
        deadline = opened + HEAD_S + 5
        outcomes = [until_closed(sock, deadline) for sock in socks]
        assert all(took is not None for took, _ in outcomes), "some partial requests were still open"
        assert all(sent.startswith(b"HTTP/1.1 408") for _, sent in outcomes), {sent[:40] for _, sent in outcomes}
        trickled_took, trickled_sent = until_closed(trickler, deadline)
        last_closed = time.monotonic() - opened
        assert trickled_took is not None and trickled_sent.startswith(b"HTTP/1.1 408"), trickled_sent
        assert last_closed <= HEAD_S + SLACK_S, last_closed  # trickling did not push the deadline back
        assert len(trickled) >= 3  # it really was sending while it waited
    finally:
        for sock in socks + [trickler]:
            sock.close()
    # And the server still answers everyone else at once
    with guarded.client(new_key()) as api:
        assert api.get("/v1/jobs/" + "4" * 32).status_code == 404
    report("gateway slowloris", connections=51, header_timeout_s=HEAD_S, all_closed_within_s=round(last_closed, 2))


def test_a_stalled_body_is_closed_at_the_body_timeout(guarded: Gateway, new_key: Keys) -> None:
    token = new_key()
    sock = connect(guarded)
    try:
        # Given an authenticated upload that declared 100 kB and sent 1 kB of it
        sock.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: "
                     f"multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n".encode()
                     + b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
                     + b"\0" * 1000)
        sent = time.monotonic()
        # When nothing more comes, then the server closes the connection once the body timeout passes
        took, _ = until_closed(sock, sent + BODY_S + 5)
    finally:
        sock.close()
    assert took is not None, "the stalled upload was still held open"
    assert took <= BODY_S + SLACK_S, took
    report("gateway stalled body", body_timeout_s=BODY_S, closed_after_s=round(took, 2))


def test_uploads_without_a_valid_key_get_401_before_the_body_is_read(guarded: Gateway, new_key: Keys,
                                                                    keys) -> None:  # type: ignore[no-untyped-def]
    revoked = new_key()
    assert revoked.startswith("sk-tw-")
    keys.revoke(revoked[len("sk-tw-"):][:12])  # sk-tw-<12 hex key id>-<secret>
    body_size, first = 10 * 1024 * 1024, 64 * 1024
    for auth in ("", f"Authorization: Bearer {revoked}\r\n", "Authorization: Bearer tw_0123456789ab_" + "x" * 43
                 + "\r\n", "Authorization: Bearer sk-tw-0123456789ab-" + "x" * 43 + "\r\n"):
        sock = connect(guarded)
        try:
            # Given an upload that declares a 10 MiB picture and has sent only its first 64 KiB
            sock.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: multipart/form-data; "
                         f"boundary=b\r\nContent-Length: {body_size}\r\n\r\n".encode()
                         + b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
                         + b"\0" * first)
            started = time.monotonic()
            # When it waits, then the 401 comes at once, and the server closes instead of reading the rest
            took, answer = until_closed(sock, started + 5)
        finally:
            sock.close()
        assert answer.startswith(b"HTTP/1.1 401"), (auth[:30], answer[:60])
        assert b"connection: close" in answer.lower()
        assert took is not None and took < 2, took
    # And a client library that sends the whole body first still reads the 401 (not a reset connection)
    with guarded.client() as anonymous:
        answer = anonymous.post("/v1/jobs", files={"image": ("a.png", b"\0" * body_size, "image/png")},
                                data={"question": "图中有几个圆形？"})
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "unauthorized"
    report("gateway 401 before the body", declared_bytes=body_size, sent_before_401=first)


def test_the_connection_cap_answers_503_beyond_it(parked_settings: Settings, new_key: Keys) -> None:
    capped = start_gateway(parked_settings, gateway_settings(gateway_max_connections=5, gateway_header_timeout_s=30))
    socks = []
    try:
        # Given as many idle connections as the cap allows
        for _ in range(5):
            socks.append(connect(capped))
            socks[-1].sendall(b"GET /v1/jo")
        # When one more asks, then it is refused with 503, and served once the others are gone
        with httpx.Client(base_url=capped.url, trust_env=False, timeout=10) as api:
            assert api.get("/healthz").status_code == 503
            for sock in socks:
                sock.close()
            deadline = time.monotonic() + 10
            while (status := api.get("/healthz", headers={"Connection": "close"}).status_code) != 200:
                assert time.monotonic() < deadline, status
                time.sleep(0.05)
    finally:
        for sock in socks:
            sock.close()
        capped.stop()


def test_a_kept_alive_connection_gets_the_same_deadline_for_its_next_head(guarded: Gateway) -> None:
    sock = connect(guarded)
    try:
        # Given a connection that was answered once and is kept alive
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"\r\n\r\n" not in first or not first.endswith(b"}"):
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first[:40]
        # When it starts a second request and stalls inside its head
        sock.sendall(b"GET /heal")
        took, sent = until_closed(sock, time.monotonic() + HEAD_S + 5)
    finally:
        sock.close()
    # Then that head gets the header deadline too
    assert took is not None and took <= HEAD_S + SLACK_S and sent.startswith(b"HTTP/1.1 408"), (took, sent[:40])


def test_long_polls_outlast_both_deadlines(guarded: Gateway, new_key: Keys) -> None:
    with guarded.client(new_key()) as api:
        job = api.post("/v1/jobs", files={"image": ("a.png", load_samples()[0].path.read_bytes(), "image/png")},
                       data={"question": "图中有几个圆形？"}).json()["id"]
        # A long-poll longer than the header and body deadlines together is answered, not cut
        started = time.monotonic()
        polled = api.get(f"/v1/jobs/{job}", params={"wait": HEAD_S + BODY_S + 0.5})
        assert polled.status_code == 200 and polled.json()["status"] == "queued"
        assert time.monotonic() - started >= HEAD_S + BODY_S
        # And the same kept-alive connection serves the next request
        assert api.get(f"/v1/jobs/{job}").status_code == 200
