"""Prompts the client's text can never take over: rendering a conversation so that no text a client sent
becomes one of the model's special tokens (``<image>``, ``</s>``, ``<|im_start|>``, ``<|vision_start|>``...).

The tokenizer finds special tokens anywhere in the string it is given, and the chat template joins a
message's text parts, the turns and its own markers into one string. So a special token can be spelt
across pieces: ``"<ima"`` + ``"ge>"`` in two text parts, the end of one turn and the start of the next,
or a turn's end and the marker the template puts after it. Making each piece harmless on its own is not
enough; what matters is the joined string.

``Prompts.render`` therefore renders the template with a placeholder for every piece of client text,
puts the texts back and so knows exactly which characters of the prompt the client wrote. Every place
where the tokenizer would find a special token that touches client text is broken with a word joiner
(U+2060, invisible) inside the client's part of it, until none is left; the tokens the template wrote
stay whole. A conversation without any special token's spelling in it renders exactly as before, to
the same token ids.

``Prompts.check`` then verifies on token ids what the text promises: the tokenizer's count of each special
token in the prompt equals the count the template wrote, pictures included (one picture token, before
the processor expands it, per picture). A prompt that fails is refused (``unprocessable_input``) alone,
never sent to the model with its neighbours.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from tuwen.pipeline.errors import InvalidInput

#: Breaks a special token's spelling without showing (Unicode's word joiner).
JOINER = "\u2060"
_MARK = re.compile("\ue000(\\d+)\ue001")


@dataclass
class Prompt:
    """A rendered prompt, what of it the client wrote, and the special tokens the template put in it."""

    text: str
    #: (start, end) of each stretch of client text in ``text``.
    spans: list[tuple[int, int]]
    #: Special token -> how many times the template wrote it (the tokens the model must see, no more).
    specials: Counter[str] = field(default_factory=Counter)


class Prompts:
    """Renders conversations for one loaded processor (its chat template and its special tokens)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer

    @cached_property
    def tokens(self) -> list[str]:
        """Every string the tokenizer reads as one token of its own (its added and special tokens, the
        picture and video tokens), longest first."""
        tok = self.tokenizer
        found = set(tok.all_special_tokens) | {str(t) for t in getattr(tok, "added_tokens_decoder", {}).values()}
        for extra in ("image_token", "video_token"):
            if getattr(self.processor, extra, None):
                found.add(getattr(self.processor, extra))
        return sorted(filter(None, found), key=len, reverse=True)

    @cached_property
    def _pattern(self) -> re.Pattern[str]:
        # Alternatives longest first: at each position the longest token wins, as the tokenizer's own
        # matching of added tokens does.
        return re.compile("|".join(re.escape(t) for t in self.tokens))

    @cached_property
    def _ids(self) -> dict[int, str]:
        ids = self.tokenizer.convert_tokens_to_ids(self.tokens)
        return {int(i): t for i, t in zip(ids, self.tokens) if i is not None and i != self.tokenizer.unk_token_id}

    @cached_property
    def renders_tools(self) -> bool:
        """The chat template renders a request's tools: a probe function's name shows in a rendered prompt.
        Decided by rendering, never from the model's name; the worker announces it (``renders_tools``)."""
        probe = "tuwen_probe_function"
        tools = [{"type": "function", "function": {"name": probe, "description": "a probe", "parameters": {
            "type": "object", "properties": {}}}}]
        try:
            text = self.processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "?"}]}],
                                                      tools=tools, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template that refuses tools does not render them
            return False
        return probe in str(text)

    # -- rendering ------------------------------------------------------------------------------------
    def render(self, messages: list[dict[str, Any]], *, continue_final: bool = False) -> Prompt:
        """The prompt for ``messages`` (Hugging Face chat format): the assistant's turn opened, or, with
        ``continue_final``, the last (assistant) message left open for the answer to continue.

        System messages may stand anywhere. The template gets them where they are; a template that refuses
        that gets them merged into one system message first, and one that takes no system message at all
        gets their text at the start of the first user message."""
        texts: list[str] = []
        marked = [self._mark(m, texts) for m in messages]
        rendered = self._apply(marked, continue_final)
        text, spans, at = [], [], 0
        pieces = _MARK.split(rendered)  # template, index, template, index, ..., template
        for i, piece in enumerate(pieces):
            if i % 2:
                client = texts[int(piece)]
                spans.append((at, at + len(client)))
                text.append(client)
                at += len(client)
            else:
                text.append(piece)
                at += len(piece)
        prompt = Prompt("".join(text), spans)
        self._defuse(prompt)
        prompt.specials = Counter(m.group() for m in self._pattern.finditer(prompt.text))
        return prompt

    def _apply(self, messages: list[dict[str, Any]], continue_final: bool) -> str:
        kwargs: dict[str, Any] = ({"continue_final_message": True} if continue_final and _has_text(messages[-1])
                                  else {"add_generation_prompt": True})
        tries = [messages, _systems_first(messages), _systems_folded(messages)]
        for i, conversation in enumerate(tries):
            if i and conversation == tries[i - 1]:
                continue
            try:
                return str(self.processor.apply_chat_template(conversation, tokenize=False, **kwargs))
            except Exception:  # noqa: BLE001 - the template refused this shape (jinja's raise_exception)
                if i == len(tries) - 1:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _mark(message: dict[str, Any], texts: list[str]) -> dict[str, Any]:
        """The message with each text replaced by a placeholder that no template alters."""

        def placeholder(text: str) -> str:
            texts.append(text)
            return f"\ue000{len(texts) - 1}\ue001"

        content = message.get("content")
        if isinstance(content, str):
            return {**message, "content": placeholder(content)}
        if isinstance(content, list):
            return {**message, "content": [{**part, "text": placeholder(part["text"])}
                                           if part.get("type") == "text" else part for part in content]}
        return dict(message)

    def _defuse(self, prompt: Prompt) -> None:
        """Break every special-token spelling that touches client text, inside the client's part of it.
        Each break removes one match (a joiner is in no token), so this ends."""
        while True:
            hit = next(((m, s) for m in self._pattern.finditer(prompt.text) for s in prompt.spans
                        if m.start() < s[1] and s[0] < m.end()), None)
            if hit is None:
                return
            match, (start, _) = hit
            # Strictly inside the match and inside the client's text: the client's first character in the
            # match when the match starts in the template, else right after the match's first character.
            at = start if start > match.start() else match.start() + 1
            prompt.text = prompt.text[:at] + JOINER + prompt.text[at:]
            prompt.spans = [(a, b + 1) if a <= at <= b else (a + 1, b + 1) if a > at else (a, b)
                            for a, b in prompt.spans]

    # -- checking -------------------------------------------------------------------------------------
    def count(self, ids: Any) -> Counter[str]:
        """Special tokens among ``ids`` (any iterable of ints), by their text."""
        return Counter(self._ids[i] for i in map(int, ids) if i in self._ids)

    @cached_property
    def _added(self) -> Counter[str]:
        """Special tokens the tokenizer adds around any text (a BOS token, for most families)."""
        return self.count(self.tokenizer("")["input_ids"])

    @cached_property
    def _media(self) -> set[str]:
        """The picture and video tokens, which the processor expands into each picture's own count."""
        return {t for t in (getattr(self.processor, n, None) for n in ("image_token", "video_token")) if t}

    def wrong_ids(self, prompt: Prompt, ids: Any) -> str | None:
        """Why the processor's final ``ids`` for ``prompt`` hold other special tokens than its template wrote
        (and the tokenizer adds), or None; picture tokens aside: the processor checks their count itself."""
        seen, wrote = self.count(ids), prompt.specials + self._added
        for token in self._media:
            seen.pop(token, None)
            wrote.pop(token, None)
        if +seen == +wrote:
            return None
        return f"the prompt's token ids hold other special tokens ({dict(seen)}) than its chat template wrote " \
               f"({dict(wrote)})"

    def check(self, prompt: Prompt, pictures: int) -> None:
        """Refuse a prompt whose token ids would hold other special tokens than the template wrote, or
        another number of picture tokens than pictures."""
        ids = self.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        seen = self.count(ids)
        image = getattr(self.processor, "image_token", None)
        wrote = Counter({t: n for t, n in prompt.specials.items() if t in self._ids.values()})
        if seen != wrote or (image and prompt.specials.get(image, 0) != pictures):
            extra = {t: seen[t] - wrote[t] for t in set(seen) | set(wrote) if seen[t] != wrote[t]}
            raise InvalidInput(
                f"the prompt would hold other special tokens than its chat template wrote ({extra or 'picture tokens'}"
                f", {pictures} pictures); refused rather than given to the model", code="unprocessable_input")


def _parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content or [])


def _has_text(message: dict[str, Any]) -> bool:
    return any(p.get("type") == "text" for p in _parts(message))


def _system_text(messages: list[dict[str, Any]]) -> str:
    return "\n\n".join(p["text"] for m in messages if m["role"] == "system" for p in _parts(m)
                        if p.get("type") == "text")


def _systems_first(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every system message's text in one system message, first."""
    others = [m for m in messages if m["role"] != "system"]
    if len(others) == len(messages):
        return messages
    return [{"role": "system", "content": _system_text(messages)}, *others]


def _systems_folded(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """No system message: their text opens the first user message."""
    others = [m for m in messages if m["role"] != "system"]
    first = next((i for i, m in enumerate(others) if m["role"] == "user"), None)
    if len(others) == len(messages) or first is None:
        return others or messages
    folded = dict(others[first])
    folded["content"] = [{"type": "text", "text": _system_text(messages) + "\n\n"}, *_parts(others[first])]
    return [*others[:first], folded, *others[first + 1:]]
