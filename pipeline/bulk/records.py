"""A bulk in Redis: its hash (state, counts, times), its line list, and the index of bulks.

Keys under ``keys.BULK``, all with the results' TTL: ``<id>`` (hash), ``<id>:lines`` (list: one JSON entry
per input line, in input order), ``<id>:lock`` (the live submitter), ``<id>:hook`` (its webhook's delivery),
``index`` (sorted set of ids by creation time) and ``owner:<owner>`` (the same, per owner). A line's
entry is ``{"n": line number, "c": custom_id, "q": question, "i": the image as the line wrote it, "j": job
id}``, or ``"e": {code, message[, param]}`` instead of ``"j"`` for a line refused before it became a job; a PDF's page
adds ``"f"`` (the file) and ``"p"`` (the page).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import redis

from tuwen.pipeline import keys
from tuwen.pipeline.bulk.manifest import Record
from tuwen.pipeline.bulk.model import Bulk, BulkState, InputError, OpenAIBatch, RequestCounts
from tuwen.pipeline.errors import NotFound
from tuwen.pipeline.jobs import JobStore, redis_errors
from tuwen.pipeline.schema import ErrorInfo, JobResult, WebhookView

PREFIX = keys.BULK
INDEX = PREFIX + "index"
BY_OWNER = PREFIX + "owner:"
PAGE = 500  #: lines read back from Redis at a time

Entry = dict[str, Any]

# KEYS[1]=bulk; ARGV: new state, now, the states it may leave. Returns 1 if it changed.
_SET_STATE = """
local s = redis.call('HGET', KEYS[1], 'state')
for i = 3, #ARGV do if s == ARGV[i] then
  redis.call('HSET', KEYS[1], 'state', ARGV[1], ARGV[1] .. '_at', ARGV[2]); return 1 end end
return 0
"""
# KEYS[1]=bulk; ARGV: cursor and the counts up to it (moved forward only), then the counts shown.
_ADVANCE = """
if tonumber(redis.call('HGET', KEYS[1], 'cursor') or '0') < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'cursor', ARGV[1], 'cursor_completed', ARGV[2], 'cursor_failed', ARGV[3]) end
redis.call('HSET', KEYS[1], 'completed', ARGV[4], 'failed', ARGV[5])
"""
_TIMES = tuple(f"{s.value}_at" for s in BulkState if s != BulkState.validating)


def entry_for(rec: Record, *, job_id: str | None = None, question: str | None = None,
              error: ErrorInfo | None = None, param: str | None = None) -> Entry:
    """A line's entry: its job, or the error that refused it (and the request field at fault, ``param``,
    where there is one: a Batch API line's error names it as the chat endpoint does)."""
    asked = question or (rec.question if isinstance(rec.question, str) else None)
    image = rec.image if isinstance(rec.image, str) else None
    entry: Entry = {"n": rec.line, "c": rec.custom_id, "q": asked, "i": image}
    if rec.pdf is not None:
        entry.update(f=rec.pdf, p=rec.page)
    if job_id:
        entry["j"] = job_id
    if error:
        entry["e"] = {"code": error.code, "message": error.message, **({"param": param} if param else {})}
    return entry


