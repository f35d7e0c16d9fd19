"""What a turn of a parsed chat or Responses request holds besides text: a picture by URL (``PictureRef``),
a PDF (``FileRef``: OpenAI's ``file`` / ``input_file`` parts, its bytes inline or an uploaded file's id),
once a PDF is read (``pdf_pages``) its pages as pictures (``PagePicture``), and ``input_audio`` parts, a
spoken question as base64 with its format (``wav``, ``mp3``, ``flac``, ``ogg``; ``Spoken``), checked like
any spoken question when the job is prepared. Parsing only: nothing is fetched here.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from tuwen.pipeline.conversation import Spoken as Spoken  # the turn's audio part, for the request parsers
from tuwen.pipeline.gateway.openai_errors import openai_error
from tuwen.pipeline.schema import Role

#: The longest ``filename`` kept (the name only labels the PDF's pages; tuwen reads the bytes).
MAX_FILENAME = 255


@dataclass(frozen=True)
class PictureRef:
    """A picture of the conversation by URL, and where it sits in the request (for errors)."""

    url: str
    param: str


@dataclass(frozen=True)
class FileRef:
    """A PDF of the conversation: a ``data:application/pdf;base64,…`` URL or the id of a file uploaded with
    purpose ``user_data``, and where it sits in the request (for errors)."""

    param: str
    #: Where ``file_data`` and ``file_id`` sit: ``param`` + ``.file`` in chat, ``param`` in Responses.
    fields: str
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


@dataclass(frozen=True)
class PagePicture:
    """A page of a PDF of the conversation, rendered (PNG bytes); ``param`` names the file part and the page."""

    png: bytes
    param: str


#: A turn's part: text, a picture by URL, a PDF, a PDF's page once read, or a spoken question.
Part = str | PictureRef | FileRef | PagePicture | Spoken


@dataclass(frozen=True)
class ChatTurn:
    role: Role
    parts: tuple[Part, ...]


def _name(where: str, key: object) -> str:
    """An ignored field's name as the ``tuwen-ignored-params`` header can carry it (printable ASCII)."""
    text = f"{where}.{str(key)[:64]}".encode("ascii", "backslashreplace").decode()
    return "".join(c if c.isprintable() and c != "," else "?" for c in text)


def _string(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise openai_error("invalid_messages", f"{where} must be a non-empty string", param=where)
    return value


def file_ref(fields: dict[str, Any], where: str, prefix: str) -> FileRef:
    """The PDF that ``file_data`` or ``file_id`` (exactly one) of ``fields`` names; ``prefix`` is where those
    fields sit (``messages[0].content[1].file`` for chat, the part itself for Responses)."""
    data = _string(fields.get("file_data"), f"{prefix}.file_data")
    file_id = _string(fields.get("file_id"), f"{prefix}.file_id")
    name = _string(fields.get("filename"), f"{prefix}.filename")
    if (data is None) == (file_id is None):
        raise openai_error("invalid_messages", f"{prefix}: give file_data (data:application/pdf;base64,…) or "
                           "file_id (a file uploaded with purpose user_data), one of them", param=prefix)
    return FileRef(where, prefix, data, file_id, name[:MAX_FILENAME] if name else None)


def chat_file(part: dict[str, Any], where: str, ignored: list[str]) -> FileRef:
    """A chat ``{"type": "file", "file": {"file_data" | "file_id", "filename"}}`` part."""
    fields = part.get("file")
    if not isinstance(fields, dict):
        raise openai_error("invalid_messages", f"{where}.file must be an object with file_data or file_id",
                           param=f"{where}.file")
    ignored += [_name(where, k) for k in part if k not in ("type", "file")]
    ignored += [_name(f"{where}.file", k) for k in fields if k not in ("file_data", "file_id", "filename")]
    return file_ref(fields, where, f"{where}.file")


def input_file(part: dict[str, Any], where: str, ignored: list[str]) -> FileRef:
    """A Responses ``{"type": "input_file", "file_data" | "file_id", "filename"}`` part (``file_url`` is
    refused: tuwen fetches pictures by URL, not files)."""
    if part.get("file_url") is not None:
        raise openai_error("unsupported_parameter", f"{where}.file_url: send the PDF as file_data or file_id",
                           param=f"{where}.file_url")
    ignored += [_name(where, k) for k in part if k not in ("type", "file_data", "file_id", "filename", "file_url")]
    return file_ref(part, where, where)


#: The formats an ``input_audio`` part may name (OpenAI's ``wav`` and ``mp3``, and what libsndfile adds).
FORMATS = ("wav", "mp3", "flac", "ogg")


def audio_part(part: dict[str, Any], where: str) -> Spoken:
    """The audio of an ``input_audio`` part, or an OpenAI-shaped error naming the field at fault."""
    body = part.get("input_audio")
    if not isinstance(body, dict):
        raise openai_error("invalid_messages", f"{where}.input_audio must be an object with data and format",
                           param=f"{where}.input_audio")
    if body.get("format") not in FORMATS:
        raise openai_error("unsupported_audio_format", f"{where}.input_audio.format must be one of "
                           f"{', '.join(FORMATS)}", param=f"{where}.input_audio.format")
    data = body.get("data")
    if not isinstance(data, str):
        raise openai_error("invalid_messages", f"{where}.input_audio.data must be base64 text",
                           param=f"{where}.input_audio.data")
    try:
        return Spoken(base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError):
        raise openai_error("invalid_audio", f"{where}.input_audio.data is not valid base64",
                           param=f"{where}.input_audio.data") from None
