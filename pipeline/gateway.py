"""The HTTP gateway: web backends in any language submit pictures, poll, cancel and get webhooks.

``create_app(settings)`` wraps the same ``Client`` the Python producers use, so validation and error
codes are the same (``InvalidInput`` → 422, ``Unavailable`` → 503 with ``Retry-After``; every error is
``{"error": {"code", "message"}}``). Run it with ``tuwen gateway serve`` or
``uvicorn --factory tuwen.pipeline.gateway:app_from_env``. API keys: ``tuwen.pipeline.apikeys``; webhooks:
``tuwen.pipeline.webhooks``; the walk-through for web backends: ``docs/gateway.md``.
"""

# No `from __future__ import annotations`: FastAPI must see the real types of the closures' parameters.
import asyncio
import codecs
import hashlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, File, Form, Header, Path, Query, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuwen.pipeline.apikeys import ApiKey, Conflict, Idempotency, KeyStore
from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import Forbidden, InvalidInput, NotFound, TuwenError, Unavailable
from tuwen.pipeline.schema import ErrorInfo, JobStatus, Priority
from tuwen.pipeline.settings import Settings
from tuwen.pipeline.webhooks import DoneListener, Dispatcher, WebhookStore, check_callback_url, job_payload

log = logging.getLogger("tuwen.gateway")
FORM_FIELDS = frozenset({"image", "question", "priority", "max_new_tokens", "callback_url"})
JOB_ID = r"^[A-Za-z0-9_-]{8,64}$"
EXAMPLE_QUESTION = "图中有几个圆形？"
STRICT_UTF8 = "tuwen_utf8_strict"


class GatewaySettings(BaseSettings):
    """The gateway's own settings (``TUWEN_*``), next to the shared ``Settings``."""

    model_config = SettingsConfigDict(env_prefix="TUWEN_", env_file=None, extra="ignore", frozen=True,
                                      env_ignore_empty=True)

    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(8000, ge=1, le=65535)
    #: Largest request body, counted while it streams in (413 beyond). 0: max_image_bytes + 64 KiB.
    gateway_max_upload_bytes: int = Field(0, ge=0)
    #: Cap on ``GET /v1/jobs/{id}?wait=N`` long-polls, in seconds.
    gateway_max_wait_s: float = Field(30.0, gt=0, le=600)
    #: How long an ``Idempotency-Key`` maps to its job.
    gateway_idempotency_ttl_s: int = Field(24 * 3600, ge=60)
    #: Requests per minute per API key (0: unlimited); ``tuwen keys create --rate-limit`` overrides it.
    rate_limit_per_minute: int = Field(120, ge=0)
    #: HMAC key for webhook signatures. Unset: webhooks are off and ``callback_url`` is refused.
    webhook_secret: SecretStr | None = None
    #: Callback hosts allowed: ``hooks.example.com``, ``*.example.com`` or ``*`` (comma-separated in env).
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Allow callbacks to loopback / private / link-local addresses (off: SSRF guard).
    webhook_allow_private: bool = False
    webhook_max_attempts: int = Field(8, ge=1, le=50)
    #: First retry after this many seconds, doubling each time up to ``webhook_backoff_max_s``.
    webhook_backoff_s: float = Field(2.0, gt=0)
    webhook_backoff_max_s: float = Field(600.0, gt=0)
    webhook_timeout_s: float = Field(10.0, gt=0, le=120)
    #: How often the delivery loop looks for ended jobs it did not hear about.
    webhook_sweep_s: float = Field(5.0, gt=0, le=300)

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return json.loads(value) if value.lstrip().startswith("[") else [
                h.strip() for h in value.split(",") if h.strip()]
        return value

    def upload_limit(self, settings: Settings) -> int:
        return self.gateway_max_upload_bytes or settings.max_image_bytes + 64 * 1024


# -- the documented shapes -----------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    code: str = Field(examples=["empty_question"])
    message: str = Field(examples=["the question is empty"])


class ErrorBody(BaseModel):
    error: ErrorDetail


class JobAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"id": "5f0c6a1e9b2d4c7a8e3f1b2c3d4e5f60",
                                                               "status": "queued"}]})
    id: str
    status: JobStatus


class WebhookView(BaseModel):
    url: str
    #: pending (job running) · retrying · delivered · failed (gave up) · refused (SSRF guard) · expired
    state: str
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None
    next_attempt_at: float | None = None
    delivered_at: float | None = None
    created_at: float | None = None


