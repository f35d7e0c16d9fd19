"""The Responses request tuwen accepts (``POST /v1/responses``), checked the way OpenAI answers it.

``parse_responses`` turns the JSON body into a ``ResponsesRequest``: ``instructions``, the ``input`` (a
string, or items of ``input_text`` / ``output_text``, ``input_image``, ``input_file``, ``input_audio`` parts,
still URLs), ``GenerationParams`` and the options (``stream``, ``store``, ``previous_response_id``). As in chat:

* what tuwen implements is honoured (``max_output_tokens``, ``temperature``, ``top_p``, ``truncation``, text.format);
* a parameter whose effect a client relies on and tuwen cannot give is refused with a 400
  ``unsupported_parameter`` whose ``param`` names it (tools, ``n`` > 1, ``reasoning``, ``background``,
  …), unless it has its neutral value;
* anything else is ignored, its name listed in ``ResponsesRequest.ignored`` (``tuwen-ignored-params``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuwen.pipeline.gateway.openai_errors import openai_error, param_of
from tuwen.pipeline.gateway.openai_request import (EXAMPLE_PICTURE, MAX_METADATA, MAX_METADATA_KEY, MAX_METADATA_VALUE,
                                                    ChatRequest, chat_turn, json_object, printable_name)
from tuwen.pipeline.gateway.parts import ChatTurn, Part, PictureRef, audio_part, input_file
from tuwen.pipeline.gateway.openai_params import ROLES
from tuwen.pipeline.schema import MAX_MESSAGES, MAX_NEW_TOKENS, GenerationParams, Role, Truncation
from tuwen.pipeline.structured import schema_error

#: OpenAI's ``truncation`` → tuwen's: ``auto`` drops the oldest turns of a conversation too long for the model.
TRUNCATION = {"disabled": Truncation.none, "auto": Truncation.oldest_turns}


# -- the documented shapes (``/openapi.json``); the input is checked item by item in ``parse_input`` -------
class ResponsesParams(BaseModel):
    """Every parameter of a Responses request that tuwen uses, but ``input`` and ``text``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: str = Field(min_length=1, max_length=256, examples=["tuwen"],
                       description="a model id of GET /v1/models, or `tuwen` (the served model)")
    instructions: str | None = Field(None, description="a system prompt, put first (not carried over by "
                                                       "previous_response_id)")
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, description="0 (the default here) is greedy")
    top_p: float | None = None
    stream: bool | None = None
    store: bool | None = Field(None, description="keep the response (default true): GET /v1/responses/{id}, "
                                                 "previous_response_id")
    previous_response_id: str | None = Field(None, max_length=80, examples=["resp_5f0c6a1e9b2d4c7a8e3f1b2c3d4e5f60"])
    user: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)
    metadata: dict[Annotated[str, Field(max_length=MAX_METADATA_KEY)],
                   Annotated[str, Field(max_length=MAX_METADATA_VALUE)]] | None = Field(None, max_length=MAX_METADATA)
    truncation: Literal["auto", "disabled"] | None = None


class InputText(BaseModel):
    type: Literal["input_text", "output_text"]
    text: str


class InputImage(BaseModel):
    type: Literal["input_image"]
    image_url: str = Field(min_length=1, examples=[EXAMPLE_PICTURE],
                           description="data:image/…;base64,…, tuwen://images/<sha256>, or http(s) (allowed hosts)")
    detail: Literal["auto", "low", "high", "original"] | None = None


class InputMessage(BaseModel):
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText | InputImage]


class TextFormat(BaseModel):
    """``text``, ``json_object`` or ``json_schema`` with ``name``, ``schema``, ``strict`` (docs/structured.md)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]


class TextConfig(BaseModel):
    format: TextFormat | None = None


class ResponsesCreate(ResponsesParams):
    """The body of ``POST /v1/responses`` (documentation; ``parse_responses`` checks it)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    input: str | list[InputMessage] = Field(examples=[[
        {"role": "user", "content": [{"type": "input_image", "image_url": EXAMPLE_PICTURE},
                                     {"type": "input_text", "text": "图中有几个圆形？"}]}]])
    text: TextConfig | None = None


# -- what tuwen does not do: refused by name, unless given a value that changes nothing -------------------
_NO_TOOLS = "the Responses API takes no tools yet; /v1/chat/completions does (docs/structured.md)"


def _one_of(*values: Any) -> Callable[[Any], bool]:
    return lambda v: any(type(v) is type(a) and v == a for a in values)


def _unset(value: Any) -> bool:
    return value in ({}, []) or isinstance(value, dict) and all(v is None for v in value.values())


