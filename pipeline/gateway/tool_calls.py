"""Tool calls on the chat API (docs/structured.md): ``tools`` and ``tool_choice`` as a job's ``tool_call``
(``tool_format``), tool calls and their results coming back in the conversation, and a forced call streamed
as OpenAI's tool-call deltas.

* ``tool_choice: "required"`` or ``{"type": "function", "function": {"name"}}``: the answer is one call,
  decoded under the functions' schemas. ``"none"`` (or no tools): plain text, the tools unused. ``"auto"``
  (OpenAI's default when tools are given) is refused once the served model is known: the model would have to
  choose whether to call a tool, which needs a chat template that renders tools (each worker announces
  whether its checkpoint's does, ``renders_tools``), and the demo model's renders none.
* An assistant message's ``tool_calls`` become text of that turn, each call ``<tool_call>\\n{"name": …,
  "arguments": {…}}\\n</tool_call>``; a ``tool`` message becomes a user turn ``<tool_response>\\n…\\n
  </tool_response>`` (consecutive ones one turn): Hermes' and Qwen's format, as plain text that any chat
  template renders.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from tuwen.pipeline.gateway.openai_errors import openai_error
from tuwen.pipeline.tool_format import HEAD, MAX_TOOLS, ToolCallFormat, call_id

#: Why ``tool_choice: "auto"`` is refused: the served model's template renders no tools / it does, but its
#: native call format is not parsed yet.
AUTO = ('tool_choice "auto" (the default when tools are given) lets the model choose whether to call a tool, '
        "which needs a checkpoint whose chat template renders tools; the served model's does not")
AUTO_NOT_YET = ('tool_choice "auto" (the default when tools are given): the served model\'s chat template renders '
                "tools, but tuwen does not parse its native tool-call format yet")
FORCED = '. Give tool_choice "required", {"type": "function", "function": {"name": …}} or "none"'
CHOICES = ("none", "auto", "required")


# -- the request ------------------------------------------------------------------------------------------
def forced(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None) -> ToolCallFormat | None:
    """The job's ``tool_call`` for a request's ``tools`` and ``tool_choice``; None for plain text (and for
    ``"auto"``, which ``refuse_auto`` answers once the served model is known). Malformed tools are 400
    ``invalid_params``, a parameter schema that cannot be enforced 400 ``invalid_schema``."""
    name = _named(tool_choice)
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise openai_error("invalid_params", "tool_choice: there are no tools to call", param="tool_choice")
        return None
    if len(tools) > MAX_TOOLS:
        raise openai_error("invalid_params", f"tools: {len(tools)} tools; the limit is {MAX_TOOLS}", param="tools")
    functions = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or set(tool) != {"type", "function"} or tool["type"] != "function":
            raise openai_error("invalid_params", f'tools[{i}] must be {{"type": "function", "function": {{…}}}}',
                               param=f"tools[{i}]")
        functions.append(function)
    try:
        call = ToolCallFormat(functions=tuple(functions), name=name)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "invalid_schema":
            where = str((first.get("ctx") or {}).get("where", "tools"))
            raise openai_error("invalid_schema", str(first["msg"]), param=where) from None
        message = str(first["msg"]).removeprefix("Value error, ")
        raise openai_error("invalid_params", message, param="tool_choice" if "tool_choice" in message else "tools") \
            from None
    return None if tool_choice in (None, "none", "auto") else call


def auto(params: Any) -> bool:
    """The request (its ``ChatParams``) leaves it to the model whether to call one of its tools (``"auto"``, the
    default with tools)."""
    return bool(params.tools) and params.tool_choice in (None, "auto")


def refuse_auto(renders_tools: bool) -> None:
    """``tool_choice: "auto"`` is a 400 ``unsupported_parameter`` that says why, for the served model:
    its template renders no tools (the demo model's), or tuwen does not parse its native format yet."""
    raise openai_error("unsupported_parameter", (AUTO_NOT_YET if renders_tools else AUTO) + FORCED,
                       param="tool_choice")


def _named(tool_choice: str | dict[str, Any] | None) -> str | None:
    """The function a named ``tool_choice`` names; None for the others (checked: one of ``CHOICES``)."""
    if tool_choice is None or tool_choice in CHOICES:
        return None
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if (not isinstance(tool_choice, dict) or set(tool_choice) != {"type", "function"}
            or tool_choice["type"] != "function" or not isinstance(function, dict)
            or not isinstance(function.get("name"), str) or set(function) != {"name"}):
        raise openai_error("invalid_params", 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                           '"function": {"name": …}}', param="tool_choice")
    return str(function["name"])


# -- the conversation ---------------------------------------------------------------------------------------
def turn(message: Any, where: str, ignored: list[str], plain: Callable[[Any, str, list[str]], Any]) -> Any:
    """The turn of one message: ``plain``'s (``openai_request``'s), with an assistant message's ``tool_calls``
    as text after its content, and a ``tool`` message as a user turn of its result."""
    if not isinstance(message, dict) or message.get("role") not in ("tool", "assistant"):
        return plain(message, where, ignored)
    if message["role"] == "tool":
        ignored += [f"{where}.{k[:64]}" for k in message if k not in ("role", "content", "tool_call_id")]
        return plain({"role": "user", "content": result_text(message, where)}, where, ignored)
    said = plain({k: v for k, v in message.items() if k != "tool_calls"}, where, ignored)
    if not message.get("tool_calls"):
        return said
    calls = calls_text(message["tool_calls"], where)
    return replace(said, parts=(*said.parts, ("\n" if said.parts else "") + calls))


def calls_text(calls: Any, where: str) -> str:
    """An assistant message's ``tool_calls`` as the text of its turn."""
    if not isinstance(calls, list):
        raise openai_error("invalid_messages", f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
    lines = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(call, dict) or not isinstance(call.get("id"), str) or call.get("type") != "function"
                or not isinstance(function, dict) or not isinstance(function.get("name"), str)
                or not isinstance(function.get("arguments"), str)):
            raise openai_error("invalid_messages", f'{at} must be {{"id", "type": "function", "function": {{"name", '
                               '"arguments"}}}} with strings', param=at)
        try:
            arguments = json.loads(function["arguments"])
        except (ValueError, RecursionError):  # not JSON (or nested past Python's limit): shown as the string it is
            arguments = function["arguments"]
        lines.append("<tool_call>\n" + json.dumps({"name": function["name"], "arguments": arguments},
                                                  ensure_ascii=False) + "\n</tool_call>")
    return "\n".join(lines)


def result_text(message: dict[str, Any], where: str) -> str:
    """A ``tool`` message (a call's result) as the text of a user turn."""
    if not isinstance(message.get("tool_call_id"), str):
        raise openai_error("invalid_messages", f"{where}.tool_call_id must be the id of the call it answers",
                           param=f"{where}.tool_call_id")
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise openai_error("invalid_messages", f"{where}.content must be a string or text parts",
                           param=f"{where}.content")
    return f"<tool_response>\n{content}\n</tool_response>"


def answered(raw: Sequence[Any]) -> None:
    """Each ``tool`` message answers a call of an assistant message before it (OpenAI's rule)."""
    ids: set[Any] = set()
    for i, message in enumerate(raw):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "assistant" and isinstance(message.get("tool_calls"), list):
            ids |= {c.get("id") for c in message["tool_calls"] if isinstance(c, dict)}
        elif role == "tool" and message.get("tool_call_id") not in ids:
            raise openai_error("invalid_messages", f"messages[{i}].tool_call_id answers no tool call of an earlier "
                               "assistant message", param=f"messages[{i}].tool_call_id")


def merged(raw: Sequence[Any], turns: Sequence[Any]) -> tuple[Any, ...]:
    """``turns`` (one per message of ``raw``) with consecutive ``tool`` messages' turns joined into one, once each
    tool message is known to answer a call (``answered``)."""
    answered(raw)
    out: list[Any] = []
    for i, turn in enumerate(turns):
        if i and _role(raw[i]) == "tool" and _role(raw[i - 1]) == "tool":
            out[-1] = replace(out[-1], parts=(*out[-1].parts, "\n", *turn.parts))
        else:
            out.append(turn)
    return tuple(out)


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


# -- streaming ----------------------------------------------------------------------------------------------
class CallStream:
    """A forced call's text, as it is generated, as OpenAI's deltas: first ``index``, ``id``, ``type`` and the
    function's ``name`` (once the name is whole), then ``arguments`` piece by piece. The call's closing brace
    is held back and dropped when the call ends whole; a call cut short (``length``) before its name is whole
    sends its text as ``content``."""

    def __init__(self, job_id: str, index: int = 0) -> None:
        self.id = call_id(job_id, index)
        self.text = ""
        self.start: int | None = None
        self.sent = 0

    def feed(self, piece: str) -> list[dict[str, Any]]:
        self.text += piece
        out = []
        if self.start is None:
            head = HEAD.match(self.text)
            if head is None:
                return []
            self.start = self.sent = head.end()
            out.append({"tool_calls": [{"index": 0, "id": self.id, "type": "function",
                                        "function": {"name": head.group(1), "arguments": ""}}]})
        return out + self._arguments(len(self.text.rstrip()) - 1)

    def end(self, finish: str) -> list[dict[str, Any]]:
        if self.start is None:
            return [{"content": self.text}] if self.text else []
        return self._arguments(len(self.text.rstrip()) - 1 if finish == "tool_calls" else len(self.text))

    def _arguments(self, upto: int) -> list[dict[str, Any]]:
        if upto <= self.sent:
            return []
        piece, self.sent = self.text[self.sent:upto], upto
        return [{"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}]
