"""Webhooks: when a job ends, POST its result to the job's ``callback_url``, signed, with retries.

Signature: ``X-Tuwen-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`` with the
timestamp (Unix seconds) in ``X-Tuwen-Timestamp``; receivers check both (``verify``) and refuse old
timestamps, so a captured delivery cannot be replayed later. The body is the public job,
``schema.JobView`` (what ``GET /v1/jobs/{id}`` shows, less the delivery state).

Callback URLs pass the SSRF guard (``ssrf.UrlGuard``) at submit and again before each attempt, and
each attempt goes to the address that was checked. Redirects are not followed.

State lives under ``tuwen:webhook:*``: one hash per job (visible on ``GET /v1/jobs/{id}``), a set of
jobs still running, and a sorted set of deliveries due. The ``Dispatcher`` runs inside each gateway
process: the ``done.DoneListener`` thread (on ``tuwen:done:*``) tells it when a job ends, and its own thread
sweeps every few seconds (so a missed message costs a few seconds, never a delivery) and hands due
deliveries to a small thread pool. A per-job lock keeps several gateway processes from delivering the
same attempt twice. Retries back off exponentially; any non-2xx answer or network error is retried
until ``webhook_max_attempts``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import redis
from pydantic import Field, SecretStr

from tuwen.pipeline import keys
from tuwen.pipeline.errors import InvalidInput, Unavailable
from tuwen.pipeline.jobs import JobStore
from tuwen.pipeline.locks import Locks
from tuwen.pipeline.schema import JobResult, JobStatus, JobView, WebhookView
from tuwen.pipeline.settings import CommaList, TuwenSettings
from tuwen.pipeline.gateway.ssrf import ForbiddenTarget, InvalidUrl, Target, UrlGuard

log = logging.getLogger("tuwen.webhooks")

_WAITING = keys.WEBHOOK + "waiting"
_DUE = keys.WEBHOOK + "due"
FINAL_STATES = ("delivered", "failed", "refused", "expired")


class WebhookSettings(TuwenSettings):
    """Webhook delivery settings (``TUWEN_WEBHOOK_*``); the gateway's settings extend them."""

    #: HMAC key for webhook signatures. Unset: webhooks are off and ``callback_url`` is refused.
    webhook_secret: SecretStr | None = None
    #: Callback hosts allowed: ``hooks.example.com``, ``*.example.com`` or ``*`` (comma-separated in env).
    webhook_allowed_hosts: CommaList = Field(default_factory=list)
    #: Allow callbacks to loopback / private / link-local addresses (off: SSRF guard).
    webhook_allow_private: bool = False
    #: Deliveries tried per job before its webhook is given up (``failed`` on ``GET /v1/jobs/{id}``).
    webhook_max_attempts: int = Field(8, ge=1, le=50)
    #: First retry after this many seconds, doubling each time up to ``webhook_backoff_max_s``.
    webhook_backoff_s: float = Field(2.0, gt=0)
    #: Longest wait between two attempts.
    webhook_backoff_max_s: float = Field(600.0, gt=0)
    #: One delivery attempt's whole time (connect, send, answer), in seconds.
    webhook_timeout_s: float = Field(10.0, gt=0, le=120)
    #: How often the delivery loop looks for ended jobs it did not hear about.
    webhook_sweep_s: float = Field(5.0, gt=0, le=300)

    @property
    def guard(self) -> UrlGuard:
        return UrlGuard(tuple(self.webhook_allowed_hosts), self.webhook_allow_private, what="callback_url")


# -- signing --------------------------------------------------------------------------------------------
def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """``sha256=<hex>`` over ``"<timestamp>.<body>"``."""
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, body: bytes, timestamp: str, signature: str, *, tolerance_s: float = 300,
           now: float | None = None) -> bool:
    """True if ``signature`` is ours for ``body`` and ``timestamp`` is within ``tolerance_s`` of now."""
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


def body_of(result: JobResult) -> bytes:
    """The delivery's body: the public job (``JobView``) as compact UTF-8 JSON."""
    return json.dumps(JobView.of(result).to_json(), ensure_ascii=False, separators=(",", ":"),
                      sort_keys=True).encode("utf-8")


def check_callback_url(url: str, settings: WebhookSettings) -> Target:
    """Refuse callback URLs the gateway must not call; returns the pinned target of one attempt."""
    if settings.webhook_secret is None:
        raise InvalidInput("webhooks are not enabled on this gateway (TUWEN_WEBHOOK_SECRET)",
                           code="webhooks_disabled")
    try:
        return settings.guard.target(url)
    except InvalidUrl as exc:
        raise InvalidInput(str(exc), code="invalid_callback_url") from exc
    except ForbiddenTarget as exc:
        raise InvalidInput(str(exc), code="callback_not_allowed") from exc


