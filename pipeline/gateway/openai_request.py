"""The chat request tuwen accepts (``POST /v1/chat/completions``), checked the way OpenAI answers it.

``parse_chat`` turns the JSON body into a ``ChatRequest``: the conversation (text, and pictures by URL,
fetched later), ``GenerationParams`` and the streaming options. Parameters follow vLLM's rule:

* what tuwen implements is honoured (sampling, penalties, ``top_k``, ``min_p``, ``repetition_penalty``,
  stop strings, seeds, streaming, ``response_format``, ``logit_bias``, ``n``, ``logprobs``, ``top_logprobs``);
* a parameter whose effect a client relies on and tuwen cannot give is refused with a 400 whose
  ``param`` names it (``unsupported_parameter``: ``tool_choice: "auto"``, audio out), unless it has its neutral value;
* anything else is ignored, and its name goes back in the ``tuwen-ignored-params`` header
  (``ChatRequest.ignored``) and, once per key and name, to the gateway's log.

The limits are ``schema``'s (through ``GenerationParams``) and OpenAI's own for ``metadata``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuwen.pipeline.gateway.openai_errors import openai_error, param_of
from tuwen.pipeline.gateway import tool_calls
from tuwen.pipeline.gateway.parts import (ChatTurn as ChatTurn, FileRef, PagePicture, Part as Part,
                                         PictureRef as PictureRef, audio_part, chat_file)
from tuwen.pipeline.gateway.openai_params import NO_TOOLS, REFUSED, REFUSED_IN_MESSAGES, ROLES, SAMPLING, neutral
from tuwen.pipeline.inputs import MAX_NESTING
from tuwen.pipeline.schema import MAX_MESSAGES, MAX_NEW_TOKENS, GenerationParams, Role
from tuwen.pipeline.structured import schema_error

#: OpenAI's limits on ``metadata``: 16 pairs, keys up to 64 characters, values up to 512.
MAX_METADATA = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
EXAMPLE_PICTURE = "data:image/png;base64,iVBORw0KGgo…"


# -- the documented shapes (``/openapi.json``); messages are checked part by part in ``parse_messages`` -----
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    #: Send one more chunk before ``[DONE]``, with ``usage`` and no choices.
    include_usage: bool | None = None


class ChatParams(BaseModel):
    """Every parameter of a chat request but ``messages``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: str = Field(min_length=1, max_length=256, examples=["tuwen"],
                       description="a model id of GET /v1/models, or `tuwen` (the served model)")
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, description="0 (the default here) is greedy")
    top_p: float | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    #: vLLM's sampling extensions, honoured per row.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)
    metadata: dict[Annotated[str, Field(max_length=MAX_METADATA_KEY)],
                   Annotated[str, Field(max_length=MAX_METADATA_VALUE)]] | None = Field(None, max_length=MAX_METADATA)
    #: tuwen's extension: ``oldest_turns`` drops the oldest turns of a conversation too long for the
    #: model (never the system prompt, nor the last user turn and its pictures); ``none`` refuses it.
    truncation: Literal["none", "oldest_turns"] | None = None
    #: ``{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`` (``pipeline.structured``).
    response_format: dict[str, Any] | None = None
    #: Token id (as a string) -> bias from -100 to 100.
    logit_bias: dict[str, float] | None = None
    #: Choices, up to ``schema.MAX_CHOICES``; each token's log probability, and up to 20 alternatives.
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None  #: with tool_choice "required" or a named function: one call
    tool_choice: str | dict[str, Any] | None = None  #: "none" is plain text; "auto" is refused (``tool_calls``)


class TextContent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    url: str = Field(min_length=1, examples=[EXAMPLE_PICTURE],
                     description="data:image/…;base64,…, tuwen://images/<sha256>, or http(s) on an allowed host")
    #: Accepted for compatibility; the picture is used at the model's own resolution whatever it says.
    detail: Literal["auto", "low", "high"] | None = None


class ImageContent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    type: Literal["image_url"]
    image_url: ImageUrl


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContent | ImageContent] | None = None
    #: Accepted, not given to the model.
    name: str | None = None


