"""How S3 failures reach the caller: refused credentials, expired URLs, a server that is down or broken."""

from __future__ import annotations

import http.server
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tuwen.storage.errors import StorageAuthError, StorageError, StorageUnavailable
from tuwen.storage.s3 import S3ObjectStore
from tests.ports import free_port
from tests.s3servers import S3Endpoint
from tests.storage.conftest import WITH_MINIO, integration, new_bucket_name, s3_backend

pytestmark = [pytest.mark.timeout(60)]


def servers(*names: str) -> list[object]:
    return [pytest.param(name, marks=integration) for name in names if name != "minio" or WITH_MINIO]


def store_calls(store: S3ObjectStore) -> dict[str, Callable[[], object]]:
    return {
        "ensure_ready": store.ensure_ready,
        "ping": store.ping,
        "put": lambda: store.put("images/x", b"x"),
        "get": lambda: store.get("images/x"),
        "exists": lambda: store.exists("images/x"),
        "delete": lambda: store.delete("images/x"),
        "list": lambda: list(store.list("images/")),
    }


@pytest.mark.parametrize("server", servers("s3rver", "moto_signed", "minio"))
def test_unknown_access_key_is_an_auth_error(server: str, request: pytest.FixtureRequest) -> None:
    # Given a server that checks access keys, and a bucket with an object
    endpoint: S3Endpoint = request.getfixturevalue(server)
    with s3_backend(server, endpoint) as good:
        good.store.ensure_ready()
        good.store.put("images/x", b"x")
        # When a store with an access key the server does not know uses the bucket
        bad = S3ObjectStore(endpoint.endpoint, "NOSUCHKEY", endpoint.secret_key, good.bucket, secure=endpoint.secure)
        # Then every call fails as an auth error, which retrying cannot fix
        for name, call in store_calls(bad).items():
            with pytest.raises(StorageAuthError) as refused:
                call()
            assert (refused.value.code, refused.value.retryable) == ("storage_auth_failed", False), name


@pytest.mark.parametrize("server", servers("moto_signed", "minio"))
def test_wrong_secret_key_is_an_auth_error(server: str, request: pytest.FixtureRequest) -> None:
    # Given a server that verifies signatures (s3rver does not check a SigV4 signature), and an object
    endpoint: S3Endpoint = request.getfixturevalue(server)
    with s3_backend(server, endpoint) as good:
        good.store.ensure_ready()
        good.store.put("images/x", b"x")
        # When a store signs with the wrong secret
        bad = S3ObjectStore(endpoint.endpoint, endpoint.access_key, "wrong-secret", good.bucket, secure=endpoint.secure)
        # Then every call fails as an auth error
        for name, call in store_calls(bad).items():
            with pytest.raises(StorageAuthError) as refused:
                call()
            assert refused.value.code == "storage_auth_failed", name
        assert good.store.get("images/x") == b"x"


@pytest.mark.parametrize("server", servers("s3rver", "minio"))
def test_presigned_url_is_refused_after_it_expires(server: str, request: pytest.FixtureRequest) -> None:
    # Given an object and two presigned URLs for it, one valid for 1 s and one for a minute
    endpoint: S3Endpoint = request.getfixturevalue(server)
    with s3_backend(server, endpoint) as backend:
        backend.store.ensure_ready()
        backend.store.put("images/x", b"short-lived")
        short = backend.store.presigned_get("images/x", expires_s=1)
        long = backend.store.presigned_get("images/x", expires_s=60)
        # When both are used after 2.5 s
        time.sleep(2.5)
        # Then the expired one is refused and the other still works
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(short, timeout=10).close()
        assert refused.value.code == 403
        refused.value.close()
        with urllib.request.urlopen(long, timeout=10) as response:
            assert response.read() == b"short-lived"


def assert_unavailable_quickly(store: S3ObjectStore, limit_s: float = 10.0) -> None:
    for name, call in store_calls(store).items():
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as down:
            call()
        elapsed = time.monotonic() - started
        assert elapsed < limit_s, f"{name} took {elapsed:.1f} s to fail"
        assert (down.value.code, down.value.retryable) == ("storage_unavailable", True), name


def test_nobody_listening_is_unavailable_quickly() -> None:
    # Given an endpoint where no server listens (a stopped MinIO)
    store = S3ObjectStore(f"127.0.0.1:{free_port()}", "minioadmin", "minioadmin", new_bucket_name())
    # When any call is made, Then it fails within seconds as retryable
    assert_unavailable_quickly(store)


@contextmanager
def silent_server() -> Iterator[int]:
    """Accepts TCP connections (the kernel does) but never answers: a hung server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


def test_a_server_that_never_answers_times_out() -> None:
    with silent_server() as port:
        store = S3ObjectStore(f"127.0.0.1:{port}", "minioadmin", "minioadmin", new_bucket_name(),
                              read_timeout_s=0.5)
        assert_unavailable_quickly(store, limit_s=5)


class _Always503(http.server.BaseHTTPRequestHandler):
    """An S3 server in trouble: every request gets 503 SlowDown and asks to come back in an hour."""

    requests = 0

    def _answer(self, body: bool) -> None:
        type(self).requests += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        payload = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>busy</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Retry-After", "3600")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_PUT(self) -> None:
        self._answer(body=True)

    def do_DELETE(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_5xx_is_unavailable_after_a_few_retries() -> None:
    # Given a server that answers every request with 503 and Retry-After: 3600
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Always503)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        store = S3ObjectStore(f"127.0.0.1:{server.server_address[1]}", "minioadmin", "minioadmin",
                              new_bucket_name(), region="us-east-1")
        # When any call is made, Then it fails quickly as retryable, after a bounded number of tries
        assert_unavailable_quickly(store)
        assert _Always503.requests <= 3 * len(store_calls(store))
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_storage_errors_name_the_object_but_never_the_secret() -> None:
    store = S3ObjectStore(f"127.0.0.1:{free_port()}", "minioadmin", "s3cr3t-value", "tuwen")
    with pytest.raises(StorageError) as down:
        store.get("images/abc")
    assert "tuwen/images/abc" in str(down.value)
    assert "s3cr3t-value" not in str(down.value)
