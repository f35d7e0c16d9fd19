"""Job state in Redis under tuwen's own keys, with a TTL.

Celery's PENDING means both "queued" and "never heard of it", and ``AsyncResult.get()`` stalled about
a second per call here, so the record of truth is ours: one hash per job, changed only by small Lua
scripts so that a redelivered or duplicated message can never overwrite a finished result, and a
publish on ``tuwen:done:<id>`` when a job ends, which ``wait`` listens for.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from tuwen.pipeline import keys, sentinel
from tuwen.pipeline.errors import Forbidden, InvalidInput, Unavailable
from tuwen.pipeline.schema import ErrorInfo, JobRequest, JobResult, JobStatus

log = logging.getLogger(__name__)

PREFIX = keys.JOB
TERMINAL = ("succeeded", "failed", "cancelled")

# KEYS[1]=job, then its pictures' reference sets; ARGV: ttl, job id, then the record's field/value pairs.
# Writes a record only where there is none (a retry queueing a job again under its reserved id keeps
# the first one, whatever became of it). Returns 1 if written, 0 if a record was there.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[1])
for i = 2, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[2])
  redis.call('EXPIRE', KEYS[i], ARGV[1])
end
return 1
"""

# KEYS[1]=job; ARGV: now, worker, max_attempts, ttl, stage ('' = any). Returns {state, attempts}; the state is
# 'moved' when the job has left the stage asked for (a speech message redelivered after its hand-on).
_CLAIM = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return {'missing', 0} end
if s == 'succeeded' or s == 'failed' or s == 'cancelled' then return {s, 0} end
if ARGV[5] and ARGV[5] ~= '' and (redis.call('HGET', KEYS[1], 'stage') or 'picture') ~= ARGV[5] then
  return {'moved', 0}
end
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {'running', n}
"""

# KEYS[1]=job; ARGV: the request as handed on, ttl. The speech stage's hand-on to the picture stage: a running
# job of the speech stage is queued again for the picture stage, its attempts counted afresh. Returns 1 if
# handed on, 0 if the job has ended or moved meanwhile.
_HAND_ON = """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'running' and s ~= 'queued' then return 0 end
if redis.call('HGET', KEYS[1], 'stage') ~= 'speech' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'stage', 'picture', 'request', ARGV[1], 'attempts', 0)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

#: How long a job's stream (``streams``) is kept after its last entry.
STREAM_TTL_S = 600
#: Most entries a stream keeps (an answer is at most MAX_NEW_TOKENS pieces, plus the end entries).
STREAM_MAX_LEN = 8192

# A job that streams (its record says ``stream``) also gets an ``ended`` entry on its stream when it ends, in the
# same script: a reader blocked on the stream wakes at once, also for an answer that never streamed (from the
# answer cache, a failure before the first token, a cancel). KEYS[2]=stream; ARGV[6]=its TTL.
_STREAM_ENDED = """
if redis.call('HGET', KEYS[1], 'stream') == '1' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', '%d', '*', 'ended', ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
""" % STREAM_MAX_LEN

# KEYS[1]=job, KEYS[2]=stream; ARGV: status, result json, now, ttl, channel, stream ttl. Returns 1 if written,
# 0 if already final.
_FINISH = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return -1 end
if s == 'succeeded' or s == 'failed' or s == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'result', ARGV[2], 'finished_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[1])
""" + _STREAM_ENDED + """
return 1
"""

# KEYS[1]=job, KEYS[2]=stream; ARGV: 'cancelled', result json, now, channel, '', stream ttl. Cancels a queued
# job; flags a running one.
_CANCEL = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return 'missing' end
if s == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'result', ARGV[2], 'finished_at', ARGV[3])
  redis.call('PUBLISH', ARGV[4], 'cancelled')
""" + _STREAM_ENDED + """
  return 'cancelled'
end
if s == 'running' then redis.call('HSET', KEYS[1], 'cancel_requested', '1') end
return s
"""

# KEYS[1]=job. Puts a running job back to queued (storage unreachable: not the job's fault, so the
# attempt is not counted) unless it has ended meanwhile.
_REQUEUE = """
local s = redis.call('HGET', KEYS[1], 'status')
if s == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'queued')
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
  return 1
end
return 0
"""


