"""A chat request's pictures, from their ``image_url``: ``data:`` URLs (base64), ``tuwen://images/<sha256>``
(a picture this owner stored before) and http(s) URLs at public addresses (``tuwen.pipeline.gateway.remote``).

The bytes are validated and stored by ``prepare_conversation`` like any upload; this module only gets
them, with a code and the request field for every way a URL can be wrong.
"""

from __future__ import annotations

import base64
import binascii
import re

from tuwen.pipeline.conversation import StoredImage
from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.inputs import picture_too_large
from tuwen.pipeline.gateway.openai_errors import openai_error
from tuwen.pipeline.gateway.remote import RemotePictures

#: ``tuwen://`` + a stored picture's key: ``images/`` + the sha256 of its bytes, in hex.
TUWEN_SCHEME = "tuwen://"
_STORED = re.compile(r"images/[0-9a-f]{64}")
_FORMS = "a data: URL (base64), tuwen://images/<sha256> or an http(s) URL"


def stored_url(key: str) -> str:
    """The ``image_url`` that names a stored picture (``images/<sha256>``) in a later request."""
    return TUWEN_SCHEME + key


def picture(url: str, param: str, *, max_bytes: int, remote: RemotePictures) -> bytes | StoredImage:
    """The picture ``url`` names; ``OpenAIError`` (400, with ``param``) when it cannot be had."""
    try:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return from_data_url(url, max_bytes)
        if url.startswith(TUWEN_SCHEME):
            key = url[len(TUWEN_SCHEME):]
            if not _STORED.fullmatch(key):
                raise InvalidInput("a tuwen:// picture URL is tuwen://images/<sha256 of the picture, in hex>",
                                   code="invalid_image_url")
            return StoredImage(key)
        if scheme in ("http", "https"):
            return remote.fetch(url)
        raise InvalidInput(f"image_url must be {_FORMS}", code="invalid_image_url")
    except InvalidInput as exc:
        raise openai_error(exc.code, exc.message, param=param) from exc


def from_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of ``data:[<type>];base64,<data>`` (the type is not trusted: the bytes are sniffed)."""
    head, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise InvalidInput("a data: URL is data:<type>;base64,<data>", code="invalid_image_url")
    if "base64" not in (p.strip().lower() for p in head.split(";")[1:]):
        raise InvalidInput("only base64 data: URLs are accepted (data:image/png;base64,…)",
                           code="invalid_image_url")
    if len(payload) > 4 * -(-max_bytes // 3) + 4:
        raise picture_too_large(max_bytes)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("the data: URL is not valid base64", code="invalid_image_url") from None
