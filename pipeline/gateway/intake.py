"""How request bodies come in: a size limit while they stream, a nesting limit on JSON, strict UTF-8
form fields, and the parsing of the ``POST /v1/jobs`` upload (``read_submission``)."""

from __future__ import annotations

import codecs
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuwen.pipeline.envelope import printable
from tuwen.pipeline.errors import InvalidImage, InvalidInput
from tuwen.pipeline.inputs import MAX_NESTING, too_deep
from tuwen.pipeline.gateway.errors import ApiError, error_response
from tuwen.pipeline.gateway.models import FORM_FIELDS, SubmitForm

STRICT_UTF8 = "tuwen_utf8_strict"
#: Bodies read as form data; any other body may be read as JSON (FastAPI reads one without a content type
#: as JSON too), so its nesting is checked.
FORM_TYPES = (b"multipart/form-data", b"application/x-www-form-urlencoded")


def _strict_utf8(name: str) -> codecs.CodecInfo | None:
    """A UTF-8 codec that keeps invalid bytes as lone surrogates (Starlette would silently fall back to
    Latin-1), so ``check_question`` refuses them as ``invalid_question`` instead of reading mojibake."""
    if name != STRICT_UTF8:
        return None

    def decode(data: Any, errors: str = "strict") -> tuple[str, int]:
        return codecs.utf_8_decode(data, "surrogateescape", True)

    return codecs.CodecInfo(codecs.utf_8_encode, decode, name=name)


def register_strict_utf8() -> None:
    try:
        codecs.lookup(STRICT_UTF8)
    except LookupError:
        codecs.register(_strict_utf8)


def check_nesting(chunks: list[bytes]) -> None:
    """400 ``invalid_json`` for a body nested deeper than ``MAX_NESTING`` (``json.loads`` recurses: 1,200
    ``[`` were a RecursionError, a 500). Bodies with fewer brackets than that are not even joined."""
    if sum(c.count(b"[") + c.count(b"{") for c in chunks) <= MAX_NESTING:
        return
    if too_deep(b"".join(chunks).decode("utf-8", "replace")):
        raise ApiError("invalid_json", f"the JSON body is nested deeper than {MAX_NESTING} levels")


class Intake:
    """Refuse bodies over ``limit`` bytes (413) as they stream in: a declared Content-Length before
    reading anything, a chunked body as soon as the count passes the limit; nothing unbounded is read.
    A body that is not a form is checked, once whole, for JSON nested too deep (``check_nesting``),
    before any route parses it: every JSON route is covered, in its own error shape (the error is raised
    where the route reads the body). Multipart text fields are decoded as strict UTF-8 (see
    ``_strict_utf8``). A response sent before the body was read (401, 413, 429 …) closes the connection,
    so the rest is not read for nothing."""

    def __init__(self, app: ASGIApp, limit: int, refusal: str = "") -> None:
        self.app, self.limit = app, limit
        #: The 413's message: what the limit means for the caller (a picture's size, on the picture routes).
        self.refusal = refusal or f"the request body exceeds {limit} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            response = error_response("request_too_large", self.refusal, {"Connection": "close"})
            return await response(scope, receive, send)
        kind = headers.get(b"content-type", b"")
        if kind.lower().startswith(b"multipart/form-data") and b"charset" not in kind.lower():
            # In place: the router records the matched route in this same scope (metrics read it).
            scope["headers"] = [(k, v + b"; charset=" + STRICT_UTF8.encode() if k == b"content-type" else v)
                                for k, v in scope["headers"]]
        unread = (declared.isdigit() and int(declared) > 0) or b"transfer-encoding" in headers
        seen = 0
        maybe_json = not kind.lower().startswith(FORM_TYPES)
        chunks: list[bytes] = []  # the same bytes objects the route keeps: no copy

        async def counted() -> Message:
            nonlocal seen, unread
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError("request_too_large", self.refusal)
            more = message.get("more_body", False)
            unread = unread and message["type"] == "http.request" and more
            if maybe_json and message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not more:
                    check_nesting(chunks)
            return message

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start" and unread:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, counted, closing)


async def read_submission(request: Request) -> tuple[bytes, bytes | None, SubmitForm]:
    """The picture and the text fields of a ``POST /v1/jobs`` body. Unknown fields, a field sent twice
    (two pictures …) and a picture sent as text are refused; an empty text field counts as absent."""
    form = await request.form(max_files=4, max_fields=16)
    try:
        names = [name for name, _ in form.multi_items()]
        unknown = sorted(set(names) - FORM_FIELDS)
        if unknown:
            raise InvalidInput(f"unknown field(s): {', '.join(map(printable, unknown))}", code="invalid_params")
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise InvalidInput(f"field(s) sent more than once: {', '.join(twice)}", code="invalid_params")
        image = form.get("image")
        if image is None:
            raise InvalidImage("the image is missing: send it as the multipart file part `image`",
                               code="empty_image")
        if not isinstance(image, UploadFile):
            raise InvalidImage("the image must be a file part (with a filename), not a text field",
                               code="invalid_image")
        data = await image.read()
        audio = form.get("audio")
        if audio is not None and not isinstance(audio, UploadFile):
            raise InvalidInput("the audio must be a file part (with a filename), not a text field",
                               code="invalid_audio")
        spoken = await audio.read() if audio is not None else None
        text = {k: v for k, v in form.items() if k not in ("image", "audio") and (v != "" or k == "question")}
    finally:
        await form.close()
    try:
        return data, spoken, SubmitForm.model_validate(text)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
