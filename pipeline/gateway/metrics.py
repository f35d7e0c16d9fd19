"""The gateway's Prometheus metrics: requests by route and status, latency, submits, webhook outcomes."""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send


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

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text of this registry, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetrics:
    """ASGI middleware: counts and times every request by its route template (``/v1/jobs/{job_id}``,
    never the raw path). A request the router did not label (answered before routing, like an early
    413, or served by a mount) is matched against ``routes`` here; ``unmatched`` for no route."""

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
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    def route_of(self, scope: Scope, unrouted: Scope) -> str:
        matched = scope.get("route")
        if matched is None:
            matched = next((r for r in self.routes if r.matches(unrouted)[0] == Match.FULL), None)
        return str(getattr(matched, "path", "unmatched"))
