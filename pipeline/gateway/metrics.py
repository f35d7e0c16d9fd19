"""The gateway's Prometheus metrics: requests by route and status, latency, submits, webhook outcomes.

Every label value comes from a closed set, so no request can add a series: the method is one of
``METHODS`` or ``other``, the route a route template or ``unmatched``, the status one of ``STATUSES`` or
``other``. (A made-up method or path per request grew /metrics by a series each, for the process's life.)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuwen.pipeline import sentinel


#: The methods counted by name; any other is ``other``.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The statuses counted by number (the standard ones, and 499: a client that went away); any other is ``other``.
STATUSES = frozenset({str(s.value) for s in HTTPStatus} | {"499"})


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def status_label(status: int) -> str:
    return str(status) if str(status) in STATUSES else "other"


class Metrics:
    """Prometheus counters of this gateway (own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tuwen_gateway_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("tuwen_gateway_request_seconds", "HTTP request latency", ["route"],
                                 registry=self.registry)
        self.submitted = Counter("tuwen_gateway_jobs_submitted", "Jobs accepted", ["priority"],
                                 registry=self.registry)
        self.webhooks = Counter("tuwen_gateway_webhook_deliveries", "Webhook attempts by outcome",
                                ["outcome"], registry=self.registry)
        self.registry.register(sentinel.collector())  # Redis failovers followed, writes not replicated in time

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text of this registry, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetrics:
    """ASGI middleware: counts and times every request by its route template (``/v1/jobs/{job_id}``,
    never the raw path), method and status, each from a closed set. A request the router did not label
    (answered before routing, like an early 413, or served by a mount) is matched against ``routes``
    here; ``unmatched`` for no route."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, started = 500, time.perf_counter()
        unrouted = dict(scope)  # routing rewrites the scope's paths (mounts); match the request as it came

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = self.route_of(scope, unrouted)
            self.metrics.requests.labels(method_label(scope["method"]), route, status_label(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    def route_of(self, scope: Scope, unrouted: Scope) -> str:
        matched = scope.get("route")
        if matched is None:
            matched = next((r for r in self.routes if r.matches(unrouted)[0] == Match.FULL), None)
        return str(getattr(matched, "path", "unmatched"))
