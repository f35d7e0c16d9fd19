"""The gateway's security review (issue 21): metrics that cannot grow without limit, deep JSON refused,
a rate limit that holds across a minute boundary, security headers, outages that do not name addresses,
and chat requests' ``user``/``metadata`` logged safely. A real uvicorn gateway over the session's Redis
and S3, and that Redis for the rate limit."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from tuwen.pipeline.gateway.apikeys import KeyStore
from tuwen.pipeline.inputs import MAX_NESTING
from tuwen.pipeline.jobs import connect
from tuwen.pipeline.keys import BULK, JOB
from tests.ports import free_port
from tuwen.pipeline.settings import Settings
from tests.gateway.conftest import UPLOAD_LIMIT, Gateway, gateway_settings, start_gateway
from tests.gateway.test_batches_restart import GatewayProcess
from tests.gateway.test_openai import ask
from tuwen.workers.demo.samples import Sample, load_samples
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

Keys = Callable[..., str]


# -- 2. metrics take their labels from closed sets -------------------------------------------------------
def series(text: str) -> list[str]:
    """The series (name and labels) of the gateway's request metrics in a /metrics text."""
    return [line.rsplit(" ", 1)[0] for line in text.splitlines()
            if line.startswith(("tuwen_gateway_requests_total{", "tuwen_gateway_request_seconds_"))]


def test_made_up_methods_and_paths_add_no_metric_series(parked_gateway: Gateway, new_key: Keys) -> None:
    with parked_gateway.client(new_key()) as api:
        # Given a few ordinary requests, and a few with made-up methods and paths
        api.get("/healthz")
        api.get("/v1/jobs/" + "4" * 32)
        for n in range(3):
            api.request(f"WARM{n}", f"/warm-{n}")
            api.request("GET", f"/nowhere-{n}")
        api.get("/metrics")  # its own series, before the count
        before = api.get("/metrics").text
        # When 1,000 more come, each with its own method and path
        weird = [api.request(f"M{uuid.uuid4().hex}{'X' * 200}", f"/p/{uuid.uuid4().hex}") for _ in range(1000)]
        after = api.get("/metrics").text
    assert {r.status_code for r in weird} <= {404, 405}
    # Then the metrics have exactly the same series as before (only the counts grew)
    print(f"\n/metrics: {len(series(before))} request series, {len(before)} bytes before 1,000 made-up "
          f"methods and paths; {len(series(after))} series, {len(after)} bytes after")
    assert series(after) == series(before)
    labels = set(re.findall(r'method="([^"]*)"', after))
    assert labels <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"} and "other" in labels
    assert 'route="unmatched"' in after and "/p/" not in after and "/nowhere" not in after


# -- 4. the rate limit is a sliding window ---------------------------------------------------------------
def test_rate_limit_holds_across_a_minute_boundary(keys: KeyStore) -> None:
    # Given a key limited to 5 requests a minute, and its 5 made just before a wall-clock minute ends
    key, _ = keys.create(f"owner-{uuid.uuid4().hex[:10]}", "test", 5)
    start = 1_800_000_000 - 1_800_000_000 % 60  # a minute's first second
    first = [keys.hit(key, 1000, now=start + 59.5) for _ in range(5)]
    # When more come in the next minute, and then as the first ones leave the window
    after_boundary = [keys.hit(key, 1000, now=start + t) for t in (60.5, 61.0, 100.0, 119.4)]
    back = keys.hit(key, 1000, now=start + 119.6)
    # Then no 60 s span passes more than 5, and Retry-After counts down to the oldest one leaving
    print(f"\nrate limit 5/min: {first.count(0.0)} allowed at 59.5 s, "
          f"{sum(w == 0 for w in after_boundary)} of 4 allowed at 60.5-119.4 s (Retry-After {after_boundary}), "
          f"{'allowed' if back == 0 else 'refused'} at 119.6 s")
    assert first == [0.0] * 5
    assert after_boundary == [59.0, 59.0, 20.0, 1.0]
    assert back == 0.0
    # And refused requests do not count: 4 more are allowed as the other 4 leave, the 5th is not
    assert [keys.hit(key, 1000, now=start + 119.7) for _ in range(5)] == [0.0] * 4 + [60.0]


