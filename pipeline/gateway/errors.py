"""The error envelope: every error answer of the gateway is OpenAI's ``{"error": {"message", "type",
"param", "code"}}`` with a stable tuwen ``code`` (``error_body`` builds it, for tuwen's routes and the
OpenAI-compatible ones alike), so any OpenAI client reads any error, a 404 for a made-up path included.
``type`` follows from the status (``TYPES``, OpenAI's names); ``param`` names the request field at fault,
or is null. Clients of tuwen's own routes that read ``code`` and ``message`` read them as before.

``install`` registers the handlers that turn tuwen's errors (``InvalidInput`` → 422, ``Unavailable`` →
503 with ``Retry-After`` …), Redis outages, validation errors and HTTP errors (an unknown path's 404, a
wrong method's 405 with ``Allow``) into that envelope.
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

from tuwen.pipeline.gateway.apikeys import Conflict
from tuwen.pipeline.errors import Forbidden, InvalidInput, NotFound, TuwenError, Unavailable

log = logging.getLogger("tuwen.gateway")

#: Which error code a validation error of each request field gets (missing or wrong).
_FIELD_CODES = {"max_new_tokens": "invalid_params", "priority": "invalid_params", "wait": "invalid_params",
                "callback_url": "invalid_callback_url", "Idempotency-Key": "invalid_idempotency_key",
                "job_id": "not_found"}


#: OpenAI's error ``type`` per status; any other 4xx is an ``invalid_request_error``, any other 5xx a
#: ``server_error`` (``error_type``). The one mapping of the gateway.
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 405: "invalid_request_error", 409: "conflict_error",
         413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
         503: "service_unavailable_error", 504: "timeout_error"}
#: The longest request path an error message quotes.
_PATH_CHARS = 200


def error_type(status: int) -> str:
    """OpenAI's ``error.type`` for an answer with this status."""
    return TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, code: str, message: str, *, param: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """The body of every error answer: ``{"error": {"message", "type", "param", "code", …extra}}``."""
    return {"error": {"message": printable(message), "type": error_type(status), "param": param, "code": code,
                      **extra}}


def printable(text: str) -> str:
    """``text`` with bytes that were not UTF-8 (kept as lone surrogates) shown as ``\\xNN``, so a message
    that quotes user input can always be encoded as JSON."""
    return text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "backslashreplace").decode(
        "utf-8", "backslashreplace")


def _only_escapes(text: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


class ApiError(HTTPException):
    """An HTTP error with a stable code (FastAPI re-raises HTTPExceptions, even from body parsing)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code


def no_such_job(job_id: str) -> ApiError:
    """The one 404 for a job that does not exist and for another owner's: byte for byte the same, so
    the answer never tells whether someone else's job exists."""
    return ApiError(404, "not_found", f"no job {job_id}")


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None, *,
                   param: str | None = None) -> JSONResponse:
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


def status_of(exc: TuwenError) -> int:
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, InvalidInput):
        return 422
    if isinstance(exc, (NotFound, Forbidden)):
        return 404
    return 503 if isinstance(exc, Unavailable) or exc.retryable else 500


def validation_code(exc: RequestValidationError) -> tuple[str, str]:
    """The code and message of a request that failed validation; the first error names the code."""
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "type": ""}
    field = str(first["loc"][-1]) if first["loc"] else ""
    missing = first.get("type") == "missing"
    codes = {**_FIELD_CODES, "question": "empty_question" if missing else "invalid_question",
             "image": "empty_image" if missing else "invalid_image"}
    message = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in errors)
    return codes.get(field, "invalid_request"), message or "invalid request"


# -- handlers ---------------------------------------------------------------------------------------------
async def _tuwen_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, TuwenError)
    status = status_of(exc)
    if status == 500:
        log.error("gateway error %s: %s", exc.code, exc.message)
    retry = {503: {"Retry-After": "5"}, 409: {"Retry-After": "1"}}.get(status)
    return error_response(status, exc.code, exc.message, retry)


async def _redis_error(_: Request, exc: Exception) -> Response:
    log.warning("Redis error: %s", exc)
    return error_response(503, "service_unavailable", "Redis is not reachable", {"Retry-After": "5"})


async def _gone(request: Request, _: Exception) -> Response:
    log.info("%s %s: the client went away before its request was read", request.method, request.url.path)
    return Response(status_code=499)  # nginx's "client closed request"; nobody is there to read it


async def _crashed(_: Request, exc: Exception) -> Response:
    log.exception("unhandled gateway error", exc_info=exc)
    # Sent by Starlette's outermost error middleware, past the security headers' middleware: say it here.
    return error_response(500, "internal_error", "internal error; it has been logged",
                          {"X-Content-Type-Options": "nosniff"})


async def _invalid(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    code, message = validation_code(exc)
    if code == "not_found":  # a malformed job id: the same answer as for one that does not exist
        return error_response(404, code, message)
    errors = list(exc.errors())
    return error_response(422, code, message, param=param_of(tuple(errors[0]["loc"])) if errors else None)


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
    code = getattr(exc, "code", None) or {400: "invalid_request", 404: "not_found", 405: "method_not_allowed",
                                          413: "request_too_large"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, http_error_message(request, exc), exc.headers)


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` in the envelope."""
    app.add_exception_handler(TuwenError, _tuwen_error)
    app.add_exception_handler(redis.RedisError, _redis_error)
    app.add_exception_handler(ClientDisconnect, _gone)
    app.add_exception_handler(Exception, _crashed)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
