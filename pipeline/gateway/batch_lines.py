"""A Batch API line as a bulk job: its body is one request of the batch's endpoint, read exactly as a
``POST /v1/chat/completions`` body (``openai_request.parse_chat``) or a ``POST /v1/responses`` body
(``responses_request.parse_responses``, a ``previous_response_id`` continued as there) is, its pictures got
as there (``pictures.picture``), then prepared as a bulk-priority job of the batch
(``conversation.prepare_conversation``). A line's response is not stored: the output file holds it.

An adapter between two shapes: the chat code refuses with ``OpenAIError`` (an HTTP answer), a bulk line
with ``InvalidInput`` (an error line), so ``ChatLines`` turns one into the other, code, message and param
kept.
"""

from __future__ import annotations

import json
from typing import Any

from tuwen.pipeline.bulk.manifest import Record
from tuwen.pipeline.bulk.model import RESPONSES_ENDPOINT, Bulk
from tuwen.pipeline.conversation import prepare_conversation
from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.gateway.openai_errors import OpenAIError, openai_error
from tuwen.pipeline.gateway.chat_jobs import fetched_turns
from tuwen.pipeline.gateway.openai_request import ChatRequest, parse_chat
from tuwen.pipeline.gateway.responses_request import parse_responses
from tuwen.pipeline.gateway.served import aliases
from tuwen.pipeline.gateway.state import GatewayState
from tuwen.pipeline.schema import JobRequest, Priority


def parse_line(body: Any) -> ChatRequest:
    """``parse_chat`` for a line's body: it takes the raw HTTP body, a line's body is already decoded."""
    return parse_chat(json.dumps(body).encode())


class ChatLines:
    """The ``LinePreparer`` of a batch's lines: each body a request of the batch's endpoint (a chat
    completion, or a response), answered whole (``stream`` is refused), by the served model (``model`` as
    the endpoint takes it)."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    def request(self, body: Any, bulk: Bulk) -> ChatRequest:
        """The line's body as the job it asks for."""
        if bulk.openai is None or bulk.openai.endpoint != RESPONSES_ENDPOINT:
            return parse_line(body)
        ask = parse_responses(json.dumps(body).encode())
        previous = ask.previous_response_id
        return ask.as_chat(self.state.responses.history(previous, bulk.owner) if previous else ())

    def __call__(self, rec: Record, bulk: Bulk, job_id: str) -> JobRequest:
        try:
            chat = self.request(rec.request, bulk)
            if chat.stream:
                raise openai_error("unsupported_parameter", "stream: a batch line is answered whole, not "
                                   "streamed", param="stream")
            self._check_model(chat.model)
            turns = fetched_turns(self.state, chat, self.state.settings.bulk_queue, bulk.owner)
        except OpenAIError as exc:
            raise InvalidInput(exc.message, code=exc.code, param=exc.param) from exc
        return prepare_conversation(self.state.client, turns, chat.params, owner=bulk.owner, priority=Priority.bulk,
                                    job_id=job_id, bulk_id=bulk.id)

    def _check_model(self, requested: str) -> None:
        """A model the live workers on the bulk queue hold, or an alias of the served model; while no
        worker is live any name is taken (the line waits in the queue like every other)."""
        live = self.state.census.models(self.state.settings.bulk_queue)
        if live and requested not in live and requested not in aliases(self.state):
            raise openai_error("model_not_served", f"The model `{requested}` does not exist: GET /v1/models "
                               "lists the served ones", param="model")
