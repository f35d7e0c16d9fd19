"""``/healthz``, ``/readyz`` and ``/metrics``: for load balancers, orchestrators and Prometheus (no key)."""

# No `from __future__ import annotations`: FastAPI reads these signatures at import time.
import logging

import redis
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from tuwen.pipeline.gateway.deps import State
from tuwen.pipeline.gateway.models import Health, Ready
from tuwen.pipeline.gateway.state import GatewayState
from tuwen.pipeline.registry import no_worker

log = logging.getLogger("tuwen.gateway")
router = APIRouter(tags=["ops"])


def checks(state: GatewayState) -> tuple[dict[str, str], dict[str, int]]:
    """``{"redis", "storage"}`` → ``ok`` or ``unreachable``, and the live workers per queue."""
    status, workers = {"redis": "ok", "storage": "ok"}, {}
    try:
        state.redis.ping()
        workers = state.census.counts()
    except redis.RedisError as exc:
        log.warning("health: Redis: %s", exc)
        status["redis"] = "unreachable"
    try:
        state.client.images.objects.ping()
    except Exception as exc:  # noqa: BLE001 - any storage failure means unhealthy
        log.warning("health: storage: %s", exc)
        status["storage"] = "unreachable"
    return status, workers


@router.get("/healthz", response_model=Health, summary="Redis and storage reachable? workers?",
            responses={503: {"model": Health, "description": "a dependency is down"}})
def healthz(state: State) -> JSONResponse:
    """200 while Redis and storage answer (no key needed); ``workers`` counts live workers per queue."""
    status, workers = checks(state)
    ok = all(v == "ok" for v in status.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", **status, "workers": workers},
                        status_code=200 if ok else 503)


@router.get("/readyz", response_model=Ready, summary="ready to answer: dependencies and a worker",
            responses={503: {"model": Ready, "description": "a dependency is down or no worker is live"}})
def readyz(state: State) -> JSONResponse:
    """200 when Redis and storage answer and a live worker consumes the interactive queue, else 503."""
    status, workers = checks(state)
    down = [f"{name} is unreachable" for name, value in status.items() if value != "ok"]
    queue = state.settings.interactive_queue
    if not down and not workers.get(queue):
        down.append(no_worker(queue))
    if down:
        return JSONResponse({"status": "unavailable", "reason": "; ".join(down), "workers": workers},
                            status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ready", "workers": workers})


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
def prometheus(state: State) -> Response:
    text, content_type = state.metrics.exposition()
    return Response(text, media_type=content_type)