# -- state ------------------------------------------------------------------------------------------------
class WebhookStore:
    """Per-job delivery state in Redis."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._locks = Locks(client)

    @staticmethod
    def key(job_id: str) -> str:
        return f"{keys.WEBHOOK}job:{job_id}"

    def register(self, job_id: str, url: str) -> None:
        """Record a delivery to make once the job ends (call before the job is queued)."""
        pipe = self.redis.pipeline()
        pipe.hset(self.key(job_id), mapping={"url": url, "state": "pending", "attempts": 0,
                                             "created_at": repr(time.time())})
        pipe.expire(self.key(job_id), self.ttl_s)
        pipe.sadd(_WAITING, job_id)
        pipe.execute()

    def forget(self, job_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(self.key(job_id))
        pipe.srem(_WAITING, job_id)
        pipe.zrem(_DUE, job_id)
        pipe.execute()

    def drop(self, job_id: str) -> None:
        """Stop tracking a delivery (its hash, if any, stays for GET)."""
        pipe = self.redis.pipeline()
        pipe.srem(_WAITING, job_id)
        pipe.zrem(_DUE, job_id)
        pipe.execute()

    def state(self, job_id: str) -> WebhookView | None:
        f = self.redis.hgetall(self.key(job_id))
        if not f.get("state"):
            return None
        return WebhookView(url=f.get("url", ""), **{name: value for name, value in f.items() if value and name in (
            "state", "attempts", "last_status", "last_error", "next_attempt_at", "delivered_at", "created_at")})

    def make_due(self, job_ids: list[str], at: float) -> None:
        if job_ids:
            pipe = self.redis.pipeline()
            pipe.srem(_WAITING, *job_ids)
            pipe.zadd(_DUE, {i: at for i in job_ids})
            pipe.execute()

    def wait_again(self, job_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.zrem(_DUE, job_id)
        pipe.sadd(_WAITING, job_id)
        pipe.execute()

    def waiting(self, count: int = 500) -> list[str]:
        return list(self.redis.srandmember(_WAITING, count) or [])

    def due(self, now: float, limit: int = 100) -> list[str]:
        return list(self.redis.zrangebyscore(_DUE, "-inf", now, start=0, num=limit))

    def next_due_at(self) -> float | None:
        first = self.redis.zrange(_DUE, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    def record(self, job_id: str, state: str, attempts: int, *, status: int | None = None,
               error: str | None = None, next_at: float | None = None) -> None:
        fields: dict[str, Any] = {"state": state, "attempts": attempts, "last_status": status or "",
                                  "last_error": (error or "")[:300], "next_attempt_at": next_at or ""}
        if state == "delivered":
            fields["delivered_at"] = repr(time.time())
        pipe = self.redis.pipeline()
        pipe.hset(self.key(job_id), mapping=fields)
        if next_at is None:
            pipe.zrem(_DUE, job_id)
            pipe.srem(_WAITING, job_id)
        else:
            pipe.zadd(_DUE, {job_id: next_at})
        pipe.execute()

    def lock(self, job_id: str, ttl_ms: int) -> str | None:
        return self._locks.acquire(f"{keys.WEBHOOK}lock:{job_id}", ttl_ms / 1000)

    def unlock(self, job_id: str, token: str) -> None:
        self._locks.release(f"{keys.WEBHOOK}lock:{job_id}", token)


# -- the delivery loop ----------------------------------------------------------------------------------
class Dispatcher:
    """Delivers webhooks from inside a gateway process (``start`` / ``stop``)."""

    def __init__(self, settings: WebhookSettings, jobs: JobStore, store: WebhookStore,
                 on_outcome: Callable[[str], None] = lambda outcome: None) -> None:
        self.settings, self.jobs, self.store, self.on_outcome = settings, jobs, store, on_outcome
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tuwen-webhook")
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="tuwen-webhook-sweep", daemon=True)
        # No keep-alive: a pooled TLS connection is keyed by address, and must not carry a request for
        # another host name than the one its certificate was checked for. No proxies from the env.
        self._http = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False,
                                  limits=httpx.Limits(max_keepalive_connections=0),
                                  headers={"User-Agent": "tuwen-webhook/1"})

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()

    def job_done(self, job_id: str) -> None:
        """Called by the ``DoneListener`` for every job that ends: deliver its webhook now, if any."""
        if self.store.redis.sismember(_WAITING, job_id):
            self.store.make_due([job_id], time.time())
            self._wake.set()

    def _loop(self) -> None:
        last_sweep = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() - last_sweep >= self.settings.webhook_sweep_s:
                    self.sweep()
                    last_sweep = time.monotonic()
                self.run_due()
                nxt = self.store.next_due_at()
            except (redis.RedisError, Unavailable) as exc:
                log.warning("webhook sweep failed: %s", exc)
                nxt = None
            # Sleep until the next retry is due or the sweep; a finished delivery or an ended job wakes us.
            pause = self.settings.webhook_sweep_s
            if nxt is not None and nxt > time.time():
                pause = min(pause, nxt - time.time())
            self._wake.wait(max(0.05, pause))
            self._wake.clear()

    def sweep(self) -> None:
        """Move deliveries whose job has ended (or vanished) from waiting to due."""
        ids = self.store.waiting()
        if not ids:
            return
        results = self.jobs.get_many(ids)
        ended = [i for i, r in results.items() if r.status.terminal]
        self.store.make_due(ended, time.time())
        for job_id in (i for i, r in results.items() if r.status == JobStatus.unknown):
            hook = self.store.state(job_id)
            if hook is None:
                self.store.drop(job_id)
            elif time.time() - (hook.created_at or 0) > 60:  # registered just before its job record
                self.store.record(job_id, "expired", hook.attempts, error="the job no longer exists")

    def run_due(self) -> None:
        for job_id in self.store.due(time.time()):
            with self._busy_lock:
                if job_id in self._busy:
                    continue
                self._busy.add(job_id)
            self._pool.submit(self._deliver_and_release, job_id)

    def _deliver_and_release(self, job_id: str) -> None:
        try:
            self.deliver(job_id)
        except Exception:  # noqa: BLE001 - one bad delivery must not stop the loop
            log.exception("webhook delivery for job %s failed unexpectedly", job_id)
        finally:
            with self._busy_lock:
                self._busy.discard(job_id)
            self._wake.set()

    def deliver(self, job_id: str) -> str | None:
        """Make one attempt if one is due; returns the state written (None if nothing to do)."""
        token = self.store.lock(job_id, int((self.settings.webhook_timeout_s + 30) * 1000))
        if token is None:
            return None
        try:
            hook = self.store.state(job_id)
            if hook is None or hook.state in FINAL_STATES:
                self.store.drop(job_id)
                return None
            if hook.state == "retrying" and (hook.next_attempt_at or 0) > time.time():
                return None  # another process made the last attempt; this one is not due yet
            result = self.jobs.get(job_id)
            if result.status == JobStatus.unknown:
                self.store.record(job_id, "expired", hook.attempts, error="the job no longer exists")
                return "expired"
            if not result.status.terminal:
                self.store.wait_again(job_id)
                return None
            attempt = hook.attempts + 1
            try:
                target = check_callback_url(hook.url, self.settings)
            except InvalidInput as exc:
                self.store.record(job_id, "refused", attempt, error=f"{exc.code}: {exc.message}")
                self.on_outcome("refused")
                return "refused"
            status, error = self._post(job_id, target, body_of(result), attempt)
            state, next_at = next_attempt(self.settings, status, attempt, time.time())
            self.store.record(job_id, state, attempt, status=status, error=error, next_at=next_at)
            self.on_outcome(state)
            return state
        finally:
            self.store.unlock(job_id, token)

    def _post(self, job_id: str, target: Target, body: bytes, attempt: int) -> tuple[int | None, str | None]:
        assert self.settings.webhook_secret is not None
        return post_signed(self._http, self.settings.webhook_secret.get_secret_value(), target, body, attempt,
                           ("X-Tuwen-Job-Id", job_id))


def post_signed(http: httpx.Client, secret: str, target: Target, body: bytes, attempt: int,
                ident: tuple[str, str]) -> tuple[int | None, str | None]:
    """One signed delivery (jobs' and batches' webhooks alike): ``(status, error)``; the connection goes to
    the address the SSRF guard checked, with the callback's own host name for Host and TLS."""
    timestamp = str(int(time.time()))
    headers = {"Host": target.host_header, "Content-Type": "application/json; charset=utf-8",
               "X-Tuwen-Timestamp": timestamp, ident[0]: ident[1], "X-Tuwen-Delivery-Attempt": str(attempt),
               "X-Tuwen-Signature": sign(secret, timestamp, body)}
    extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
    try:
        response = http.post(target.url, content=body, headers=headers, extensions=extensions)
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return response.status_code, None if response.is_success else f"HTTP {response.status_code}"


def next_attempt(settings: WebhookSettings, status: int | None, attempt: int,
                 now: float) -> tuple[str, float | None]:
    """After a delivery attempt (jobs' and batches' webhooks alike): ``delivered``, ``failed`` after the
    last attempt, or ``retrying`` at a doubling backoff up to ``webhook_backoff_max_s``."""
    if status is not None and 200 <= status < 300:
        return "delivered", None
    if attempt >= settings.webhook_max_attempts:
        return "failed", None
    return "retrying", now + min(settings.webhook_backoff_max_s, settings.webhook_backoff_s * 2 ** (attempt - 1))