def test_default_and_unlimited_keys(keys: KeyStore) -> None:
    default, _ = keys.create(f"owner-{uuid.uuid4().hex[:10]}", "test")
    unlimited, _ = keys.create(f"owner-{uuid.uuid4().hex[:10]}", "test", 0)
    assert [keys.hit(default, 2, now=1000.0 + n) for n in range(3)] == [0.0, 0.0, 58.0]
    assert all(keys.hit(unlimited, 2, now=1000.0) == 0 for _ in range(50))
    assert keys.get(unlimited.id).last_used_at == 1000.0  # type: ignore[union-attr]


# -- 3. JSON nested too deep is a 400 on every JSON route ---------------------------------------------------
def json_routes(app: FastAPI) -> list[tuple[str, str, bool]]:
    """``(method, path, answers in OpenAI's shape)`` of every route whose body is JSON, read from the app's
    own OpenAPI document (so a new JSON route is tested without being named here); the shape is the one
    its errors are documented with."""
    found = []
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                documented = [str(answer.get("content", {}).get("application/json", {}).get("schema", {}))
                              for status, answer in operation["responses"].items() if status.startswith("4")]
                found.append((method.upper(), path, any("/OpenAIErrorBody" in d for d in documented)))
    return found


def nested(depth: int) -> str:
    """JSON text ``depth`` levels deep: arrays and objects in turn, a string at the bottom (written out:
    ``json.dumps`` recurses too)."""
    opening = "".join("[" if level % 2 == 0 else '{"k": ' for level in range(depth))
    return opening + '"x"' + "".join("]" if level % 2 == 0 else "}" for level in reversed(range(depth)))


def test_deep_json_is_refused_on_every_json_route(parked_gateway: Gateway, parked_settings: Settings,
                                                  new_key: Keys, caplog: pytest.LogCaptureFixture) -> None:
    app = parked_gateway.server.config.app
    routes = json_routes(app)
    assert {(m, p) for m, p, _ in routes} >= {("POST", "/v1/chat/completions"), ("POST", "/v1/batches")}, routes
    owner = f"owner-{uuid.uuid4().hex[:10]}"
    redis = connect(parked_settings.redis_url)
    jobs_before = set(redis.scan_iter(JOB + "*"))
    # Given bodies nested deeper than the limit: the review's 1,200 [ and metadata nested 1,200 and 33 deep,
    # sent as JSON, without a content type, and claiming to be a form (which the intake does not read as JSON)
    json_type, form_type = {"Content-Type": "application/json"}, {"Content-Type": "multipart/form-data; boundary=b"}
    bodies = {"1,200 [": (json_type, b"[" * 1200),
              "metadata 1,200 deep": (json_type, ('{"model": "tuwen", "messages": [{"role": "user", "content": "?"}], '
                                                  f'"metadata": {nested(1199)}}}').encode()),
              "metadata 33 deep": (json_type, f'{{"metadata": {nested(32)}}}'.encode()),
              "no content type": ({}, b"[" * 1200),
              "claimed to be a form": (form_type, b"[" * 1200)}
    answers = {}
    with parked_gateway.client(new_key(owner)) as api, caplog.at_level(logging.WARNING, "tuwen"):
        for method, path, _ in routes:
            url = re.sub(r"\{[^}]+\}", "x", path)
            for name, (kind, body) in bodies.items():
                answers[method, path, name] = api.request(method, url, content=body, headers=kind)
            # (a body exactly as deep as the limit is read, and refused for what it says)
            limit = api.request(method, url, content=f'{{"metadata": {nested(31)}}}'.encode(),
                                headers={"Content-Type": "application/json"})
            assert limit.status_code == 400 and limit.json()["error"]["code"] != "invalid_json", limit.text
    # Then each is a 400 invalid_json naming the limit, in OpenAI's shape (every route's), and nothing logged a
    # traceback
    for (method, path, name), answer in answers.items():
        error = answer.json()["error"]
        assert answer.status_code == 400 and error["code"] == "invalid_json", (path, name, answer.text)
        assert f"deeper than {MAX_NESTING} levels" in error["message"], error
        assert error == {"message": error["message"], "type": "invalid_request_error", "param": None,
                         "code": "invalid_json"}, error
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records
    # And nothing was stored: no job, no batch
    assert set(redis.scan_iter(JOB + "*")) == jobs_before
    assert not redis.exists(BULK + "owner:" + owner)
    redis.close()