class Records:
    """Read and write bulks and their lines. Jobs are read through ``jobs``."""

    def __init__(self, client: redis.Redis, jobs: JobStore, ttl_s: int) -> None:
        self.redis = client
        self.jobs = jobs
        self.ttl_s = ttl_s
        self._set_state = client.register_script(_SET_STATE)
        self._advance = client.register_script(_ADVANCE)

    @staticmethod
    def lock_key(bulk_id: str) -> str:
        return PREFIX + bulk_id + ":lock"

    @staticmethod
    def hook_lock_key(bulk_id: str) -> str:
        return PREFIX + bulk_id + ":hook"

    # -- the bulk ----------------------------------------------------------------------------------------
    def exists(self, bulk_id: str) -> bool:
        with redis_errors():
            return bool(self.redis.exists(PREFIX + bulk_id))

    def find(self, bulk_id: str) -> Bulk | None:
        with redis_errors():
            f: dict[str, str] = self.redis.hgetall(PREFIX + bulk_id)
        if not f:
            return None
        queued, rejected = int(f.get("queued", 0)), int(f.get("rejected", 0))
        counts = RequestCounts(total=int(f.get("total", 0)), completed=int(f.get("completed", 0)),
                               failed=int(f.get("failed", 0)))
        openai = None
        if f.get("openai"):
            files = {k: f[k] for k in ("output_file_id", "error_file_id") if f.get(k)}
            openai = OpenAIBatch.model_validate({**json.loads(f["openai"]), **files})
        return Bulk(id=bulk_id, state=BulkState(f["state"]), input=f.get("input", ""), owner=f.get("owner", ""),
                    request_counts=counts, submitted=queued + rejected, queued=queued, rejected=rejected,
                    created_at=float(f["created_at"]), expires_at=float(f["expires_at"]),
                    errors=json.loads(f.get("errors", "[]")), input_errors=json.loads(f.get("input_errors", "[]")),
                    output_key=f.get("output_key"), errors_key=f.get("errors_key"),
                    metadata=json.loads(f.get("metadata", "{}")), openai=openai,
                    webhook=WebhookView.model_validate_json(f["webhook"]) if f.get("webhook") else None,
                    **{k: float(f[k]) for k in _TIMES if f.get(k)})

    def get(self, bulk_id: str) -> Bulk:
        bulk = self.find(bulk_id)
        if bulk is None:
            raise NotFound(f"no bulk {bulk_id!r} (never created, or expired)", code="bulk_not_found")
        return bulk

    def recent(self, limit: int = 20) -> list[Bulk]:
        """The newest bulks first."""
        with redis_errors():
            ids: list[str] = self.redis.zrevrange(INDEX, 0, max(0, limit - 1))
        return self._existing(INDEX, ids)

    def owned(self, owner: str, limit: int = 20, after: str | None = None) -> tuple[list[Bulk], bool]:
        """The owner's bulks, newest first, from just after the bulk ``after`` (a cursor: bulks created
        since do not shift the page); and whether there are more."""
        index = BY_OWNER + owner
        with redis_errors():
            start = 0
            if after is not None:
                rank = self.redis.zrevrank(index, after)
                if rank is None:
                    return [], False
                start = rank + 1
            ids: list[str] = self.redis.zrevrange(index, start, start + limit)  # one more: is there a next page
        return self._existing(index, ids[:limit]), len(ids) > limit

    def _existing(self, index: str, ids: list[str]) -> list[Bulk]:
        """The bulks of ``ids`` that still exist; the expired ones leave ``index``."""
        bulks = [b for b in (self.find(i) for i in ids) if b is not None]
        gone = set(ids) - {b.id for b in bulks}
        if gone:
            with redis_errors():
                self.redis.zrem(index, *gone)
        return bulks

    def create(self, bulk_id: str, *, name: str, owner: str, window_s: float, metadata: dict[str, str],
               openai: OpenAIBatch | None = None) -> None:
        """A new bulk, ``validating``."""
        key, now = PREFIX + bulk_id, time.time()
        fields = {"state": BulkState.validating.value, "input": name, "owner": owner, "created_at": repr(now),
                  "expires_at": repr(now + window_s), "metadata": json.dumps(metadata, ensure_ascii=False)}
        if openai is not None:
            fields["openai"] = openai.model_dump_json()
        with redis_errors():
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self.ttl_s)
            pipe.zadd(INDEX, {bulk_id: now})
            pipe.zadd(BY_OWNER + owner, {bulk_id: now})
            pipe.expire(BY_OWNER + owner, self.ttl_s)
            pipe.execute()

    def validated(self, bulk_id: str, total: int, problems: list[InputError]) -> None:
        """Record the input's line count and what refuses it; ``failed`` if anything does, else ``in_progress``."""
        shown = problems[:1000]
        with redis_errors():
            self.redis.hset(PREFIX + bulk_id, mapping={
                "total": total, "errors": json.dumps([p.text for p in shown], ensure_ascii=False),
                "input_errors": json.dumps([p.model_dump() for p in shown], ensure_ascii=False)})
        self.set_state(bulk_id, BulkState.failed if problems else BulkState.in_progress, BulkState.validating)

    def set_state(self, bulk_id: str, state: BulkState, *leaving: BulkState) -> bool:
        """Move to ``state`` (recording when) if the bulk is in one of ``leaving``; whether it moved."""
        with redis_errors():
            moved = self._set_state(keys=[PREFIX + bulk_id], args=[state.value, repr(time.time()),
                                                                   *(s.value for s in leaving)])
        return bool(moved)

    def set_outputs(self, bulk_id: str, output_key: str, errors_key: str, *, output_file_id: str | None = None,
                    error_file_id: str | None = None) -> None:
        """Where the bulk's result files are: its two files in the results bucket, and for a batch created
        over HTTP its output and error files (``files``), if it has lines for them."""
        fields = {"output_key": output_key, "errors_key": errors_key, "output_file_id": output_file_id or "",
                  "error_file_id": error_file_id or ""}
        with redis_errors():
            self.redis.hset(PREFIX + bulk_id, mapping=fields)

    def outputs_stale(self, bulk_id: str) -> None:
        """Lines were recorded after the bulk's result files were stored: the next refresh stores them again."""
        with redis_errors():
            self.redis.hdel(PREFIX + bulk_id, "output_key", "errors_key")

    def set_webhook(self, bulk_id: str, webhook: WebhookView) -> None:
        """Record the state of the bulk's webhook delivery."""
        with redis_errors():
            self.redis.hset(PREFIX + bulk_id, "webhook", webhook.model_dump_json(exclude_none=True))

    # -- counting ----------------------------------------------------------------------------------------
    def cursor(self, bulk_id: str) -> tuple[int, int, int]:
        """Lines counted in order so far, and how many of those completed and failed."""
        with redis_errors():
            f = self.redis.hmget(PREFIX + bulk_id, ["cursor", "cursor_completed", "cursor_failed"])
        cursor, completed, failed = (int(v or 0) for v in f)
        return cursor, completed, failed

    def advance(self, bulk_id: str, cursor: tuple[int, int, int], completed: int, failed: int) -> None:
        """Move the cursor forward (never back: two refreshes may race) and set the counts shown."""
        with redis_errors():
            self._advance(keys=[PREFIX + bulk_id], args=[*cursor, completed, failed])

    # -- lines -------------------------------------------------------------------------------------------
    def append(self, bulk_id: str, entry: Entry) -> None:
        """Record the next input line (``queued`` if it has a job, else ``rejected``)."""
        self.append_many(bulk_id, [entry])

    def append_many(self, bulk_id: str, entries: list[Entry]) -> None:
        """Record the next input lines, all or none (one transaction, one round trip)."""
        if not entries:
            return
        key = PREFIX + bulk_id
        queued = sum(1 for e in entries if e.get("j"))
        with redis_errors():
            pipe = self.redis.pipeline(transaction=True)
            pipe.rpush(key + ":lines", *(json.dumps(e, ensure_ascii=False) for e in entries))
            pipe.hincrby(key, "queued", queued)
            pipe.hincrby(key, "rejected", len(entries) - queued)
            pipe.expire(key + ":lines", self.ttl_s)
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def pages(self, bulk_id: str, start: int = 0) -> Iterator[list[tuple[Entry, JobResult | None]]]:
        """The lines from ``start`` on with their jobs' states, ``PAGE`` lines at a time."""
        while entries := self._entries(bulk_id, start, start + PAGE):
            yield list(zip(entries, self._jobs_of(entries)))
            start += len(entries)

    def _entries(self, bulk_id: str, start: int, stop: int) -> list[Entry]:
        with redis_errors():
            return [json.loads(e) for e in self.redis.lrange(PREFIX + bulk_id + ":lines", start, stop - 1)]

    def _jobs_of(self, entries: list[Entry]) -> list[JobResult | None]:
        ids = [e["j"] for e in entries if e.get("j")]
        found = self.jobs.get_many(ids) if ids else {}
        return [found[e["j"]] if e.get("j") else None for e in entries]
