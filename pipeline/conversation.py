"""Turning a caller's conversation (text, and pictures as bytes or as keys they stored) into a job.

The one way to prepare a conversation job: the gateway's chat completions, the Batch API lines and the
Python clients all come through ``prepare_conversation``. Every picture is validated and stored like a
single upload; a key names a picture only if this owner stored it (the same refusal as a missing one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from tuwen.pipeline.client import CheckedAudio, CheckedImage, Client, ImageInput, check_budget, first_error
from tuwen.pipeline.client import StoredImage as StoredImage  # the callers' name for a stored picture
from tuwen.pipeline.errors import InvalidInput, InvalidParams, InvalidQuestion
from tuwen.pipeline.inputs import check_question
from tuwen.pipeline.schema import MAX_MESSAGES, GenerationParams, JobRequest, Priority, Role


@dataclass(frozen=True)
class Spoken:
    """A spoken part of a user turn: audio bytes (WAV, FLAC, Ogg, MP3), transcribed by the speech stage."""

    data: bytes


@dataclass
class Turn:
    """One message: a role and its parts, each text (``str``), a picture (bytes, path, file, or a
    ``StoredImage``) or ``Spoken`` audio."""

    role: str
    parts: list[str | StoredImage | Spoken | ImageInput] = field(default_factory=list)


def prepare_conversation(client: Client, turns: Sequence[Turn], params: GenerationParams | dict[str, Any], *,
                         owner: str = "default", priority: Priority | str = Priority.interactive,
                         job_id: str | None = None, stream: bool = False, bulk_id: str | None = None) -> JobRequest:
    """Validate the conversation and store its pictures; returns the request, not yet queued.

    Raises ``InvalidInput`` subclasses with a code: ``invalid_messages`` (shape), ``empty_question`` (the
    last user turn has no text), ``conversation_too_long``, ``too_many_images``, ``image_not_found`` (a
    key this owner did not store), and every code a single picture can get.
    """
    settings = client.settings
    try:
        generation = params if isinstance(params, GenerationParams) else GenerationParams.model_validate(params)
        priority = Priority(priority)
    except (ValidationError, ValueError) as exc:
        raise InvalidParams(f"invalid generation parameters: {first_error(exc)}", code="invalid_params") from exc
    _check_shape(turns)
    pictures = sum(1 for t in turns for p in t.parts if not isinstance(p, (str, Spoken)))
    if pictures > settings.max_images_per_job:
        raise InvalidInput(f"{pictures} pictures in one conversation; the limit is {settings.max_images_per_job}",
                           code="too_many_images")
    total = sum(len(p) for t in turns for p in t.parts if isinstance(p, str))
    if total > settings.max_conversation_chars:
        raise InvalidInput(f"the conversation has {total} characters of text; the limit is "
                           f"{settings.max_conversation_chars}", code="conversation_too_long")
    check_budget(generation, settings)
    last_user = max((i for i, t in enumerate(turns) if t.role == Role.user.value), default=-1)
    # Everything is checked before anything is stored: a refused request leaves no picture behind.
    checked: list[list[str | StoredImage | CheckedImage]] = []
    for i, turn in enumerate(turns):
        parts: list[str | StoredImage | CheckedImage] = []
        for part in turn.parts:
            if isinstance(part, str):
                text = _text(part, last=i == last_user, max_chars=settings.max_conversation_chars)
                if text:
                    parts.append(text)
            elif isinstance(part, Spoken):
                parts.append(client.check_audio(part.data))
            elif isinstance(part, StoredImage):
                if not client.owns_image(part.key, owner):
                    raise InvalidInput(f"no such picture: {part.key}", code="image_not_found")
                parts.append(part)
            else:
                parts.append(client.check_image(part))
        checked.append(parts)
    if not any(checked):
        raise InvalidQuestion("the conversation has no text and no picture", code="empty_question")
    messages = [{"role": turn.role, "content": [
        {"type": "text", "text": p} if isinstance(p, str) else
        {"type": "audio", "key": client.put_audio(p, owner)} if isinstance(p, CheckedAudio) else
        {"type": "image", "key": p.key if isinstance(p, StoredImage) else client.put_image(p, owner)}
        for p in parts]} for turn, parts in zip(turns, checked)]
    fields: dict[str, Any] = {"messages": messages, "params": generation, "priority": priority, "owner": owner,
                              "stream": stream, "bulk_id": bulk_id}
    if job_id:
        fields["id"] = job_id
    return JobRequest(**fields)


def _check_shape(turns: Sequence[Turn]) -> None:
    if not turns:
        raise InvalidInput("the conversation has no messages", code="invalid_messages")
    if len(turns) > MAX_MESSAGES:
        raise InvalidInput(f"{len(turns)} messages; the limit is {MAX_MESSAGES}", code="invalid_messages")
    roles = {r.value for r in Role}
    for i, turn in enumerate(turns):
        if turn.role not in roles:
            raise InvalidInput(f"message {i} has role {turn.role!r}; expected system, user or assistant",
                               code="invalid_messages")
        if turn.role != Role.user.value and any(not isinstance(p, str) for p in turn.parts):
            raise InvalidInput(f"message {i} ({turn.role}) carries a picture; only user messages may",
                               code="invalid_messages")


def _text(part: str, *, last: bool, max_chars: int) -> str:
    """A text part checked for valid text; empty text is no part. The length is bounded by the conversation's
    total (a sanity cap: the model's context, in tokens, decides at the worker)."""
    try:
        return check_question(part, max_chars=max_chars if last else max(len(part), 1))
    except InvalidQuestion as exc:
        if exc.code == "empty_question":
            return ""
        raise