#: name → (whether a value changes nothing, why anything else is refused).
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (_one_of([]), _NO_TOOLS), "tool_choice": (_one_of("none", "auto"), _NO_TOOLS),
    "n": (_one_of(1), "tuwen answers with one output: n must be 1"),
    "reasoning": (_unset, "the model does no separate reasoning"),
    "background": (_one_of(False), "background responses are not supported: a request waits for its answer "
                                   "(a timeout names the job to read later)"),
    "include": (_one_of([]), "tuwen adds nothing to the output (no logprobs, no tool results)"),
    "top_logprobs": (_one_of(0), "log probabilities are not returned"),
    "conversation": (_unset, "tuwen has no conversation objects: continue with previous_response_id"),
    "prompt": (_unset, "reusable prompts are not supported: send instructions and input"),
}
#: Parameters taken and given no effect, with nothing to report (they change nothing without tools).
TOLERATED = frozenset({"parallel_tool_calls", "max_tool_calls", "stream_options"})
#: Message item fields that belong to items the SDK hands back (``resp.output``): taken, not used.
ITEM_FIELDS = frozenset({"type", "role", "content", "id", "status", "phase"})
#: Part types whose effect a client relies on and tuwen cannot give.
REFUSED_PARTS = {"refusal": "refusal parts are not supported"}


# -- the parsed request ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResponsesRequest:
    model: str
    instructions: str | None
    #: The input's turns (``developer`` is ``system``), pictures still URLs.
    turns: tuple[ChatTurn, ...]
    params: GenerationParams
    stream: bool
    store: bool
    previous_response_id: str | None
    max_output_tokens: int | None
    truncation: Literal["auto", "disabled"]
    user: str | None
    metadata: dict[str, str] | None
    #: The request's content, canonical: the same request sent again has the same one (Idempotency-Key).
    fingerprint: str
    #: Parameters tuwen ignored (``input[0].content[1].cache_control`` for those inside the input).
    ignored: tuple[str, ...] = ()

    def as_chat(self, history: tuple[ChatTurn, ...] = ()) -> ChatRequest:
        """The job to queue: ``history`` (a continued response's turns and answer), then the input."""
        return ChatRequest(model=self.model, turns=job_turns(self.instructions, history + self.turns),
                           params=self.params, stream=self.stream, include_usage=False, user=self.user,
                           metadata=self.metadata, fingerprint=self.fingerprint)


def job_turns(instructions: str | None, turns: tuple[ChatTurn, ...]) -> tuple[ChatTurn, ...]:
    """The conversation the model sees: ``instructions`` and every system or developer message, in order, as
    one system prompt first (OpenAI takes developer messages anywhere; a chat template takes one, first),
    then the other turns in order."""
    system = [instructions or ""] + [p for t in turns if t.role == Role.system for p in t.parts if isinstance(p, str)]
    prompt = "\n\n".join(s for s in system if s.strip())
    return ((ChatTurn(Role.system, (prompt,)),) if prompt else ()) + tuple(t for t in turns if t.role != Role.system)


def parse_responses(body: bytes) -> ResponsesRequest:
    """The request, or an ``OpenAIError`` (400) that names the parameter at fault."""
    data = json_object(body)
    ignored: list[str] = []
    for name, value in data.items():
        if name in REFUSED and value is not None and not REFUSED[name][0](value):
            raise openai_error("unsupported_parameter", f"{name}: {REFUSED[name][1]}", param=name)
        if name not in REFUSED and name not in TOLERATED and name not in ResponsesCreate.model_fields:
            ignored.append(header_name(name))
    if "input" not in data:
        raise openai_error("invalid_messages", "input is required", param="input")
    try:
        params = ResponsesParams.model_validate({k: v for k, v in data.items() if k in ResponsesParams.model_fields})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = param_of(tuple(first["loc"]))
        raise openai_error("invalid_params", f"{where}: {first['msg']}" if where else str(first["msg"]),
                           param=where) from None
    response_format = text_format(data.get("text"), ignored)
    turns = parse_input(data["input"], ignored)
    truncation = params.truncation or "disabled"
    return ResponsesRequest(
        model=params.model, instructions=params.instructions or None, turns=turns,
        params=generation(params, truncation, response_format), stream=bool(params.stream),
        store=params.store is not False, previous_response_id=params.previous_response_id,
        max_output_tokens=params.max_output_tokens,
        truncation=truncation, user=params.user or params.safety_identifier, metadata=params.metadata,
        fingerprint=hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest(), ignored=tuple(ignored))


def header_name(name: str) -> str:
    """A parameter's name as the ``tuwen-ignored-params`` header can carry it (printable ASCII, bounded)."""
    text = printable_name(name).encode("ascii", "backslashreplace").decode()
    return "".join(c if c.isprintable() and c != "," else "?" for c in text)


