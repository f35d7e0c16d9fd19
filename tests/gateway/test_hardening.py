"""The gateway's security review (issue 21): metrics that cannot grow without limit, deep JSON refused,
a rate limit that holds across a minute boundary, security headers, outages that do not name addresses,
and chat requests' ``user``/``metadata`` logged safely. A real uvicorn gateway over the session's Redis
and S3, and that Redis for the rate limit."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

import pytest

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
