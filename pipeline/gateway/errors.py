"""Every error answer of the gateway in the envelope (``tuwen.pipeline.envelope``: OpenAI's ``{"error":
{"message", "type", "param", "code"}}``), so any OpenAI client reads any error, a 404 for a made-up path
included. Clients of tuwen's own routes that read ``code`` and ``message`` read them as before.

``install`` registers the handlers that turn tuwen's errors (each with its code's status from the catalogue,
``errors.http_status``: ``invalid_params`` → 422, ``service_unavailable`` → 503 with ``Retry-After`` …),
Redis outages, validation errors and HTTP errors (an unknown path's 404, a wrong method's 405 with
``Allow``) into that envelope.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import redis
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from tuwen.pipeline.envelope import error_body
from tuwen.pipeline.errors import TuwenError, http_status
from tuwen.pipeline.structured import schema_error

log = logging.getLogger("tuwen.gateway")

#: Which error code a validation error of each request field gets (missing or wrong).
_FIELD_CODES = {"max_new_tokens": "invalid_params", "priority": "invalid_params", "wait": "invalid_params",
                "callback_url": "invalid_callback_url", "Idempotency-Key": "invalid_idempotency_key",
                "job_id": "not_found"}


#: The code of an HTTP error that is not tuwen's (Starlette's own, which has only a status); any other status
#: is ``http_error``.
_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
               422: "invalid_request"}
#: The longest request path an error message quotes.
_PATH_CHARS = 200


class ApiError(HTTPException):
    """An HTTP error with a stable code and its status (FastAPI re-raises HTTPExceptions, even from body
    parsing)."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=http_status(code), detail=message, headers=headers)
        self.code = code


def no_such_job(job_id: str) -> ApiError:
    """The one 404 for a job that does not exist and for another owner's: byte for byte the same, so
    the answer never tells whether someone else's job exists."""
    return ApiError("not_found", f"no job {job_id}")


def error_response(code: str, message: str, headers: Mapping[str, str] | None = None, *, param: str | None = None,
                   status: int | None = None) -> JSONResponse:
    """The answer for an error with ``code``, with its status (``errors.http_status``) unless an HTTP error not
    of tuwen's making gives its own."""
    status = status or http_status(code)
    return JSONResponse(error_body(status, code, message, param=param), status_code=status, headers=headers)


def param_of(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content")`` → ``messages[0].content``, as OpenAI names parameters."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("body", "header", "query", "path"):
            out += ("." if out else "") + str(part)
    return out or None


def retry_after(status: int, retryable: bool) -> dict[str, str] | None:
    """The ``Retry-After`` of an error answer: a 503 says when to come back; a 409 that passes (a request
    with the same Idempotency-Key still being handled) says soon."""
    return {"Retry-After": "5"} if status == 503 else {"Retry-After": "1"} if status == 409 and retryable else None


def http_code(exc: HTTPException) -> str:
    """The code of an HTTP error: tuwen's ``ApiError`` has its own; Starlette's is named by its status."""
    return getattr(exc, "code", None) or _HTTP_CODES.get(exc.status_code, "http_error")


def validation_code(exc: RequestValidationError) -> tuple[str, str]:
    """The code and message of a request that failed validation; the first error names the code."""
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "type": ""}
    field = str(first["loc"][-1]) if first["loc"] else ""
    missing = first.get("type") == "missing"
    codes = {**_FIELD_CODES, "question": "empty_question" if missing else "invalid_question",
             "image": "empty_image" if missing else "invalid_image"}
    message = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in errors)
    if schema_error(errors):
        return "invalid_schema", message
    return codes.get(field, "invalid_request"), message or "invalid request"


# -- handlers ---------------------------------------------------------------------------------------------
async def _tuwen_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, TuwenError)
    if exc.status == 500:
        log.error("gateway error %s: %s", exc.code, exc.message)
    return error_response(exc.code, exc.message, retry_after(exc.status, exc.retryable))


async def _redis_error(_: Request, exc: Exception) -> Response:
    log.warning("Redis error: %s", exc)
    return error_response("service_unavailable", "Redis is not reachable", {"Retry-After": "5"})


async def _gone(request: Request, _: Exception) -> Response:
    log.info("%s %s: the client went away before its request was read", request.method, request.url.path)
    return Response(status_code=499)  # nginx's "client closed request"; nobody is there to read it


async def _crashed(_: Request, exc: Exception) -> Response:
    log.exception("unhandled gateway error", exc_info=exc)
    # Sent by Starlette's outermost error middleware, past the security headers' middleware: say it here.
    return error_response("internal_error", "internal error; it has been logged",
                          {"X-Content-Type-Options": "nosniff"})


async def _invalid(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    code, message = validation_code(exc)
    errors = list(exc.errors())
    # A malformed job id: the same answer as for one that does not exist (no param).
    param = param_of(tuple(errors[0]["loc"])) if errors and code != "not_found" else None
    return error_response(code, message, param=param)


def http_error_message(request: Request, exc: HTTPException) -> str:
    """The message of an HTTP error: the router's bare 404 and 405 say which path and method, as OpenAI's
    ``Invalid URL (GET /v1/nope)`` does; any other keeps its own detail."""
    path = request.url.path
    where = f"{request.method} {path[:_PATH_CHARS]}{'…' if len(path) > _PATH_CHARS else ''}"
    if exc.status_code == 404 and exc.detail == "Not Found":
        return f"Invalid URL ({where}): there is no such route"
    if exc.status_code == 405 and exc.detail == "Method Not Allowed":
        allowed = (exc.headers or {}).get("Allow", "")
        return f"Method not allowed ({where})" + (f": this path takes {allowed}" if allowed else "")
    return str(exc.detail)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(http_code(exc), http_error_message(request, exc), exc.headers, status=exc.status_code)


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` in the envelope."""
    app.add_exception_handler(TuwenError, _tuwen_error)
    app.add_exception_handler(redis.RedisError, _redis_error)
    app.add_exception_handler(ClientDisconnect, _gone)
    app.add_exception_handler(Exception, _crashed)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