def text_format(text: Any, ignored: list[str]) -> dict[str, Any] | None:
    """``text.format`` as the chat API's ``response_format`` (checked with the job's parameters): its
    ``json_schema`` carries ``name``, ``schema``, ``strict`` beside its type, not nested under ``json_schema``."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise openai_error("invalid_params", "text must be an object", param="text")
    ignored += [f"text.{header_name(k)}" for k in text if k != "format"]  # verbosity …
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise openai_error("invalid_params", "text.format must be an object", param="text.format")
    if fmt.get("type") != "json_schema":
        return fmt
    return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}


def generation(params: ResponsesParams, truncation: str, response_format: dict[str, Any] | None = None
               ) -> GenerationParams:
    """The job's ``GenerationParams``; their limits (``schema``) name the Responses parameter when broken."""
    values = {"max_new_tokens": params.max_output_tokens, "temperature": params.temperature, "top_p": params.top_p,
              "truncation": TRUNCATION[truncation], "response_format": response_format}
    try:
        return GenerationParams.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        name = {"max_new_tokens": "max_output_tokens", "response_format": "text.format"}.get(field, field)
        code = "invalid_schema" if schema_error(exc.errors()) else "invalid_params"
        message = str(first["msg"]).replace("response_format", "text.format")
        raise openai_error(code, f"{name}: {message}", param=name or None) from None


def parse_input(raw: Any, ignored: list[str]) -> tuple[ChatTurn, ...]:
    """The input's turns: a string is one user turn; a list holds message items."""
    if isinstance(raw, str):
        return (ChatTurn(Role.user, (raw,)),)
    if not isinstance(raw, list) or not raw:
        raise openai_error("invalid_messages", "input must be a string or a non-empty list of items",
                           param="input")
    if len(raw) > MAX_MESSAGES:
        raise openai_error("invalid_messages", f"{len(raw)} input items; the limit is {MAX_MESSAGES}",
                           param="input")
    return tuple(_item(item, f"input[{i}]", ignored) for i, item in enumerate(raw))


def _item(item: Any, where: str, ignored: list[str]) -> ChatTurn:
    if not isinstance(item, dict):
        raise openai_error("invalid_messages", f"{where} must be an object", param=where)
    kind = item.get("type", "message")
    if kind != "message":
        raise openai_error("unsupported_parameter", f"{where}: {printable_name(str(kind))} items are not "
                           "supported; send message items", param=f"{where}.type")
    role = item.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise openai_error("invalid_messages", f"{where}.role must be one of {', '.join(ROLES)}",
                           param=f"{where}.role")
    ignored += [f"{where}.{header_name(k)}" for k in item if k not in ITEM_FIELDS]
    content = item.get("content")
    if isinstance(content, str):
        return ChatTurn(ROLES[role], (content,) if content else ())
    if not isinstance(content, list) or not content:
        raise openai_error("invalid_messages", f"{where}.content must be a string or a non-empty list of parts",
                           param=f"{where}.content")
    return chat_turn(ROLES[role], tuple(_part(p, f"{where}.content[{j}]", ignored) for j, p in enumerate(content)),
                     where)


def _part(part: Any, where: str, ignored: list[str]) -> Part:
    if not isinstance(part, dict):
        raise openai_error("invalid_messages", f"{where} must be an object", param=where)
    kind = part.get("type")
    if isinstance(kind, str) and kind in REFUSED_PARTS:
        raise openai_error("unsupported_parameter", f"{where}: {REFUSED_PARTS[kind]}; send input_text, "
                           "input_image, input_file and input_audio parts", param=f"{where}.type")
    if kind == "input_file":
        return input_file(part, where, ignored)
    if kind == "input_audio":
        return audio_part(part, where)
    if kind in ("input_text", "output_text"):
        ignored += [f"{where}.{header_name(k)}" for k in part if k not in ("type", "text", "annotations", "logprobs")]
        if not isinstance(part.get("text"), str):
            raise openai_error("invalid_messages", f"{where}.text must be a string", param=f"{where}.text")
        return str(part["text"])
    if kind != "input_image":
        raise openai_error("invalid_messages", f"{where} must be a part of type input_text, output_text, "
                           "input_image or input_file", param=f"{where}.type")
    if part.get("file_id") is not None:
        raise openai_error("unsupported_parameter", f"{where}.file_id: pictures come as image_url (a data: "
                           "URL, tuwen://images/<sha256> or http(s))", param=f"{where}.file_id")
    ignored += [f"{where}.{header_name(k)}" for k in part if k not in ("type", "image_url", "detail", "file_id")]
    try:
        parsed = InputImage.model_validate({k: v for k, v in part.items() if k in ("type", "image_url", "detail")})
    except ValidationError as exc:
        param = f"{where}.{param_of(tuple(exc.errors()[0]['loc'])) or 'image_url'}"
        raise openai_error("invalid_messages", f"{param}: {exc.errors()[0]['msg']}", param=param) from None
    return PictureRef(parsed.image_url, f"{where}.image_url")
