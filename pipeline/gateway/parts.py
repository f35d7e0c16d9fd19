"""What a turn of a parsed chat or Responses request holds besides text: a picture by URL (``PictureRef``),
a PDF (``FileRef``: OpenAI's ``file`` / ``input_file`` parts, its bytes inline or an uploaded file's id) and,
once a PDF is read (``pdf_pages``), its pages as pictures (``PagePicture``). Parsing only: nothing is
fetched here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuwen.pipeline.gateway.openai_errors import openai_error

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
