"""The gateway's app factory: web backends in any language submit pictures, poll, cancel and get webhooks.

``create_app(settings, gateway)`` builds the shared state once (``state.GatewayState``: the same
``Client`` the Python producers use, so validation and error codes are the same), keeps it on
``app.state.gateway`` for the routers (``routes.jobs``; the OpenAI-compatible ``routes.chat`` and
``routes.models``; ``routes.health``, ``routes.docs``), and puts the intake (body limits per route, JSON
nesting, strict UTF-8), the metrics and the security headers (``security``) under them. Serve it with
``tuwen gateway serve`` (``server``: read deadlines, connection cap, logging); ``uvicorn --factory
tuwen.pipeline.gateway.app:app_from_env`` runs the same app. The walk-through: ``docs/gateway.md``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.routing import Mount

from tuwen.pipeline.gateway import errors
from tuwen.pipeline.gateway.batch_settings import FILES_PATH, files_limit
from tuwen.pipeline.gateway.bodylimits import CHAT_PATH, RESPONSES_PATH, BodyLimits, chat_limit
from tuwen.pipeline.gateway.intake import register_strict_utf8
from tuwen.pipeline.gateway.metrics import RequestMetrics
from tuwen.pipeline.gateway.routes import audio, batches, chat, docs, files, health, jobs, models, responses
from tuwen.pipeline.gateway.security import SecurityHeaders
from tuwen.pipeline.gateway.settings import GatewaySettings
from tuwen.pipeline.gateway.state import GatewayState
from tuwen.pipeline.settings import Settings

DESCRIPTION = (
    "看图回答问题：上传一张图片和一个中文问题，稍后取回答案（轮询、长轮询或 webhook）。\n\n"
    "Upload a picture and a question; get the answer by polling, long-polling or a signed webhook. "
    "Every error is OpenAI's `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`, `code` one of tuwen's "
    "stable codes. Auth: `Authorization: Bearer <API key>` (`tuwen keys create`). `POST /v1/chat/completions` "
    "and `POST /v1/responses` speak OpenAI's chat and Responses APIs.")
ROUTERS = (jobs.router, chat.router, responses.router, audio.router, models.router, files.router, batches.router,
           health.router, docs.router)
TAGS = [{"name": "jobs", "description": "提交、查询、取消任务 · submit, read, cancel jobs"},
        {"name": "chat", "description": "OpenAI-compatible chat completions, responses and models "
                                        "(docs/openai.md); errors in OpenAI's shape"},
        {"name": "ops", "description": "health, readiness and metrics"}]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The job listener and the webhook delivery run while the app runs."""
    state: GatewayState = app.state.gateway
    state.start()
    try:
        yield
    finally:
        state.stop()
        await state.aclient.aclose()


def create_app(settings: Settings, gateway: GatewaySettings | None = None) -> FastAPI:
    """The gateway as an ASGI app, its shared state built once and kept on ``app.state.gateway``."""
    gw = gateway or GatewaySettings()
    state = GatewayState(settings, gw)
    app = FastAPI(title="tuwen gateway (图文)", version="1", description=DESCRIPTION, openapi_tags=TAGS,
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = state
    errors.install(app)
    register_strict_utf8()
    for router in ROUTERS:
        app.include_router(router)
    docs.mount_files(app)
    app.add_middleware(BodyLimits, limit=gw.upload_limit(settings),
                       larger={CHAT_PATH: chat_limit(settings, gw), RESPONSES_PATH: chat_limit(settings, gw),
                               FILES_PATH: files_limit(gw), audio.AUDIO_PATH: settings.max_audio_bytes + 1024 * 1024},
                       picture_bytes=settings.max_image_bytes)
    # The routes themselves (the app lists included routers whole), to label requests by route template.
    routes = [route for router in ROUTERS for route in router.routes] + [r for r in app.routes if isinstance(r, Mount)]
    app.add_middleware(RequestMetrics, metrics=state.metrics, routes=routes)
    app.add_middleware(SecurityHeaders)  # outermost: on every answer, an early 413 included
    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory tuwen.pipeline.gateway.app:app_from_env`` (settings from ``TUWEN_*``);
    serve it with ``tuwen gateway serve`` to get the read deadlines of ``server`` too."""
    return create_app(Settings(), GatewaySettings())