class ChatCompletionRequest(ChatParams):
    """The body of ``POST /v1/chat/completions`` (documentation; ``parse_chat`` checks it)."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES, examples=[[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": EXAMPLE_PICTURE}},
                                     {"type": "text", "text": "图中有几个圆形？"}]}]])


# -- the parsed request ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatRequest:
    model: str
    turns: tuple[ChatTurn, ...]
    params: GenerationParams
    stream: bool
    include_usage: bool
    user: str | None
    metadata: dict[str, str] | None
    #: The request's content, canonical: the same request sent again has the same one (Idempotency-Key).
    fingerprint: str
    #: Parameters tuwen ignored (``messages[0].content[1].cache_control`` for those inside the conversation).
    ignored: tuple[str, ...] = ()
    auto_tools: bool = False  #: tools with tool_choice "auto": refused once the served model is known (tool_calls)

    @property
    def pictures(self) -> int:
        """How many pictures the conversation carries (a PDF's pages once it is read)."""
        return sum(isinstance(p, (PictureRef, PagePicture)) for t in self.turns for p in t.parts)


def json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object, or a 400 ``invalid_request``. (The intake refuses JSON
    nested too deep before any route reads it; a body that claimed to be a form was not checked, so its
    RecursionError is the same 400 ``invalid_json`` here, not a 500.)"""
    try:
        data = json.loads(body)
    except RecursionError:
        raise openai_error("invalid_json", f"the JSON body is nested deeper than {MAX_NESTING} levels") from None
    except (ValueError, UnicodeDecodeError):
        raise openai_error("invalid_request", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise openai_error("invalid_request", "the body must be a JSON object")
    return data


def parse_chat(body: bytes) -> ChatRequest:
    """The request, or an ``OpenAIError`` (400) that names the parameter at fault."""
    data = json_object(body)
    ignored: list[str] = []
    for name, value in data.items():
        if name in REFUSED and not neutral(value, REFUSED[name][0]):
            raise openai_error("unsupported_parameter", f"{name}: {REFUSED[name][1]}", param=name)
        if name not in REFUSED and name not in ChatCompletionRequest.model_fields:
            ignored.append(printable_name(name))
    if "messages" not in data:
        raise openai_error("invalid_messages", "messages is required", param="messages")
    try:
        params = ChatParams.model_validate({k: v for k, v in data.items() if k in ChatParams.model_fields})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise openai_error("invalid_params", _message(first), param=param_of(tuple(first["loc"]))) from None
    if params.stream_options is not None and not params.stream:
        raise openai_error("invalid_params", "stream_options is only allowed with stream: true",
                           param="stream_options")
    turns = parse_messages(data["messages"], ignored)
    return ChatRequest(
        model=params.model, turns=turns, params=generation(params), auto_tools=tool_calls.auto(params),
        stream=bool(params.stream), include_usage=bool(params.stream_options and params.stream_options.include_usage),
        user=params.user or params.safety_identifier, metadata=params.metadata,
        fingerprint=hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest(), ignored=tuple(ignored))


def printable_name(name: str) -> str:
    return name if len(name) <= 64 else name[:64] + "…"


def _message(error: Any) -> str:
    where = param_of(tuple(error["loc"]))
    return f"{where}: {error['msg']}" if where else str(error["msg"])


def generation(params: ChatParams) -> GenerationParams:
    """The job's ``GenerationParams``; their limits (``schema``) name the chat parameter when broken."""
    tokens = {"max_tokens": params.max_tokens, "max_completion_tokens": params.max_completion_tokens}
    given = {k: v for k, v in tokens.items() if v is not None}
    if len(set(given.values())) > 1:
        raise openai_error("invalid_params", "give max_tokens or max_completion_tokens, not both",
                           param="max_completion_tokens")
    stop = (params.stop,) if isinstance(params.stop, str) else tuple(params.stop or ())
    values = {"max_new_tokens": next(iter(given.values()), None), "stop": stop or None,
              **{name: getattr(params, name) for name in SAMPLING}, "response_format": params.response_format,
              "tool_call": tool_calls.forced(params.tools, params.tool_choice)}
    try:
        return GenerationParams.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        name = next(iter(given), "max_tokens") if field == "max_new_tokens" else field
        code = "invalid_schema" if schema_error(exc.errors()) else "invalid_params"
        raise openai_error(code, f"{name}: {first['msg']}", param=name or None) from None


def parse_messages(raw: Any, ignored: list[str] | None = None) -> tuple[ChatTurn, ...]:
    """The conversation's turns; pictures stay URLs (fetched and stored once the whole request is read).
    Fields tuwen does not use are added to ``ignored``."""
    if not isinstance(raw, list) or not raw:
        raise openai_error("invalid_messages", "messages must be a non-empty list", param="messages")
    if len(raw) > MAX_MESSAGES:
        raise openai_error("invalid_messages", f"{len(raw)} messages; the limit is {MAX_MESSAGES}",
                           param="messages")
    skipped = ignored if ignored is not None else []
    return tool_calls.merged(raw, [tool_calls.turn(m, f"messages[{i}]", skipped, _turn) for i, m in enumerate(raw)])


def _turn(message: Any, where: str, ignored: list[str]) -> ChatTurn:
    if not isinstance(message, dict):
        raise openai_error("invalid_messages", f"{where} must be an object", param=where)
    role = message.get("role")
    if role == "function":
        raise openai_error("unsupported_parameter", f"{where}.role: {NO_TOOLS}", param=f"{where}.role")
    if not isinstance(role, str) or role not in ROLES:
        raise openai_error("invalid_messages", f"{where}.role must be one of {', '.join(ROLES)}",
                           param=f"{where}.role")
    for key in message:
        if key in REFUSED_IN_MESSAGES and message[key] not in (None, []):
            raise openai_error("unsupported_parameter", f"{where}.{key}: {REFUSED_IN_MESSAGES[key]}",
                               param=f"{where}.{key}")
        if key not in ("role", "content", "name") and key not in REFUSED_IN_MESSAGES:
            ignored.append(f"{where}.{printable_name(key)}")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return ChatTurn(ROLES[role], (content,) if content else ())
    if not isinstance(content, list):
        raise openai_error("invalid_messages", f"{where}.content must be a string, a list of parts or null",
                           param=f"{where}.content")
    return chat_turn(ROLES[role], tuple(_part(p, f"{where}.content[{j}]", ignored) for j, p in enumerate(content)),
                     where)


def chat_turn(role: Role, parts: tuple[Part, ...], where: str) -> ChatTurn:
    """A turn of the conversation (chat messages and Responses input items alike): only user turns may carry
    pictures (or PDFs)."""
    if role != Role.user and any(isinstance(p, (PictureRef, FileRef)) for p in parts):
        raise openai_error("invalid_messages", f"{where}: only user messages may carry pictures",
                           param=f"{where}.content")
    return ChatTurn(role, parts)


def _part(part: Any, where: str, ignored: list[str]) -> Part:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "file":
        return chat_file(part, where, ignored)
    if isinstance(part, dict):
        known = {"type", "text"} if kind == "text" else {"type", kind}
        ignored += [f"{where}.{printable_name(k)}" for k in sorted(set(part) - known)]  # cache_control …
    if kind == "text":
        # By hand, not by the model: text that is not valid Unicode (lone surrogates from JSON's \u escapes)
        # must reach the question check and get its code there, ``invalid_question``.
        if not isinstance(part.get("text"), str):
            raise openai_error("invalid_messages", f"{where}.text must be a string", param=f"{where}.text")
        return str(part["text"])
    if kind == "input_audio":
        return audio_part(part, where)
    if kind != "image_url":
        if kind == "refusal":
            raise openai_error("unsupported_parameter", f"{where}: {kind} parts are not supported; "
                               "send text, image_url, file and input_audio parts", param=f"{where}.type")
        raise openai_error("invalid_messages", f"{where} must be a part of type text, image_url, file or input_audio",
                           param=f"{where}.type" if isinstance(part, dict) else where)
    try:
        parsed = ImageContent.model_validate({k: v for k, v in part.items() if k in ("type", "image_url")})
    except ValidationError as exc:
        first = exc.errors()[0]
        param = where + "." + (param_of(tuple(first["loc"])) or "")
        raise openai_error("invalid_messages", f"{param.rstrip('.')}: {first['msg']}",
                           param=param.rstrip(".")) from None
    return PictureRef(parsed.image_url.url, f"{where}.image_url.url")