# -- 5. an outage does not tell clients where Redis lives ------------------------------------------------
def test_an_unreachable_redis_is_a_503_that_names_no_address(pipeline_settings: Settings,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    # Given a gateway whose Redis is a closed port, and a well-formed (fake) key
    port = free_port()
    dead = pipeline_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    server = start_gateway(dead, gateway_settings(webhook_secret=None))
    try:
        with server.client("tw_0123456789ab_" + "x" * 43, timeout=60) as api, \
                caplog.at_level(logging.WARNING, "tuwen"):
            # When it is asked on each family of routes
            answers = [api.get("/v1/jobs/" + "2" * 32), api.delete("/v1/jobs/" + "2" * 32),
                       api.post("/v1/chat/completions", json={"model": "tuwen", "messages": []}),
                       api.get("/v1/models"), api.get("/v1/batches"), api.get("/v1/files")]
    finally:
        server.stop()
    # Then each is a 503 that says what is down, not where it is
    for answer in answers:
        assert answer.status_code == 503 and int(answer.headers["Retry-After"]) > 0, answer.text
        assert answer.json()["error"]["code"] == "service_unavailable", answer.text
        assert "127.0.0.1" not in answer.text and str(port) not in answer.text, answer.text
    # And the address is in the log, for the operator
    assert any(str(port) in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


# -- 5. a chat request's user and metadata are logged, one line each, whatever they hold ------------------
FORGING = {"user": "a\r\nFORGED 2026-01-01 INFO tuwen.gateway: chat job x\u2028y",
           "metadata": {"note\n": "第一行\r\n第二行\x85", "k": "v"}}


def chat(sample: Sample, **extra: object) -> dict[str, object]:
    return {"model": "tuwen", "max_tokens": 8, "messages": [ask(sample)], **extra}


def test_chat_user_and_metadata_are_logged_on_one_line(gateway: Gateway, worker: WorkerProcess, keys: KeyStore,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    owner = f"owner-{uuid.uuid4().hex[:10]}"
    sample = load_samples()[0]
    with gateway.client(keys.create(owner, "test")[1]) as api, caplog.at_level(logging.INFO, "tuwen.gateway"):
        # Given a chat request whose user and metadata try to start log lines of their own, and one with neither
        forging = api.post("/v1/chat/completions", json=chat(sample, **FORGING))
        plain = api.post("/v1/chat/completions", json=chat(sample))
    assert forging.status_code == plain.status_code == 200, (forging.text, plain.text)
    # Then each accepted request is one record, on one line, with its job id, owner, user and metadata
    lines = {}
    for name, answer in (("forging", forging), ("plain", plain)):
        [record] = [r for r in caplog.records if answer.headers["X-Tuwen-Job-Id"] in r.getMessage()]
        lines[name] = record.getMessage()
        assert owner in lines[name] and len(lines[name].splitlines()) == 1 and "\r" not in lines[name], lines
    # And what the client sent is there, escaped (Chinese kept readable)
    assert 'user="a\\r\\nFORGED' in lines["forging"] and "chat job x\\u2028y" in lines["forging"], lines
    assert '"note\\n": "第一行\\r\\n第二行\\u0085"' in lines["forging"], lines
    assert "user=null metadata=null" in lines["plain"], lines


def test_tuwen_gateway_serve_writes_the_chat_line_to_its_log(pipeline_settings: Settings, worker: WorkerProcess,
                                                             keys: KeyStore, tmp_path: Path) -> None:
    owner = f"owner-{uuid.uuid4().hex[:10]}"
    served = GatewayProcess(pipeline_settings, tmp_path / "gateway.log", log_level="info").start()
    try:
        # Given `tuwen gateway serve` at its default log level, and a chat request that tries to forge a line
        with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {keys.create(owner, 't')[1]}"},
                          timeout=120, trust_env=False) as api:
            answer = api.post("/v1/chat/completions", json=chat(load_samples()[0], **FORGING))
    finally:
        served.stop()
    assert answer.status_code == 200, answer.text
    # Then its log has the request's line, with the time and the logger, and no line the client wrote
    log = (tmp_path / "gateway.log").read_text(encoding="utf-8")
    [line] = [line for line in log.split("\n") if answer.headers["X-Tuwen-Job-Id"] in line]
    assert " INFO tuwen.gateway: chat job " in line and f" of {owner}: " in line, line
    assert 'user="a\\r\\nFORGED' in line and "\r" not in log and "\u2028" not in log, log
    assert not [line for line in log.split("\n") if line.startswith("FORGED")], log


# -- 5. security headers -----------------------------------------------------------------------------------
PAGES = ("/docs", "/redoc", "/playground", "/static/playground.html")


def policy(header: str) -> dict[str, str]:
    """A Content-Security-Policy header as ``{directive: its sources}``."""
    return {name: " ".join(sources) for name, *sources in (part.split() for part in header.split(";"))}


def test_every_answer_says_nosniff_and_pages_allow_only_the_gateway(parked_gateway: Gateway, new_key: Keys) -> None:
    with parked_gateway.client(new_key()) as api, parked_gateway.client() as anonymous:
        # Given answers of every kind: JSON, text, errors of both shapes, an early 413, assets, pages
        answers = {"health": api.get("/healthz"), "metrics": api.get("/metrics"), "spec": api.get("/openapi.json"),
                   "404": api.get("/v1/jobs/" + "5" * 32), "401 (OpenAI)": anonymous.get("/v1/models"),
                   "413": api.post("/v1/jobs", files={"image": ("a.png", b"\0" * (UPLOAD_LIMIT + 1), "image/png")}),
                   "unmatched": anonymous.get("/nowhere"), "405": anonymous.post("/healthz"),
                   "asset": anonymous.get("/docs/assets/swagger-ui.css"),
                   "script": anonymous.get("/static/playground.js")}
        pages = {path: anonymous.get(path) for path in PAGES}
        redoc = anonymous.get("/docs/assets/redoc.standalone.js")
        redoc_head = anonymous.head("/docs/assets/redoc.standalone.js")
    assert answers["413"].status_code == 413 and answers["405"].status_code == 405
    # Then every one says nosniff
    assert {name: a.headers.get("x-content-type-options") for name, a in {**answers, **pages}.items()} == \
        {name: "nosniff" for name in {**answers, **pages}}
    for path, page in pages.items():
        # And every page allows the gateway alone, and no framing
        assert page.status_code == 200 and page.headers["x-frame-options"] == "DENY", path
        header = page.headers["content-security-policy"]
        rules = policy(header)
        assert rules["default-src"] == "'self'" and rules["frame-ancestors"] == "'none'", rules
        assert rules["script-src"].split()[0] == "'self'" and "unsafe" not in rules["script-src"], rules
        assert "http" not in header and "*" not in header, header
        # And names no other host
        assert [url for url in re.findall(r"""https?://[^\s"'<>]+""", page.text)
                if not url.startswith(parked_gateway.url + "/")] == [], path
    assert "sha256-" in policy(pages["/docs"].headers["content-security-policy"])["script-src"]  # its set-up script
    assert policy(pages["/playground"].headers["content-security-policy"])["script-src"] == "'self'"
    # And ReDoc's script fetches no logo from a CDN
    assert redoc.status_code == 200 and len(redoc.content) > 100_000 and b"cdn.redoc.ly" not in redoc.content
    assert redoc_head.status_code == 200 and redoc_head.content == b""
    assert "content-security-policy" not in answers["health"].headers
