"""A forced tool call: ``tools`` with ``tool_choice`` ``"required"`` or a named function make the answer one call
of one of the functions, decoded under a JSON schema derived here (as vLLM does for required and named tool
choice), through the same grammar path as ``response_format`` (``structured``, ``workers.engine.grammar``).

The answer is then ``{"name": "<function>", "parameters": {…}}`` (vLLM's shape for a forced call), ``name``
first (the grammar writes an object's properties in the schema's order, and the worker's grammar
cache sorts the schema's keys: ``name`` comes first either way), the arguments valid against the function's
``parameters``. The job
ends with ``finish_reason: "tool_calls"`` when the call is whole; out of tokens inside it, with ``length`` and
the partial text (never a truncated call as if complete). The OpenAI routes turn a whole call into
``message.tool_calls`` (``completion_message``).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from tuwen.pipeline import structured

#: OpenAI's limit on ``tools``, and its rule for a function's name.
MAX_TOOLS = 128
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
FUNCTION_FIELDS = {"name", "description", "parameters", "strict"}
#: A function without ``parameters`` takes none: its arguments are ``{}``.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
#: The start of a call as the grammar writes it; what follows it, less the closing brace, is the arguments.
HEAD = re.compile(r'^\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"parameters"\s*:\s*(?=\S)')
_DEFS = ("#/$defs/", "#/definitions/")


class ToolCallFormat(BaseModel):
    """The answer is one call of one of ``functions`` (``tool_choice: "required"``), or of ``name`` (a named
    ``tool_choice``). A function is OpenAI's ``{"name", "description", "parameters", "strict"}`` (a tool's
    ``function``); a ``parameters`` schema the grammar library cannot enforce is an ``invalid_schema`` error
    naming the tool."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    functions: tuple[dict[str, Any], ...] = Field(min_length=1, max_length=MAX_TOOLS)
    name: str | None = None

    @model_validator(mode="after")
    def _checked(self) -> ToolCallFormat:
        names = []
        for i, function in enumerate(self.functions):
            where = f"tools[{i}].function"
            if not isinstance(function.get("name"), str) or not NAME.match(function["name"]):
                raise ValueError(f"{where}.name must be 1-64 letters, digits, _ or -")
            if set(function) - FUNCTION_FIELDS:
                raise ValueError(f"{where} has unknown fields: {', '.join(sorted(set(function) - FUNCTION_FIELDS))}")
            strict = function.get("strict")
            if not isinstance(function.get("description", ""), str) or strict not in (None, True, False):
                raise ValueError(f"{where}.description must be a string and strict a boolean")
            parameters = function.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise ValueError(f"{where}.parameters must be a JSON Schema object")
            structured.check_schema(parameters or NO_PARAMETERS, f"{where}.parameters")
            names.append(function["name"])
        if len(set(names)) < len(names):
            raise ValueError("tools: two functions have the same name")
        if self.name is not None and self.name not in names:
            raise ValueError(f"tool_choice names {self.name!r}, which is not one of the tools")
        structured.check_schema(self.call_schema(), "tools")  # the functions' schemas, joined
        return self

    @property
    def chosen(self) -> tuple[dict[str, Any], ...]:
        """The functions the call may be of."""
        return tuple(f for f in self.functions if self.name in (None, f["name"]))

    def call_schema(self) -> dict[str, Any]:
        """The JSON schema of the answer: one call of one of the chosen functions. Each function's own
        ``$defs`` move to the top, renamed ``<i>.<name>``, and its ``$ref``s with them."""
        defs: dict[str, Any] = {}
        calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                   "parameters": _rebased(f.get("parameters") or NO_PARAMETERS,
                                                                         str(i), defs)},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for i, f in enumerate(self.chosen)]
        schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return {**schema, "$defs": defs} if defs else schema

    def response_format(self) -> dict[str, Any]:
        """The constraint the worker decodes under (a ``response_format`` of type ``json_schema``)."""
        return {"type": "json_schema",
                "json_schema": {"name": "tool_call", "schema": self.call_schema(), "strict": True}}


def _rebased(schema: dict[str, Any], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    own = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    for name, value in own.items():
        defs[f"{prefix}.{name}"] = _refs(value, prefix)
    body: dict[str, Any] = _refs({k: v for k, v in schema.items() if k not in ("$defs", "definitions", "$schema",
                                                                             "$id")}, prefix)
    return body


def _refs(node: Any, prefix: str) -> Any:
    if isinstance(node, list):
        return [_refs(x, prefix) for x in node]
    if not isinstance(node, dict):
        return node
    return {k: _ref(v, prefix) if k == "$ref" and isinstance(v, str) else _refs(v, prefix) for k, v in node.items()}


def _ref(ref: str, prefix: str) -> str:
    for base in _DEFS:
        if ref.startswith(base):
            return f"#/$defs/{prefix}.{ref[len(base):]}"
    raise PydanticCustomError("invalid_schema", "tools: a $ref outside $defs ({ref}) is not supported in a tool's "
                              "parameters", {"ref": ref})


# -- the answer ---------------------------------------------------------------------------------------------
def split(answer: str) -> tuple[str, str] | None:
    """``(name, arguments)`` of a whole call as the grammar wrote it (``arguments`` as the model wrote them, a
    JSON object's text), or None when ``answer`` is not one."""
    head = HEAD.match(answer)
    if head is None or not answer.rstrip().endswith("}"):
        return None
    try:
        json.loads(answer)
    except ValueError:
        return None
    return head.group(1), answer.rstrip()[head.end():-1].rstrip()


def finish_reason(tool_call: ToolCallFormat | None, answer: str | None, reason: str | None) -> str | None:
    """The job's finish reason: ``tool_calls`` for a forced call that ended whole, else the engine's."""
    if tool_call is not None and reason == "stop" and split(answer or "") is not None:
        return "tool_calls"
    return reason


def choices(tool_call: ToolCallFormat | None, answers: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The answers of a job with ``n`` > 1 or ``logprobs`` (``{"answer", "finish_reason", …}`` each), their finish
    reasons as ``finish_reason`` gives them."""
    if tool_call is None or not answers:
        return answers
    return [{**a, "finish_reason": finish_reason(tool_call, a.get("answer"), a.get("finish_reason"))} for a in answers]


def call_id(job_id: str, index: int = 0) -> str:
    """The id of choice ``index``'s call: the same whenever the job is read (streamed, whole, in a batch's
    output)."""
    return "call_" + hashlib.sha256(f"{job_id}/{index}".encode()).hexdigest()[:24]


class FunctionCall(BaseModel):
    name: str
    #: The arguments as a JSON object's text, as OpenAI gives them.
    arguments: str


class ToolCall(BaseModel):
    id: str = Field(examples=["call_3b4f0c2d9e8a7f6b5c4d3e2f"])
    type: str = "function"
    function: FunctionCall


def tool_calls(job_id: str, answer: str, index: int = 0) -> list[ToolCall] | None:
    """The answer of a job (or of its choice ``index``) that ended with ``tool_calls`` as OpenAI's
    ``message.tool_calls``."""
    call = split(answer)
    if call is None:
        return None
    return [ToolCall(id=call_id(job_id, index), function=FunctionCall(name=call[0], arguments=call[1]))]
