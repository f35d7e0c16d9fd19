"""The parts of a chat or Responses turn as parsed: text, pictures by URL (fetched later), and ``input_audio``
parts, a spoken question as base64 with its format (``wav``, ``mp3``, ``flac``, ``ogg``), checked like any
spoken question when the job is prepared."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from tuwen.pipeline.conversation import Spoken as Spoken  # the turn's audio part, for the request parsers
from tuwen.pipeline.gateway.openai_errors import openai_error
from tuwen.pipeline.schema import Role

@dataclass(frozen=True)
class PictureRef:
    """A picture of the conversation by URL, and where it sits in the request (for errors)."""

    url: str
    param: str


@dataclass(frozen=True)
class ChatTurn:
    role: Role
    parts: tuple[str | PictureRef | Spoken, ...]


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
