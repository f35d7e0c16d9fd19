"""What the chat API does with each OpenAI parameter, by vLLM's rule: what tuwen implements is honoured
(``SAMPLING``, mapped to ``GenerationParams`` under the same names); what a client relies on and tuwen
cannot give is refused by name unless it has its neutral value (``REFUSED``); anything else is ignored
and named in the ``tuwen-ignored-params`` header (``openai_request.parse_chat``)."""

from __future__ import annotations

from typing import Any

from tuwen.pipeline.schema import Role

# -- what tuwen does not do: refused by name, unless given its neutral value ------------------------------
NO_TOOLS = "tuwen takes tools and tool_choice, not the older functions and function_call"
#: name → (values that change nothing, why anything else is refused): parameters whose effect a client
#: relies on and tuwen cannot give.
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "functions": (([],), NO_TOOLS), "function_call": (("none", "auto"), NO_TOOLS),
    "modalities": ((["text"],), "tuwen answers in text only"),
    "audio": ((), "tuwen answers in text only"),
    "web_search_options": ((), "tuwen does not search the web"),
}
#: Message fields whose effect a client relies on (the older function calls, audio). An assistant message's
#: ``tool_calls`` and a ``tool`` message's ``tool_call_id`` are taken (``gateway.tool_calls``).
REFUSED_IN_MESSAGES = {"function_call": NO_TOOLS, "audio": "tuwen answers in text only"}
ROLES = {"system": Role.system, "developer": Role.system, "user": Role.user, "assistant": Role.assistant}


def neutral(value: Any, allowed: tuple[Any, ...]) -> bool:
    return value is None or any(type(value) is type(a) and value == a for a in allowed)


#: ``ChatParams`` that go to ``GenerationParams`` under the same name.
SAMPLING = ("temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
            "presence_penalty", "truncation", "logit_bias", "n", "logprobs", "top_logprobs")
