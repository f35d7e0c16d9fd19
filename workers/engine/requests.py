"""What the engine is asked and what it answers: an ``Item`` (a conversation with its pictures and knobs),
its ``Answer``, and the ``Group`` of items made ready together (``Runtime.prepare``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Item:
    """One request: a picture and a question, or a whole conversation with its pictures.

    ``messages`` are in the Hugging Face chat format (``{"role", "content": [{"type": "image"},
    {"type": "text", "text": ...}]}``); ``images`` holds their pictures in the order of the image parts.
    """

    image: bytes | Image.Image | None = None
    question: str = ""
    max_new_tokens: int | None = None
    messages: tuple[dict[str, Any], ...] = ()
    images: tuple[bytes | Image.Image, ...] = ()
    #: ``None`` is greedy; else an ``engine.Sampling`` (temperature, top_p, seed).
    sampling: Any = None
    stop: tuple[str, ...] = ()
    #: ``none``: a conversation longer than the context is refused; ``oldest_turns``: its oldest turns
    #: are dropped until it fits (never the system prompt, nor the last user turn and its pictures).
    truncation: str = "none"
    #: Streaming: called with each new piece of the answer (``engine.Row.on_text``).
    on_text: Callable[..., None] | None = None
    #: The conversation ends with an assistant message that the answer continues (a prefill).
    continue_final: bool = False
    #: OpenAI's ``response_format``: ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema":
    #: {"schema": ...}}`` constrain the answer (``engine.grammar``); None or ``text``: free text.
    response_format: dict[str, Any] | None = None
    #: Whose job this is: the worker's picture and prefix caches are per owner (``engine.reuse``).
    owner: str = ""

    def conversation(self) -> tuple[list[dict[str, Any]], list[bytes | Image.Image]]:
        if self.messages:
            return [dict(m) for m in self.messages], list(self.images)
        if self.image is None:
            return [{"role": "user", "content": [{"type": "text", "text": self.question}]}], []
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question}]}], [self.image]


@dataclass
class Answer:
    """The outcome for one item: an answer or an error, never both."""

    answer: str | None = None
    #: ``{code, message, retryable}`` (``TuwenError.as_error()``), typed all the way to the job's result.
    error: dict[str, Any] | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    batch_size: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    #: The generated token ids (without the end-of-sequence token).
    tokens: list[int] = field(default_factory=list)
    #: ``stop`` (the model ended, or a stop string) or ``length`` (the token budget ran out).
    finish_reason: str | None = None
    #: Every answer of an item with ``n`` > 1 or ``logprobs`` (``schema.ChoiceResult``'s fields); the fields
    #: above are choice 0's, but ``generated_tokens`` counts every choice's tokens.
    choices: list[dict[str, Any]] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Group:
    """Items made ready for the engine: an answer per item (errors already filled in) and the rows of
    the good ones (``row.key`` is the item's index), encoded together."""

    answers: list[Answer]
    rows: list[Any]
    enc: Any


@dataclass
class Prepared:
    """An item made ready: its conversation, decoded pictures and asked budget (the runtime's own step)."""

    index: int
    messages: list[dict[str, Any]]
    images: list[Image.Image]
    #: None: what is left of the context after the prompt, up to ``TUWEN_MAX_NEW_TOKENS``.
    max_new_tokens: int | None
    item: Item
