"""The error envelope: every error answer over HTTP is OpenAI's ``{"error": {"message", "type", "param",
"code"}}`` with a stable tuwen ``code``, whether the gateway answers it (tuwen's routes and the OpenAI-compatible
ones) or a batch's error file holds it. ``type`` follows from the status (``TYPES``, OpenAI's names), the
status from the code (``errors.http_status``); ``param`` names the request field at fault, or is null.
"""

from __future__ import annotations

from typing import Any

#: OpenAI's error ``type`` per status; any other 4xx is an ``invalid_request_error``, any other 5xx a
#: ``server_error`` (``error_type``). The one mapping.
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 405: "invalid_request_error", 409: "conflict_error",
         413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
         503: "service_unavailable_error", 504: "timeout_error"}


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
