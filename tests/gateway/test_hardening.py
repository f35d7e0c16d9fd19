"""The gateway's security review (issue 21): metrics that cannot grow without limit, deep JSON refused,
a rate limit that holds across a minute boundary, security headers, outages that do not name addresses,
and chat requests' ``user``/``metadata`` logged safely. A real uvicorn gateway over the session's Redis
and S3, and that Redis for the rate limit."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

import pytest

from tuwen.pipeline.apikeys import KeyStore
from tests.gateway.conftest import Gateway

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
