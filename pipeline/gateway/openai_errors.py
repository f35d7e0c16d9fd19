"""Errors of the OpenAI-compatible routes, in OpenAI's shape: ``{"error": {"message", "type", "param",
"code"}}``, with the statuses the official SDK turns into its own classes (400 ``BadRequestError``, 401
``AuthenticationError``, 404 ``NotFoundError``, 429 ``RateLimitError`` …). The codes are tuwen's own.

``OpenAIRoute`` answers every error of its routes this way, whatever raised it (a dependency, the
body, tuwen's ``InvalidInput``, Redis), with its code's status (``errors.http_status``; tuwen's 422 is
OpenAI's 400). The body is ``envelope.error_body``'s, the envelope of tuwen's own routes too: one shape, one
status per code, one status-to-type mapping.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import redis
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from tuwen.pipeline.envelope import error_body
from tuwen.pipeline.errors import TuwenError, http_status
from tuwen.pipeline.gateway.errors import http_code, retry_after, validation_code
from tuwen.pipeline.gateway.errors import param_of as param_of

log = logging.getLogger("tuwen.gateway")

#: Once a job is queued, a retry would queue a second one: the SDK is told not to retry (its
#: ``x-should-retry`` header); the error carries the job id to read instead.
NO_RETRY = {"x-should-retry": "false"}


class OpenAIError(Exception):
    """An error answer of the OpenAI-compatible routes; ``param`` names the request field at fault,
    ``job_id`` the job the request queued (timeouts, failed jobs)."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 headers: Mapping[str, str] | None = None, job_id: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = dict(headers or {})
        self.job_id = job_id

    def body(self) -> dict[str, Any]:
        extra = {"job_id": self.job_id} if self.job_id is not None else {}
        return error_body(self.status, self.code, self.message, param=self.param, **extra)

    def response(self) -> JSONResponse:
        headers = {**self.headers, **({"X-Tuwen-Job-Id": self.job_id} if self.job_id else {})}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def openai_error(code: str, message: str, *, param: str | None = None, headers: Mapping[str, str] | None = None,
                 job_id: str | None = None, status: int | None = None) -> OpenAIError:
    """The error to raise (or answer) for ``code``, one of ``errors.ErrorCode``'s, with its status
    (``errors.http_status``) unless ``status`` says otherwise: an HTTP error not of tuwen's making, or
    ``model_not_served`` while no worker is live at all (503, not the code's 404)."""
    return OpenAIError(status or http_status(code, openai=True), code, message, param=param, headers=headers,
                       job_id=job_id)


def as_openai(exc: Exception) -> OpenAIError:
    """Any error of an OpenAI-compatible route, as OpenAI shapes it (tuwen's 422 becomes 400)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, TuwenError):
        if exc.status == 500:
            log.error("gateway error %s: %s", exc.code, exc.message)
        return openai_error(exc.code, exc.message, param=getattr(exc, "param", None),
                            headers=retry_after(exc.status, exc.retryable))
    if isinstance(exc, RequestValidationError):
        code, message = validation_code(exc)
        errors = list(exc.errors())
        return openai_error(code, message, param=param_of(tuple(errors[0]["loc"])) if errors else None)
    if isinstance(exc, HTTPException):
        status = 400 if exc.status_code == 422 else exc.status_code
        return openai_error(http_code(exc), str(exc.detail), headers=exc.headers, status=status)
    if isinstance(exc, redis.RedisError):
        log.warning("Redis error: %s", exc)
        return openai_error("service_unavailable", "Redis is not reachable", headers={"Retry-After": "5"})
    log.exception("unhandled gateway error", exc_info=exc)
    return openai_error("internal_error", "internal error; it has been logged")


class OpenAIRoute(APIRoute):
    """A route whose every error is answered in OpenAI's shape (``as_openai``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer_in_openai_shape(request: Request) -> Response:
            try:
                return await handler(request)
            except ClientDisconnect:
                raise  # nobody to answer; the app's handler logs it
            except Exception as exc:  # noqa: BLE001 - every error becomes an answer
                return as_openai(exc).response()

        return answer_in_openai_shape