# KEYS[1]=job; ARGV: owner ('' = any), ref prefix, job prefix, image-owner prefix. Deletes the job;
# returns {'deleted', job owner, image, fate, image, fate, …} or {'missing'} / {'forbidden'}. An image's
# fate: 'gone' (no job uses it any more: the caller deletes the object), 'released' (none of this
# owner's jobs uses it: the owner loses its claim on it) or 'kept'.
_DELETE = """
local f = redis.call('HMGET', KEYS[1], 'owner', 'image_keys', 'image_key')
if not f[1] then return {'missing'} end
if ARGV[1] ~= '' and f[1] ~= ARGV[1] then return {'forbidden'} end
redis.call('DEL', KEYS[1])
local id = string.sub(KEYS[1], string.len(ARGV[3]) + 1)
local out = {'deleted', f[1]}
for image in string.gmatch(f[2] or f[3] or '', '[^\\n]+') do
  local ref = ARGV[2] .. image
  redis.call('SREM', ref, id)
  local fate = 'released'
  if redis.call('SCARD', ref) == 0 then
    redis.call('DEL', ref, ARGV[4] .. image)
    fate = 'gone'
  else
    for _, other in ipairs(redis.call('SMEMBERS', ref)) do
      if redis.call('HGET', ARGV[3] .. other, 'owner') == f[1] then fate = 'kept'; break end
    end
    if fate == 'released' then redis.call('SREM', ARGV[4] .. image, f[1]) end
  end
  table.insert(out, image)
  table.insert(out, fate)
end
return out
"""

#: ``<image key>`` → the ids of the jobs that use the image (it is deleted with the last of them).
IMAGE_REFS = keys.IMAGE_REFS
#: ``<image key>`` → the owners who stored that picture; only they may name the key in a job.
IMAGE_OWNERS = keys.IMAGE_OWNERS
#: Answer-cache entries live under ``tuwen:cache:<image digest>:<owner digest>:<entry digest>``, grouped by
#: image and owner so that deleting an image, or an owner's last job on it, can find the cached answers.
CACHE = keys.CACHE


def cache_prefix(image_key: str, owner: str | None = None) -> str:
    """Where the cached answers about one image live (all owners', or one owner's)."""
    prefix = f"{CACHE}{hashlib.sha256(image_key.encode()).hexdigest()[:16]}:"
    return prefix if owner is None else prefix + hashlib.sha256(owner.encode()).hexdigest()[:16] + ":"


def connect(url: str) -> redis.Redis:
    """A Redis client that rides out a dropped connection (one Redis restart) and reports an unreachable
    Redis within about 1.5 s: a refused connection is retried twice within 0.6 s, a connect that times
    out is not retried (it was 6 retries over 7-8 s). Reads time out after 30 s; idle connections are
    health-checked before reuse. A ``redis+sentinel://`` URL gives a client of the current primary, which
    follows it through a failover (``tuwen.pipeline.sentinel``)."""
    options: dict[str, Any] = dict(
        decode_responses=True,
        socket_connect_timeout=1.5,
        socket_timeout=30,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.1), retries=2, supported_errors=(redis.ConnectionError,)),
    )
    try:
        target = sentinel.parse(url)
        return sentinel.primary(target, **options) if target else redis.Redis.from_url(url, **options)
    except ValueError as exc:  # e.g. a URL without a scheme; the message does not repeat the URL
        raise InvalidInput(f"invalid Redis URL: {exc}", code="invalid_setting") from exc


def outage(message: str, cause: BaseException, **options: Any) -> Unavailable:
    """``Unavailable(message)``, ``cause`` logged as a warning: its text names hosts, ports and paths,
    which the message does not (it reaches HTTP clients)."""
    log.warning("%s: %s", message, cause)
    return Unavailable(message, **options)


@contextmanager
def redis_errors() -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise outage("Redis is not reachable", exc) from exc


#: The fields of a job's hash that ``_from_fields`` reads.
_STATE = ("status", "result", "attempts", "owner", "image_key", "worker", "created_at", "started_at", "stage")


def _create_args(request: JobRequest, ttl_s: int) -> tuple[list[str], list[Any]]:
    """``_CREATE``'s keys and arguments for a job: its record's fields, and the references of its pictures."""
    images = list(dict.fromkeys(request.image_keys + request.audio_keys))  # a spoken question is stored alike
    fields = {
        "status": JobStatus.queued.value,
        "request": request.model_dump_json(),
        "owner": request.owner,
        "image_key": request.image_key or "",
        "image_keys": "\n".join(images),
        "created_at": repr(request.created_at),
        "attempts": 0,
        **({"stream": "1"} if request.stream else {}),
        **({"stage": request.stage.value} if request.audio_keys else {}),
    }
    return [_key(request.id), *(IMAGE_REFS + image for image in images)], [ttl_s, request.id,
                                                                         *(x for kv in fields.items() for x in kv)]


