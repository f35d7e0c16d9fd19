"""Gateway fixtures: real uvicorn servers (in threads, on free ports) over the session's Redis and S3.

* ``gateway`` — jobs go to the session worker's queues (``pipeline_settings``).
* ``parked_gateway`` — jobs go to queues no worker reads: they stay ``queued`` (cancel, idempotency,
  bad input, schemathesis), and its upload limit is small (1 MiB) for the 413 tests.
* ``new_key(owner=None)`` — an API key for a fresh owner; ``receiver`` — a local webhook receiver.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tuwen.pipeline.gateway.apikeys import KeyStore
from tuwen.pipeline.gateway.app import create_app
from tuwen.pipeline.gateway.server import server_options
from tuwen.pipeline.gateway.settings import GatewaySettings
from tuwen.pipeline.jobs import connect
from tests.ports import free_port
from tuwen.pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SECRET = "whsec-test-0123456789"
UPLOAD_LIMIT = 1024 * 1024


def gateway_settings(**overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = dict(
        webhook_secret=SECRET, webhook_allowed_hosts=["127.0.0.1", "localhost"], webhook_allow_private=True,
        webhook_backoff_s=0.3, webhook_sweep_s=0.5, webhook_timeout_s=5, gateway_max_wait_s=90,
        rate_limit_per_minute=10_000)
    values.update(overrides)
    return GatewaySettings(**values)


@dataclass
class Gateway:
    url: str
    settings: Settings
    gw: GatewaySettings
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, token: str | None = None, timeout: float = 120.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def start_gateway(settings: Settings, gw: GatewaySettings) -> Gateway:
    """Serve ``create_app(settings, gw)`` in a thread with the uvicorn options of ``tuwen gateway serve``
    (read deadlines, connection cap); returns once it accepts requests."""
    port = free_port()
    options = {**server_options(gw), "host": "127.0.0.1", "port": port}  # what `tuwen gateway serve` runs
    config = uvicorn.Config(create_app(settings, gw), log_level="warning", access_log=False, lifespan="on",
                            **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return Gateway(f"http://127.0.0.1:{port}", settings, gw, server, thread)


@pytest.fixture(scope="session")
def gateway(pipeline_settings: Settings) -> Iterator[Gateway]:
    gw = start_gateway(pipeline_settings, gateway_settings())
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def parked_settings(pipeline_settings: Settings) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return pipeline_settings.model_copy(update={"interactive_queue": f"gw-parked-{tag}",
                                                "bulk_queue": f"gw-parked-bulk-{tag}",
                                                "speech_queue": f"gw-parked-speech-{tag}"})


@pytest.fixture(scope="session")
def parked_gateway(parked_settings: Settings) -> Iterator[Gateway]:
    gw = start_gateway(parked_settings, gateway_settings(gateway_max_upload_bytes=UPLOAD_LIMIT,
                                                         gateway_max_wait_s=2))
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def keys(pipeline_settings: Settings) -> Iterator[KeyStore]:
    client = connect(pipeline_settings.redis_url)
    yield KeyStore(client)
    client.close()


@pytest.fixture
def new_key(keys: KeyStore) -> Callable[..., str]:
    """``new_key(owner=None, rate_limit=None)`` → a token for a fresh (or the given) owner."""

    def make(owner: str | None = None, rate_limit: int | None = None) -> str:
        return keys.create(owner or f"owner-{uuid.uuid4().hex[:10]}", "test", rate_limit)[1]

    return make


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: answers 500 to the first ``fail_first`` deliveries, then 204."""

    url: str
    deliveries: list[Delivery] = field(default_factory=list)
    fail_first: int = 0
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, predicate: Callable[[list[Delivery]], bool], timeout: float) -> list[Delivery]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: predicate(self.deliveries), timeout), self.deliveries
            return list(self.deliveries)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    port = free_port()
    state = Receiver(f"http://127.0.0.1:{port}/hook")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with state.arrived:
                state.deliveries.append(Delivery(dict(self.headers.items()), body))
                failing = len(state.deliveries) <= state.fail_first
                state.arrived.notify_all()
            self.send_response(500 if failing else 204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


def run_doc_snippet(code: str, url: str, token: str, picture: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a snippet of the docs as written, against the gateway at ``url`` with ``token``, from the repository's
    folder (as a fresh clone runs it), where it reads ``picture``: a bundled file, which it must name. Returns
    what it printed."""
    named = picture.relative_to(REPO).as_posix()
    assert named in code, f"the snippet does not read {named}"
    code = code.replace("http://127.0.0.1:8000/v1", url + "/v1").replace("sk-tw-3f9c…", token)
    monkeypatch.chdir(REPO)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "docs", "exec", dont_inherit=True), {})  # noqa: S102 - the documentation's own code
    return printed.getvalue()
