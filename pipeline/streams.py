"""Answers as they are generated: one Redis stream per job that asked to stream.

The worker appends each new piece of text (``XADD tuwen:stream:<job id> * t <text>``, one pipelined
round trip per decode step for all its streaming rows) and, when the row ends, an entry with the finish
reason. A job with ``n`` > 1 adds ``i <choice>`` to the pieces of choices other than 0, and one with
``logprobs`` ``l <JSON entries>``: the log probabilities of the tokens since the choice's last piece. A
reader starts from the beginning whenever it connects, so nothing is lost to a late subscriber (unlike
pub/sub), and the stream expires a few minutes after the job ends.

The job store stays the record of truth: a reader that sees the job end without a finished stream (an
answer from the cache, a failure before the first token, a worker that died mid-answer and a second one
that finished it) sends whatever the final answer holds beyond what was streamed. The script that writes a
streaming job's result also appends an ``ended`` entry (``jobs``), so a reader blocked on the stream wakes
as the job ends: a cached answer streamed waited out the whole read interval (1 s) before.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from tuwen.pipeline.jobs import STREAM_MAX_LEN, STREAM_TTL_S, JobStore, redis_errors, stream_key
from tuwen.pipeline.schema import JobResult, JobStatus


class StreamWriter:
    """Buffers text per job; ``flush`` writes everything buffered in one pipelined round trip."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._pending: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()  # the decode thread adds text; consumer threads add ends and flush

    def text(self, job_id: str, piece: str, choice: int = 0, logprobs: list[Any] | None = None) -> None:
        if piece or logprobs:
            fields = {"t": piece}
            if choice:
                fields["i"] = str(choice)
            if logprobs is not None:
                fields["l"] = json.dumps(logprobs, ensure_ascii=False)
            with self._lock:
                self._pending.append((job_id, fields))

    def end(self, job_id: str, finish_reason: str) -> None:
        with self._lock:
            self._pending.append((job_id, {"end": finish_reason}))

    def flush(self) -> None:
        """Write what is buffered, in order (flushes are serialised, so two threads cannot reorder a
        job's pieces)."""
        with self._lock:
            pending, self._pending = self._pending, []
            if not pending:
                return
            pipe = self.redis.pipeline(transaction=False)
            for job_id in dict.fromkeys(j for j, _ in pending):
                for _, fields in (p for p in pending if p[0] == job_id):
                    pipe.xadd(stream_key(job_id), fields, maxlen=STREAM_MAX_LEN, approximate=True)
                pipe.expire(stream_key(job_id), STREAM_TTL_S)
            try:
                pipe.execute()
            except redis.RedisError:
                pass  # streaming is best effort: the final answer is written to the job store regardless


@dataclass(frozen=True)
class Delta:
    """One event of a streamed answer: new text (of choice ``index``, with its tokens' ``logprobs`` when the job
    asked for them), or the end (``finish_reason`` set, ``result`` final)."""

    text: str = ""
    finish_reason: str | None = None
    result: JobResult | None = None
    index: int = 0
    logprobs: list[dict[str, Any]] | None = None

    @property
    def piece(self) -> bool:
        """Part of the answer (text or log probabilities), not the end nor a timeout."""
        return bool(self.text) or self.logprobs is not None


class Assembler:
    """What a reader has seen of one job's stream; turns stream entries and the final result into
    ``Delta``s. Shared by the blocking reader below and the asyncio client."""

    def __init__(self, job_id: str) -> None:
        self.key = stream_key(job_id)
        self.last_id = "0"
        self.texts: dict[int, str] = {}  #: what was streamed of each choice
        self.reason: str | None = None

    @property
    def sent(self) -> str:
        """What was streamed of the answer (choice 0)."""
        return self.texts.get(0, "")

    def take(self, reply: Any) -> list[Delta]:
        """Deltas for an ``XREAD`` reply."""
        out = []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self.last_id = entry_id
                if "t" in fields:
                    index = int(fields.get("i", 0))
                    self.texts[index] = self.texts.get(index, "") + fields["t"]
                    out.append(Delta(text=fields["t"], index=index,
                                     logprobs=json.loads(fields["l"]) if "l" in fields else None))
                elif "end" in fields:
                    self.reason = fields["end"]
        return out

    def over(self, result: JobResult) -> bool:
        """Whether reading can stop: the job ended (or is gone), or its stream did."""
        return result.status.terminal or result.status == JobStatus.unknown or self.reason is not None

    def closing(self, result: JobResult) -> list[Delta]:
        """The last deltas: what the final answer holds beyond the streamed text, then the end."""
        out = []
        answers = [(c.index, c.answer, c.logprobs) for c in result.choices or ()] or [(0, result.answer or "", None)]
        for index, answer, logprobs in answers:
            sent = self.texts.get(index, "")
            if result.status == JobStatus.succeeded and answer.startswith(sent) and len(answer) > len(sent):
                whole = logprobs is not None and index not in self.texts  # nothing streamed: a cached answer
                out.append(Delta(text=answer[len(sent):], index=index,
                                 logprobs=[e.model_dump() for e in logprobs] if whole and logprobs else None))
        if result.status.terminal:
            reason = self.reason or ("stop" if result.status == JobStatus.succeeded else "error")
            if result.status == JobStatus.succeeded and result.finish_reason:
                reason = result.finish_reason
            out.append(Delta(finish_reason=reason, result=result))
        else:
            out.append(Delta(result=result if result.status == JobStatus.unknown else None))
        return out


def read(jobs: JobStore, job_id: str, timeout: float, owner: str | None = None,
         poll_s: float = 1.0) -> Iterator[Delta]:
    """The job's answer as it is generated, then one last ``Delta`` with the finish reason and result.

    Stops after ``timeout`` seconds without the job ending (the last ``Delta`` then has no result).
    """
    seen = Assembler(job_id)
    deadline = time.monotonic() + timeout
    while True:
        wait_ms = int(max(0.0, min(poll_s, deadline - time.monotonic())) * 1000)
        with redis_errors():
            reply: Any = jobs.redis.xread({seen.key: seen.last_id}, count=256, block=wait_ms) if wait_ms else []
        yield from seen.take(reply)
        result = jobs.get(job_id, owner)
        if seen.over(result):
            if seen.reason is not None and not result.status.terminal:  # the worker writes the result next
                result = jobs.wait(job_id, max(0.0, min(5.0, deadline - time.monotonic())), owner)
            yield from seen.closing(result)
            return
        if time.monotonic() >= deadline:
            yield Delta()
            return