def _key(job_id: str) -> str:
    return PREFIX + job_id


def no_such_job(job_id: str) -> Forbidden:
    """The one error for a job that does not exist and for another owner's job: the two must read
    alike (code, message and exit status), or the answer tells whether someone else's job exists."""
    return Forbidden(f"no job {job_id}", code="not_found")


def _channel(job_id: str) -> str:
    return keys.DONE + job_id


def stream_key(job_id: str) -> str:
    return keys.STREAM + job_id


def _wake_tokens(pipe: Any, queue: str, count: int) -> Any:
    """Add to ``pipe`` ``count`` wake tokens for ``queue``'s idle workers, the list kept to ``keys.WAKE_CAP``."""
    return pipe.lpush(keys.WAKE + queue, *[1] * min(count, keys.WAKE_CAP)).ltrim(keys.WAKE + queue, 0,
                                                                                  keys.WAKE_CAP - 1)


class JobStore:
    """Create, claim, finish, cancel, read and wait for jobs."""

    def __init__(self, client: redis.Redis, ttl_s: int, replicas: int = 0, replicas_timeout_ms: int = 1000) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        #: Replicas that must hold a job's record and its result before anyone is told (``WAIT``; 0: off).
        self.replicas, self.replicas_timeout_ms = replicas, replicas_timeout_ms
        self._create = client.register_script(_CREATE)
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._cancel = client.register_script(_CANCEL)
        self._requeue = client.register_script(_REQUEUE)
        self._delete = client.register_script(_DELETE)
        self._hand_on = client.register_script(_HAND_ON)

    # -- producer side -------------------------------------------------------------------------------
    def create(self, request: JobRequest) -> bool:
        """Record a new job (False, and nothing changed, if a record with its id is there already)."""
        with redis_errors():
            return bool(self._create(*_create_args(request, self.ttl_s)))

    def create_many(self, requests: Iterable[JobRequest]) -> None:
        """``create`` for many jobs (a bulk's batch), in one round trip."""
        with redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            for request in requests:
                self._create(*_create_args(request, self.ttl_s), client=pipe)
            pipe.execute()

    def queued(self, job_id: str, wake: str | None = None) -> None:
        """Note that the job's message is on its queue (``queued_at``: a retry of its request then does not
        publish it again), push a wake token for an idle worker of the queue ``wake``, and with replicas to
        wait for, wait until they hold the record and the message (``WAIT`` covers every write before this
        one: replication is one stream). One round trip."""
        self.queued_many([job_id], wake)

    def queued_many(self, job_ids: list[str], wake: str | None = None) -> None:
        """``queued`` for jobs of one queue (a bulk's batch): one round trip, a wake token a job (up to the
        cap), one ``WAIT``."""
        if not job_ids:
            return
        now = repr(time.time())
        with redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hset(_key(job_id), "queued_at", now)
            if wake is not None:
                _wake_tokens(pipe, wake, len(job_ids))
            if self.replicas:
                pipe.execute_command("WAIT", self.replicas, self.replicas_timeout_ms)
            replies = pipe.execute()
        if self.replicas:
            what = f"job {job_ids[0]}" if len(job_ids) == 1 else f"{len(job_ids)} jobs from {job_ids[0]}"
            self._replicated(replies[-1], what)

    def was_queued(self, job_id: str) -> bool:
        """Whether the job's message was published (``queued``), as far as the record says."""
        with redis_errors():
            return bool(self.redis.hexists(_key(job_id), "queued_at"))

    def wake(self, queue: str) -> None:
        """Push a wake token for an idle worker of ``queue`` (``keys.WAKE``). A token that cannot be pushed
        costs that worker at most a second (its wait's timeout), so failing here fails nothing."""
        try:
            _wake_tokens(self.redis.pipeline(transaction=False), queue, 1).execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.debug("no wake token for %s: %s", queue, exc)

    def _replicated(self, acked: Any, what: str) -> None:
        """A ``WAIT``'s reply: fewer replicas than asked within the timeout is logged, counted and refused
        (``Unavailable``, retryable). The write is on this server, but a server that is no longer the primary
        (frozen while the sentinels promoted another, then thawed) has no replica left, and its writes are
        dropped when it rejoins as a replica: nobody may be told of them. The caller retries; a write that did
        survive is found by the retry (records are created only where none exists, results are kept first)."""
        if int(acked) < self.replicas:
            sentinel.counts.unreplicated(what, int(acked), self.replicas, self.replicas_timeout_ms)
            raise Unavailable(f"Redis did not confirm that a replica holds {what} within "
                              f"{self.replicas_timeout_ms} ms (TUWEN_REDIS_REPLICAS_ACK={self.replicas}); try again")

    def delete(self, job_id: str, owner: str | None = None) -> tuple[str, dict[str, str]]:
        """Remove the job's record and result. Returns the job's owner and each of its images' fate:
        ``gone`` (no job uses it any more: the caller deletes the object), ``released`` (none of
        this owner's jobs uses it any more) or ``kept``. ``("", {})`` if there was no such job."""
        with redis_errors():
            out = self._delete(keys=[_key(job_id)], args=[owner or "", IMAGE_REFS, PREFIX, IMAGE_OWNERS])
        if out[0] == "forbidden":
            raise no_such_job(job_id)
        if out[0] == "missing":
            return "", {}
        return str(out[1]), {str(k): str(v) for k, v in zip(out[2::2], out[3::2])}

    def add_image_owner(self, image_key: str, owner: str, ttl_s: int) -> None:
        """Record that ``owner`` stored this picture, for at least ``ttl_s`` (the picture's life)."""
        key = IMAGE_OWNERS + image_key
        with redis_errors():
            pipe = self.redis.pipeline(transaction=True)
            pipe.sadd(key, owner)
            pipe.expire(key, ttl_s)
            pipe.execute()

    def is_image_owner(self, image_key: str, owner: str) -> bool:
        with redis_errors():
            return bool(self.redis.sismember(IMAGE_OWNERS + image_key, owner))

    def image_owners(self, image_keys: list[str], owner: str) -> list[bool]:
        """``is_image_owner`` for each key, in one round trip."""
        with redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            for key in image_keys:
                pipe.sismember(IMAGE_OWNERS + key, owner)
            return [bool(x) for x in pipe.execute()]

    def request(self, job_id: str) -> JobRequest | None:
        with redis_errors():
            raw = self.redis.hget(_key(job_id), "request")
        return JobRequest.model_validate_json(raw) if raw else None

    def get(self, job_id: str, owner: str | None = None) -> JobResult:
        """The job's current state; ``unknown`` when there is no record (or it is not ``owner``'s)."""
        with redis_errors():
            fields = self.redis.hgetall(_key(job_id))
        return self._from_fields(job_id, fields, owner)

    def get_many(self, job_ids: Iterable[str], owner: str | None = None) -> dict[str, JobResult]:
        """``get`` for many jobs, in one round trip. Only the fields that say how a job stands are read, not its
        request (the largest: reading it made a bulk's progress check a fifth of its submission, profiled)."""
        ids = list(job_ids)
        with redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hmget(_key(job_id), _STATE)
            rows = pipe.execute()
        fields = ({k: v for k, v in zip(_STATE, row) if v is not None} for row in rows)
        return {job_id: self._from_fields(job_id, f, owner) for job_id, f in zip(ids, fields)}

    @staticmethod
    def _from_fields(job_id: str, f: dict[str, str], owner: str | None) -> JobResult:
        if not f:
            return JobResult.unknown(job_id)
        if owner is not None and f.get("owner") != owner:
            raise no_such_job(job_id)
        if f.get("result"):
            return JobResult.model_validate_json(f["result"])
        return JobResult(
            id=job_id,
            status=JobStatus(f["status"]),
            attempts=int(f.get("attempts", 0)),
            owner=f.get("owner"),
            image_key=f.get("image_key") or None,
            worker=f.get("worker"),
            created_at=float(f["created_at"]) if f.get("created_at") else None,
            started_at=float(f["started_at"]) if f.get("started_at") else None,
            stage=f.get("stage") or None,
        )

    def cancel(self, job_id: str, owner: str | None = None) -> JobResult:
        """Cancel a queued job (it will never run); a running job finishes and says so."""
        current = self.get(job_id, owner)
        if current.status != JobStatus.queued:
            if current.status == JobStatus.running:
                with redis_errors():
                    self._cancel(keys=[_key(job_id), stream_key(job_id)], args=["", "", "", "", "", STREAM_TTL_S])
            return current
        result = current.model_copy(update={
            "status": JobStatus.cancelled, "finished_at": time.time(),
            "error": ErrorInfo(code="cancelled", message="the job was cancelled before it ran")})
        with redis_errors():
            self._cancel(keys=[_key(job_id), stream_key(job_id)], args=[
                "cancelled", result.model_dump_json(), repr(time.time()), _channel(job_id), "", STREAM_TTL_S])
        return self.get(job_id)

    def wait(self, job_id: str, timeout: float, owner: str | None = None) -> JobResult:
        """Block until the job ends or ``timeout`` seconds pass; returns its state either way."""
        return self.wait_many([job_id], timeout, owner)[job_id]

    def wait_many(self, job_ids: Iterable[str], timeout: float, owner: str | None = None) -> dict[str, JobResult]:
        """Wait for several jobs at once over one pub/sub connection (re-checked every second, so a
        missed message, e.g. across a Redis restart, costs at most a second)."""
        ids = list(job_ids)
        deadline = time.monotonic() + timeout
        with redis_errors():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            with redis_errors():
                if len(ids) <= 64:
                    pubsub.subscribe(*[_channel(i) for i in ids])
                else:
                    pubsub.psubscribe(keys.DONE + "*")
            results = self.get_many(ids, owner)
            pending = {i for i, r in results.items() if not r.status.terminal and r.status != JobStatus.unknown}
            last_poll = time.monotonic()
            while pending and time.monotonic() < deadline:
                try:
                    msg = pubsub.get_message(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(0.5)
                    pubsub = self._resubscribe(pubsub, pending)
                    msg = None
                changed: set[str] = set()
                while msg:  # every notice already here, so jobs that ended together are read together
                    if msg.get("type") in ("message", "pmessage"):
                        job_id = str(msg["channel"])[len(keys.DONE):]
                        if job_id in pending:
                            changed.add(job_id)
                    try:
                        msg = pubsub.get_message(timeout=0)
                    except (redis.ConnectionError, redis.TimeoutError):
                        msg = None
                if time.monotonic() - last_poll >= 1.0:
                    changed |= pending
                    last_poll = time.monotonic()
                if changed:
                    try:
                        fresh = self.get_many(changed, owner)
                    except Unavailable:
                        continue
                    results.update(fresh)
                    pending -= {i for i, r in fresh.items() if r.status.terminal or r.status == JobStatus.unknown}
            return results
        finally:
            try:
                pubsub.close()
            except redis.RedisError:
                pass

    def _resubscribe(self, old: Any, pending: set[str]) -> Any:
        try:
            old.close()
        except redis.RedisError:
            pass
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(*[_channel(i) for i in list(pending)[:64]])
        except (redis.ConnectionError, redis.TimeoutError):
            pass
        return pubsub

    # -- worker side -----------------------------------------------------------------------------------
    def claim(self, job_ids: list[str], worker: str, stage: str = "") -> dict[str, tuple[str, int]]:
        """Mark jobs running; returns ``{id: (state, attempts)}``. A state other than ``running``
        (finished, cancelled, missing, or ``moved`` on from ``stage``) means: do not run it again."""
        now = repr(time.time())
        with redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            for job_id in job_ids:
                self._claim(keys=[_key(job_id)], args=[now, worker, 0, self.ttl_s, stage], client=pipe)
            rows = pipe.execute()
        return {job_id: (str(r[0]), int(r[1])) for job_id, r in zip(job_ids, rows)}

    def finish(self, results: list[JobResult]) -> list[bool]:
        """Write terminal results; a job that already ended keeps its first result (returns False)."""
        if not results:
            return []
        now = repr(time.time())
        with redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            for r in results:
                self._finish(keys=[_key(r.id), stream_key(r.id)], args=[
                    r.status.value, r.model_dump_json(), now, self.ttl_s, _channel(r.id), STREAM_TTL_S], client=pipe)
            if self.replicas:
                pipe.execute_command("WAIT", self.replicas, self.replicas_timeout_ms)
            rows = pipe.execute()
            if self.replicas:
                self._replicated(rows.pop(), f"the results of {len(results)} jobs")
            return [int(x) == 1 for x in rows]

    def hand_on(self, requests: list[JobRequest]) -> list[bool]:
        """The speech stage is done with these jobs (their messages for the picture queue are published):
        each is queued again for the picture stage, as handed on. False for a job that ended meanwhile."""
        with redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            for request in requests:
                self._hand_on(keys=[_key(request.id)], args=[request.model_dump_json(), self.ttl_s], client=pipe)
            return [int(x) == 1 for x in pipe.execute()]

    def requeue(self, job_ids: list[str]) -> None:
        with redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            for job_id in job_ids:
                self._requeue(keys=[_key(job_id)], client=pipe)
            pipe.execute()

    def cancel_requested(self, job_id: str) -> bool:
        with redis_errors():
            return bool(self.redis.hget(_key(job_id), "cancel_requested") == "1")