class JobView(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "5f0c6a1e9b2d4c7a8e3f1b2c3d4e5f60", "status": "succeeded", "answer": "图中有3个圆形。",
        "model_id": "tuwen-demo", "batch_size": 4, "attempts": 1, "created_at": 1790000000.0,
        "finished_at": 1790000000.8, "timings": {"queue_ms": 120.5, "model_ms": 310.2, "total_ms": 812.0},
        "webhook": {"url": "https://hooks.example.com/tuwen", "state": "delivered", "attempts": 1,
                    "last_status": 200}}]})
    id: str
    status: JobStatus
    answer: str | None = None
    error: ErrorInfo | None = None
    model_id: str | None = None
    batch_size: int | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    attempts: int = 0
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    #: A cancel arrived while the job was running: it finishes, and says so here.
    cancel_requested: bool | None = None
    webhook: WebhookView | None = None


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    redis: str = Field(examples=["ok"])
    storage: str = Field(examples=["ok"])


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "malformed request", 401: "missing or wrong API key", 404: "no such job (or not yours)",
            409: "conflict", 413: "upload too large", 422: "invalid input (see error.code)",
            429: "rate limit; see Retry-After", 503: "a service is unavailable; see Retry-After"}
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


class ApiError(HTTPException):
    """An HTTP error with a stable code (FastAPI re-raises HTTPExceptions, even from body parsing)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# -- middleware -----------------------------------------------------------------------------------------
def _strict_utf8(name: str) -> codecs.CodecInfo | None:
    """A UTF-8 codec that keeps invalid bytes as lone surrogates (Starlette would silently fall back to
    Latin-1), so ``check_question`` refuses them as ``invalid_question`` instead of reading mojibake."""
    if name != STRICT_UTF8:
        return None

    def decode(data: Any, errors: str = "strict") -> tuple[str, int]:
        return codecs.utf_8_decode(data, "surrogateescape", True)

    return codecs.CodecInfo(codecs.utf_8_encode, decode, name=name)


class Intake:
    """Refuse bodies over ``limit`` bytes (413) as they stream in: a declared Content-Length before
    reading anything, a chunked body as soon as the count passes the limit; nothing unbounded is read.
    Multipart text fields are decoded as strict UTF-8 (see ``_strict_utf8``)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            response = error_response(413, "request_too_large", f"the request body exceeds {self.limit} bytes",
                                      {"Connection": "close"})
            return await response(scope, receive, send)
        kind = headers.get(b"content-type", b"")
        if kind.lower().startswith(b"multipart/form-data") and b"charset" not in kind.lower():
            scope = {**scope, "headers": [(k, v + b"; charset=" + STRICT_UTF8.encode() if k == b"content-type" else v)
                                          for k, v in scope["headers"]]}
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, "request_too_large", f"the request body exceeds {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


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

    def middleware(self, app: ASGIApp) -> ASGIApp:
        async def measured(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            status, started = 500, time.perf_counter()

            async def record(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive, record)
            finally:
                route = getattr(scope.get("route"), "path", "unmatched")
                self.requests.labels(scope["method"], route, str(status)).inc()
                self.latency.labels(route).observe(time.perf_counter() - started)

        return measured


# -- long-polls ---------------------------------------------------------------------------------------------
class Waiters:
    """Long-polls park on an ``asyncio.Event`` (not a thread) until the ``DoneListener`` says their job
    ended; each re-reads the job at least every second, so a missed message costs a second at most."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parked: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def notify(self, job_id: str) -> None:
        with self._lock:
            for loop, event in self._parked.get(job_id, ()):
                loop.call_soon_threadsafe(event.set)

    async def wait(self, job_id: str, timeout: float) -> None:
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._parked.setdefault(job_id, set()).add(entry)
        try:
            await asyncio.wait_for(entry[1].wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                parked = self._parked.get(job_id, set())
                parked.discard(entry)
                if not parked:
                    self._parked.pop(job_id, None)


# -- the app ----------------------------------------------------------------------------------------------
def _status_of(exc: TuwenError) -> int:
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, InvalidInput):
        return 422
    if isinstance(exc, (NotFound, Forbidden)):
        return 404
    return 503 if isinstance(exc, Unavailable) or exc.retryable else 500


def _validation_error(exc: RequestValidationError) -> tuple[str, str]:
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "type": ""}
    field = str(first["loc"][-1]) if first["loc"] else ""
    missing = first.get("type") == "missing"
    code = {"question": "empty_question" if missing else "invalid_question",
            "image": "empty_image" if missing else "invalid_image",
            "max_new_tokens": "invalid_params", "priority": "invalid_params", "wait": "invalid_params",
            "callback_url": "invalid_callback_url", "Idempotency-Key": "invalid_idempotency_key",
            "job_id": "not_found"}.get(field, "invalid_request")
    message = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in errors)
    return code, message or "invalid request"


def create_app(settings: Settings, gateway: GatewaySettings | None = None) -> FastAPI:
    """The gateway as an ASGI app; the webhook delivery loop runs while the app runs (lifespan)."""
    gw = gateway or GatewaySettings()
    client = Client(settings)
    redis_client = client.jobs.redis
    keys, idem = KeyStore(redis_client), Idempotency(redis_client, gw.gateway_idempotency_ttl_s)
    hooks, metrics = WebhookStore(redis_client, settings.result_ttl_s), Metrics()
    waiters = Waiters()
    dispatcher = (Dispatcher(gw, client.jobs, hooks, lambda o: metrics.webhooks.labels(o).inc())
                  if gw.webhook_secret is not None else None)
    listener = DoneListener(redis_client, [waiters.notify] + ([dispatcher.job_done] if dispatcher else []))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        listener.start()
        if dispatcher is not None:
            dispatcher.start()
        try:
            yield
        finally:
            listener.stop()
            if dispatcher is not None:
                dispatcher.stop()
            client.close()

    app = FastAPI(title="tuwen gateway (图文)", version="1", lifespan=lifespan, description=(
        "看图回答问题：上传一张图片和一个中文问题，稍后取回答案（轮询、长轮询或 webhook）。\n\n"
        "Upload a picture and a question; get the answer by polling, long-polling or a signed webhook. "
        "Errors are `{\"error\": {\"code\", \"message\"}}` with stable codes. Auth: `Authorization: Bearer "
        "<API key>` (`tuwen keys create`)."), openapi_tags=[
        {"name": "jobs", "description": "提交、查询、取消任务 · submit, read, cancel jobs"},
        {"name": "ops", "description": "health and metrics"}])
    try:
        codecs.lookup(STRICT_UTF8)
    except LookupError:
        codecs.register(_strict_utf8)
    app.add_middleware(Intake, limit=gw.upload_limit(settings))
    app.add_middleware(metrics.middleware)
    bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer tw_…`")

    @app.exception_handler(TuwenError)
    async def tuwen_error(_: Request, exc: TuwenError) -> JSONResponse:
        status = _status_of(exc)
        if status == 500:
            log.error("gateway error %s: %s", exc.code, exc.message)
        retry = {503: {"Retry-After": "5"}, 409: {"Retry-After": "1"}}.get(status)
        return error_response(status, exc.code, exc.message, retry)

    @app.exception_handler(redis.RedisError)
    async def redis_error(_: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("Redis error: %s", exc)
        return error_response(503, "service_unavailable", "Redis is not reachable", {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled gateway error", exc_info=exc)
        return error_response(500, "internal_error", "internal error; it has been logged")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        code, message = _validation_error(exc)
        return error_response(404 if code == "not_found" else 422, code, message)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or {400: "invalid_request", 404: "not_found", 405: "method_not_allowed",
                                              413: "request_too_large"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    def caller(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> ApiKey:
        unauthorized = {"WWW-Authenticate": "Bearer"}
        if creds is None:
            raise ApiError(401, "unauthorized", "an API key is required: Authorization: Bearer <key>", unauthorized)
        key = keys.authenticate(creds.credentials)
        if key is None:
            raise ApiError(401, "invalid_api_key", "this API key is not valid (unknown or revoked)", unauthorized)
        wait = keys.hit(key, gw.rate_limit_per_minute)
        if wait:
            raise ApiError(429, "rate_limited", "too many requests for this API key", {"Retry-After": f"{wait:.0f}"})
        return key

    async def form_names(request: Request) -> set[str]:
        return set((await request.form()).keys())

    Caller = Annotated[ApiKey, Depends(caller)]
    JobId = Annotated[str, Path(pattern=JOB_ID, examples=["5f0c6a1e9b2d4c7a8e3f1b2c3d4e5f60"])]

    def view(job_id: str, result: Any, cancel_requested: bool | None = None) -> JobView:
        if result.status == JobStatus.unknown:
            raise ApiError(404, "not_found", f"no job {job_id}")
        payload = job_payload(result)
        if cancel_requested:
            payload["cancel_requested"] = True
        hook = hooks.state(job_id)
        return JobView(**payload, webhook=WebhookView(**hook) if hook else None)

    @app.post("/v1/jobs", status_code=202, response_model=JobAccepted, tags=["jobs"],
              summary="提交图片和问题 · submit a picture and a question",
              responses=_errors(400, 401, 409, 413, 422, 429, 503))
    def submit(
        key: Caller,
        names: Annotated[set[str], Depends(form_names)],
        response: Response,
        image: Annotated[UploadFile, File(description="picture (PNG, JPEG, GIF, WebP, BMP, TIFF); type is "
                                                      "sniffed from the bytes")],
        question: Annotated[str, Form(description="问题, in Chinese or English", examples=[EXAMPLE_QUESTION])],
        priority: Annotated[Priority, Form()] = Priority.interactive,
        max_new_tokens: Annotated[int | None, Form(ge=1, le=4096, examples=[32])] = None,
        callback_url: Annotated[str | None, Form(max_length=2048, examples=["https://hooks.example.com/tuwen"],
                                                 description="POSTed the result when the job ends")] = None,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255,
                                                      pattern=r"^[!-~]+$")] = None,
    ) -> JobAccepted:
        """Stores the picture, queues the job and answers at once with its id (202)."""
        unknown = sorted(names - FORM_FIELDS)
        if unknown:
            raise InvalidInput(f"unknown field(s): {', '.join(unknown)}", code="invalid_params")
        data = image.file.read()
        if callback_url is not None:
            check_callback_url(callback_url, gw)
        fingerprint = hashlib.sha256(data + json.dumps(
            [question, priority.value, max_new_tokens, callback_url]).encode()).hexdigest()
        if idempotency_key is not None:
            first = idem.begin(key.owner, idempotency_key, fingerprint)
            if first is not None:
                response.headers["Idempotent-Replayed"] = "true"
                response.headers["Location"] = f"/v1/jobs/{first}"
                return JobAccepted(id=first, status=client.get(first, key.owner).status)
        try:
            request = client.prepare(data, question, max_new_tokens=max_new_tokens, priority=priority,
                                     owner=key.owner)
            if callback_url is not None:
                hooks.register(request.id, callback_url)
            try:
                client.enqueue(request)
            except BaseException:
                hooks.forget(request.id)
                raise
        except BaseException:
            if idempotency_key is not None:
                idem.release(key.owner, idempotency_key)
            raise
        if idempotency_key is not None:
            idem.complete(key.owner, idempotency_key, fingerprint, request.id)
        metrics.submitted.labels(priority.value).inc()
        response.headers["Location"] = f"/v1/jobs/{request.id}"
        return JobAccepted(id=request.id, status=JobStatus.queued)

    @app.get("/v1/jobs/{job_id}", response_model=JobView, response_model_exclude_none=True, tags=["jobs"],
             summary="查询任务 · a job's status and answer", responses=_errors(401, 404, 422, 429, 503))
    async def get_job(key: Caller, job_id: JobId,
                      wait: Annotated[float, Query(ge=0, description="long-poll: wait up to N seconds for the job "
                                                                     "to end (capped by the server)")] = 0) -> JobView:
        """The job's state now, or when it ends within ``wait`` seconds."""
        deadline = time.monotonic() + min(wait, gw.gateway_max_wait_s)
        while True:
            result = await run_in_threadpool(client.get, job_id, key.owner)
            left = deadline - time.monotonic()
            if result.status.terminal or result.status == JobStatus.unknown or left <= 0:
                break
            await waiters.wait(job_id, min(left, 1.0))
        flagged = result.status == JobStatus.running and await run_in_threadpool(client.jobs.cancel_requested, job_id)
        return await run_in_threadpool(view, job_id, result, True if flagged else None)

    @app.delete("/v1/jobs/{job_id}", response_model=JobView, response_model_exclude_none=True, tags=["jobs"],
                summary="取消任务 · cancel a queued job", responses={
                    202: {"model": JobView, "description": "running: it finishes, marked cancel_requested"},
                    **_errors(401, 404, 409, 422, 429, 503)})
    def cancel_job(key: Caller, job_id: JobId, response: Response) -> JobView:
        """A queued job is cancelled and never runs; a running one finishes (202); an ended one: 409."""
        current = client.get(job_id, key.owner)
        if current.status in (JobStatus.succeeded, JobStatus.failed):
            raise ApiError(409, "already_finished", f"the job already {current.status.value}")
        result = client.cancel(job_id, key.owner) if current.status != JobStatus.unknown else current
        if result.status == JobStatus.running:
            response.status_code = 202
            return view(job_id, result, True)
        return view(job_id, result)

    @app.get("/healthz", response_model=Health, tags=["ops"], summary="Redis and storage reachable?",
             responses={503: {"model": Health, "description": "a dependency is down"}})
    def healthz() -> JSONResponse:
        checks = {"redis": "ok", "storage": "ok"}
        try:
            redis_client.ping()
        except redis.RedisError as exc:
            log.warning("health: Redis: %s", exc)
            checks["redis"] = "unreachable"
        try:
            client.images.objects.ping()
        except Exception as exc:  # noqa: BLE001 - any storage failure means unhealthy
            log.warning("health: storage: %s", exc)
            checks["storage"] = "unreachable"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["ops"], summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory tuwen.pipeline.gateway:app_from_env`` (settings from ``TUWEN_*``)."""
    return create_app(Settings(), GatewaySettings())
