"""Stored responses (``store: true``, OpenAI's default): what ``GET /v1/responses/{id}`` reads and
``previous_response_id`` continues.

One hash per response (``keys.RESPONSE`` + its job id): the owner, what the request said (``ResponseFacts``),
its conversation as Responses input items, pictures as ``tuwen://images/<sha256>`` keys (never bytes), and
the job's result once it ended. It lives as long as the job's record (``TUWEN_RESULT_TTL_S``). Everything
is per owner: another owner's response is refused exactly like one that never existed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict

from tuwen.pipeline import keys
from tuwen.pipeline.gateway.openai_errors import OpenAIError, openai_error
from tuwen.pipeline.gateway.parts import ChatTurn, PagePicture, PictureRef, Spoken
from tuwen.pipeline.gateway.pictures import stored_url
from tuwen.pipeline.jobs import JobStore, redis_errors
from tuwen.pipeline.responses_objects import ResponseFacts, job_of
from tuwen.pipeline.schema import JOB_ID_MAX, JOB_ID_MIN, JOB_ID_PATTERN, JobRequest, JobResult, JobStatus, Role

_JOB_ID = re.compile(JOB_ID_PATTERN)
#: Where a stored conversation's pictures are named in errors (a picture that expired since).
CONTINUED = "previous_response_id"

# KEYS[1]=response; ARGV: owner, record, ttl. A response is written once (a replayed request keeps the first).
_SAVE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'record', ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""
# KEYS[1]=response; ARGV: result. Only into a response that is still there (never one without its TTL).
_FINISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'result', ARGV[1])
return 1
"""
# KEYS[1]=response; ARGV: owner.
_DELETE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


class StoredResponse(BaseModel):
    model_config = ConfigDict(frozen=True)
    job_id: str
    facts: ResponseFacts
    #: The turns the job was asked, as Responses input items (``instructions`` apart: not carried over).
    conversation: list[dict[str, Any]]
    #: The job as it is now (stored once it ended).
    result: JobResult | None = None


def not_found(response_id: str, param: str | None = None) -> OpenAIError:
    """The one refusal for a response that does not exist, expired, was not stored, or is another owner's."""
    return openai_error("not_found", f"Response with id '{response_id[:80]}' not found.", param=param)


class ResponseStore:
    def __init__(self, client: redis.Redis, jobs: JobStore, ttl_s: int) -> None:
        self.redis, self.jobs, self.ttl_s = client, jobs, ttl_s
        self._save, self._finish = client.register_script(_SAVE), client.register_script(_FINISH)
        self._delete = client.register_script(_DELETE)

    def save(self, owner: str, stored: StoredResponse) -> None:
        with redis_errors():
            self._save(keys=[keys.RESPONSE + stored.job_id],
                       args=[owner, stored.model_dump_json(exclude={"result"}), self.ttl_s])

    def finish(self, job_id: str, result: JobResult) -> None:
        """Keep the job's result with the response, once it ended."""
        if result.status.terminal:
            with redis_errors():
                self._finish(keys=[keys.RESPONSE + job_id], args=[result.model_dump_json()])

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The owner's stored response, its job as it is now; None for any other id."""
        job_id = job_of(response_id)
        if not (JOB_ID_MIN <= len(job_id) <= JOB_ID_MAX and _JOB_ID.match(job_id)):
            return None
        with redis_errors():
            fields: dict[str, str] = self.redis.hgetall(keys.RESPONSE + job_id)
        if not fields or fields.get("owner") != owner:
            return None
        stored = StoredResponse.model_validate_json(fields["record"])
        if "result" in fields:
            return stored.model_copy(update={"result": JobResult.model_validate_json(fields["result"])})
        result = self.jobs.get(job_id, owner)
        self.finish(job_id, result)
        return stored.model_copy(update={"result": result})

    def delete(self, response_id: str, owner: str) -> bool:
        job_id = job_of(response_id)
        if not job_id:
            return False
        with redis_errors():
            return bool(self._delete(keys=[keys.RESPONSE + job_id], args=[owner]))

    def history(self, response_id: str, owner: str) -> tuple[ChatTurn, ...]:
        """The conversation ``previous_response_id`` continues: its turns, then its answer."""
        stored = self.get(response_id, owner)
        if stored is None:
            raise not_found(response_id, CONTINUED)
        result = stored.result
        if result is None or result.status != JobStatus.succeeded:
            status = "in_progress" if result is None or not result.status.terminal else result.status.value
            raise openai_error("invalid_params", f"previous_response_id: response {response_id} is {status}; "
                               "only a response with an answer can be continued", param=CONTINUED)
        answer = (ChatTurn(Role.assistant, (result.answer,)),) if result.answer else ()
        return turns_of(stored.conversation, result.transcript or "") + answer


# -- a conversation as stored items, and back -----------------------------------------------------------------
#: A stored item's spoken part: the job's transcript takes its place when the conversation goes on.
SPOKEN = "tuwen_spoken"

def items_of(turns: Sequence[ChatTurn], job: JobRequest) -> list[dict[str, Any]]:
    """``turns`` as Responses input items, each picture replaced by the key the job stored it under (the job's
    pictures are the turns' pictures, in order), a spoken part by a mark its transcript takes the place of."""
    keys_in_order: Iterator[str] = iter(job.image_keys)
    items = []
    for turn in turns:
        text_type = "output_text" if turn.role == Role.assistant else "input_text"
        items.append({"role": turn.role.value, "content": [
            {"type": "input_image", "image_url": stored_url(next(keys_in_order))}
            if isinstance(p, (PictureRef, PagePicture))
            else {"type": SPOKEN} if isinstance(p, Spoken) else {"type": text_type, "text": p} for p in turn.parts]})
    return items


def turns_of(items: list[dict[str, Any]], transcript: str = "") -> tuple[ChatTurn, ...]:
    """Stored items as turns again; their pictures are named by ``previous_response_id`` in errors, a spoken
    question is its ``transcript``."""
    return tuple(ChatTurn(Role(item["role"]), tuple(
        PictureRef(part["image_url"], CONTINUED) if part["type"] == "input_image" else
        transcript if part["type"] == SPOKEN else str(part["text"]) for part in item["content"])) for item in items)
