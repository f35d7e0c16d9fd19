"""API keys for the HTTP gateway: Bearer tokens, stored hashed in Redis, each key one owner.

A token reads ``sk-tw-<key id>-<secret>``: it starts with ``sk-``, as clients that check a key's shape
(VLMEvalKit's OpenAI wrapper) insist. Tokens made before read ``tw_<key id>_<secret>`` and keep working.
Redis keeps only the token's SHA-256 (the token has 256 bits of randomness, so a slow hash adds nothing)
under ``tuwen:apikey:id:<key id>``; a Redis dump holds no usable token. The key id is public: it names
the key in ``tuwen keys list`` and ``revoke``. Several keys may share an owner (rotation); jobs belong to
owners, not keys.

Rate limit: a sliding window per key, the key's own limit or the gateway's default: no 60 s span
passes more than the limit (a fixed wall-clock minute let twice the limit through across a minute's
end). Each key keeps a log of the times of its allowed requests (a sorted set); one Lua script drops
the times older than the window, counts the rest and adds the new one if there is room. The gateway
counts submits, cancels and reads that find no job (reading one's own jobs is free). ``Idempotency``
maps a caller's ``Idempotency-Key`` to its job, per owner.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis

from tuwen.pipeline import keys
from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import InvalidInput, NotFound, TuwenError
from tuwen.pipeline.jobs import redis_errors

_IDS = keys.API_KEY + "ids"
#: The rate limit's window, in seconds.
WINDOW_S = 60
#: KEYS: the key's log of allowed requests (sorted set, scored by time), the key's record. ARGV: now, the
#: window's start (older times leave the log), the limit (0: none), a name for this request. Returns
#: nothing when the request is allowed (and logged), else the time of the oldest logged one.
_HIT = """
redis.call('HSET', KEYS[2], 'last_used_at', ARGV[1])
local limit = tonumber(ARGV[3])
if limit <= 0 then return false end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
  return false
end
return redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
"""
#: The token's prefix: ``sk-`` first, as OpenAI's keys (some clients refuse any other), then ``tw-``.
PREFIX = "sk-tw-"
#: A token, new (``sk-tw-<id>-<secret>``) or made before the ``sk-`` prefix (``tw_<id>_<secret>``); the
#: key id is always 12 hex digits, so the secret's own ``-`` and ``_`` cannot blur where it ends.
_TOKEN = re.compile(r"^(?:sk-tw-([0-9a-f]{12})-|tw_([0-9a-f]{12})_)[A-Za-z0-9_-]{20,128}$")
_OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


@dataclass(frozen=True)
class ApiKey:
    id: str
    owner: str
    name: str
    created_at: float
    revoked_at: float | None = None
    last_used_at: float | None = None
    #: Requests per minute for this key; None: the gateway's ``rate_limit_per_minute``.
    rate_limit_per_minute: int | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "owner": self.owner, "name": self.name, "created_at": self.created_at,
                "revoked_at": self.revoked_at, "last_used_at": self.last_used_at,
                "rate_limit_per_minute": self.rate_limit_per_minute, "active": self.active}


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _record(key_id: str) -> str:
    return f"{keys.API_KEY}id:{key_id}"


def _opt_float(value: str | None) -> float | None:
    return float(value) if value else None


class KeyStore:
    """Create, list, revoke and check API keys (``redis`` is a ``decode_responses=True`` client)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._hit = client.register_script(_HIT)

    def create(self, owner: str, name: str = "", rate_limit_per_minute: int | None = None) -> tuple[ApiKey, str]:
        """A new key for ``owner``; returns it and the token, which is shown only this once."""
        if not _OWNER.match(owner):
            raise InvalidInput("owner must be 1-128 characters of letters, digits and . _ : @ -", code="invalid_owner")
        if rate_limit_per_minute is not None and rate_limit_per_minute < 0:
            raise InvalidInput("rate limit must be 0 (unlimited) or more", code="invalid_params")
        key_id = secrets.token_hex(6)
        token = f"{PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
        key = ApiKey(id=key_id, owner=owner, name=name[:200], created_at=time.time(),
                     rate_limit_per_minute=rate_limit_per_minute)
        fields = {"hash": token_hash(token), "owner": owner, "name": key.name, "created_at": repr(key.created_at)}
        if rate_limit_per_minute is not None:
            fields["rate_limit_per_minute"] = str(rate_limit_per_minute)
        with redis_errors():
            pipe = self.redis.pipeline()
            pipe.hset(_record(key_id), mapping=fields)
            pipe.sadd(_IDS, key_id)
            pipe.execute()
        return key, token

    def get(self, key_id: str) -> ApiKey | None:
        with redis_errors():
            fields = self.redis.hgetall(_record(key_id))
        return self._from_fields(key_id, fields) if fields else None

    def list(self) -> list[ApiKey]:
        with redis_errors():
            ids = sorted(self.redis.smembers(_IDS))
        found = [self.get(i) for i in ids]
        return sorted((k for k in found if k is not None), key=lambda k: k.created_at)

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key for good (it stays listed, marked revoked)."""
        with redis_errors():
            if not self.redis.exists(_record(key_id)):
                raise NotFound(f"no API key {key_id!r}")
            self.redis.hsetnx(_record(key_id), "revoked_at", repr(time.time()))
        key = self.get(key_id)
        assert key is not None
        return key

    def authenticate(self, token: str) -> ApiKey | None:
        """The active key this token belongs to, or None (unknown, malformed, wrong secret, revoked)."""
        match = _TOKEN.match(token)
        if not match:
            return None
        key_id = match.group(1) or match.group(2)
        with redis_errors():
            fields = self.redis.hgetall(_record(key_id))
        if not fields or not hmac.compare_digest(str(fields.get("hash", "")), token_hash(token)):
            return None
        key = self._from_fields(key_id, fields)
        return key if key.active else None

    def hit(self, key: ApiKey, default_limit: int, now: float | None = None) -> float:
        """Count one request; returns 0 when allowed, else the seconds until the oldest request in the
        window leaves it (a refused request is not counted)."""
        limit = default_limit if key.rate_limit_per_minute is None else key.rate_limit_per_minute
        now = time.time() if now is None else now
        with redis_errors():
            oldest = self._hit(keys=[f"{keys.API_KEY}rate:{key.id}", _record(key.id)],
                               args=[repr(now), repr(now - WINDOW_S), limit, f"{now!r}:{secrets.token_hex(6)}",
                                     WINDOW_S])
        if oldest is None:
            return 0.0
        return float(max(1, math.ceil(float(oldest) + WINDOW_S - now)))

    @staticmethod
    def _from_fields(key_id: str, f: dict[str, str]) -> ApiKey:
        limit = f.get("rate_limit_per_minute")
        return ApiKey(id=key_id, owner=f.get("owner", ""), name=f.get("name", ""),
                      created_at=float(f.get("created_at") or 0), revoked_at=_opt_float(f.get("revoked_at")),
                      last_used_at=_opt_float(f.get("last_used_at")),
                      rate_limit_per_minute=int(limit) if limit else None)


class Conflict(TuwenError):
    """The same request is being handled right now; retry shortly."""

    code = "idempotency_in_progress"
    retryable = True


@dataclass(frozen=True)
class Claim:
    """What an ``Idempotency-Key`` says about a request: the job id it stands for, and whether this request
    is the first with the key (``new``), a request with it queued that job (``done``), or one began it and
    may have died before it said so (``pending``: a gateway killed mid-request)."""

    job_id: str
    state: str


class Idempotency:
    """``Idempotency-Key`` → job id, per owner, for a TTL (Stripe-style): a retry gets the first job; the
    same key on a different request is refused. The first request reserves the job id before it queues
    anything, so a retry on another gateway while the first is in flight, or after its gateway was
    killed, ends up with the same job (queued again under that id if the first never stored it; a record
    is never overwritten and a job runs once whatever its messages): none is created twice, and no retry
    waits out a dead gateway. A request that fails releases its key, so the client can fix it."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis, self.ttl_s = client, ttl_s

    @staticmethod
    def key(owner: str, idem: str) -> str:
        return keys.IDEMPOTENCY + hashlib.sha256(f"{owner}\0{idem}".encode()).hexdigest()

    def begin(self, owner: str, idem: str, fingerprint: str, prefix: str = "") -> Claim:
        reserved = prefix + uuid.uuid4().hex
        with redis_errors():
            for _ in range(3):
                if self.redis.set(self.key(owner, idem), json.dumps({"fp": fingerprint, "job_id": reserved,
                                                                     "done": False}), nx=True, ex=self.ttl_s):
                    return Claim(reserved, "new")
                raw = self.redis.get(self.key(owner, idem))
                if raw is None:
                    continue
                first = json.loads(raw)
                if first["fp"] != fingerprint:
                    raise InvalidInput("this Idempotency-Key was used for a different request",
                                       code="idempotency_key_reused")
                if "job_id" not in first:  # in progress on a gateway of before job ids were reserved
                    break
                return Claim(str(first["job_id"]), "done" if first.get("done", True) else "pending")
        raise Conflict("a request with this Idempotency-Key is being handled", code="idempotency_in_progress")

    def once(self, owner: str, idem: str | None, fingerprint: str, make: Callable[[str | None], str],
             made: Callable[[str], bool], prefix: str = "") -> tuple[str, bool]:
        """What a request makes (a job, a batch), made once per ``Idempotency-Key``: ``(its id, replayed)``.
        ``make(reserved)`` makes it under the reserved id (a fresh one for None) and returns the id; ``made(id)``
        says whether a request that began with the key made it already (finishing what it left, if need be)."""
        if idem is None:
            return make(None), False
        claim = self.begin(owner, idem, fingerprint, prefix)
        if claim.state == "done":
            return claim.job_id, True
        if claim.state == "pending" and made(claim.job_id):
            made_id = claim.job_id
        else:
            try:
                made_id = make(claim.job_id)
            except BaseException:
                if claim.state == "new":
                    self.release(owner, idem)
                raise
        self.complete(owner, idem, fingerprint, made_id)
        return made_id, claim.state != "new"

    def complete(self, owner: str, idem: str, fingerprint: str, job_id: str) -> None:
        with redis_errors():
            self.redis.set(self.key(owner, idem), json.dumps({"fp": fingerprint, "job_id": job_id, "done": True}),
                           ex=self.ttl_s)

    def release(self, owner: str, idem: str) -> None:
        with redis_errors():
            self.redis.delete(self.key(owner, idem))


def job_made(client: Client, job_id: str) -> bool:
    """Whether a job was stored under ``job_id``; one stored by a request that died before it published it
    is published now (a job whose message went out is never published twice: a second message for a
    running job would run it again)."""
    request = client.jobs.request(job_id)
    if request is not None and not client.jobs.was_queued(job_id):
        client.publish(request)
    return request is not None
