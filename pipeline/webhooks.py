"""Webhooks: when a job ends, POST its result to the job's ``callback_url``, signed, with retries.

Signature: ``X-Tuwen-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`` with the
timestamp (Unix seconds) in ``X-Tuwen-Timestamp``; receivers check both (``verify``) and refuse old
timestamps, so a captured delivery cannot be replayed later.

SSRF guard: the callback host must match ``webhook_allowed_hosts``; the host is resolved and *every*
address must be public (loopback, private, link-local, reserved … are refused unless
``webhook_allow_private``). The check runs at submit and again before each attempt, and the request
goes to the address that was checked (Host header and TLS SNI keep the name), so DNS rebinding cannot
slip in between. Redirects are not followed.

State lives under ``tuwen:webhook:*``: one hash per job (visible on ``GET /v1/jobs/{id}``), a set of
jobs still running, and a sorted set of deliveries due. The ``Dispatcher`` runs inside each gateway
process: the ``DoneListener`` thread (on ``tuwen:done:*``) tells it when a job ends, and its own thread
sweeps every few seconds (so a missed message costs a few seconds, never a delivery) and hands due
deliveries to a small thread pool. A per-job lock keeps several gateway processes from delivering the
same attempt twice. Retries back off exponentially; any non-2xx answer or network error is retried
until ``webhook_max_attempts``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis

from tuwen.pipeline.errors import InvalidInput, Unavailable
from tuwen.pipeline.jobs import DONE_CHANNEL, JobStore
from tuwen.pipeline.schema import JobResult, JobStatus

if TYPE_CHECKING:
    from tuwen.pipeline.gateway import GatewaySettings

log = logging.getLogger("tuwen.webhooks")

PREFIX = "tuwen:webhook:"
_WAITING = PREFIX + "waiting"
_DUE = PREFIX + "due"
FINAL_STATES = ("delivered", "failed", "refused", "expired")
_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


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


def job_payload(result: JobResult) -> dict[str, Any]:
    """The job as its owner sees it (GET and webhook body): no storage keys, owner or worker names."""
    data = result.to_json()
    for private in ("owner", "image_key", "worker"):
        data.pop(private, None)
    return data


def encode_body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")


# -- SSRF guard -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where one attempt goes: the URL with the host replaced by a checked address."""

    url: str
    host_header: str
    sni_hostname: str | None


def host_allowed(host: str, patterns: list[str]) -> bool:
    """``example.com`` matches itself; ``*.example.com`` its subdomains; ``*`` any host."""
    host = host.lower().rstrip(".")
    for p in (p.strip().lower().rstrip(".") for p in patterns):
        if p == "*" or p == host or (p.startswith("*.") and host.endswith(p[1:])):
            return True
    return False


def address_allowed(address: str, allow_private: bool) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        return False
    return allow_private or ip.is_global


def check_callback_url(url: str, gw: GatewaySettings) -> Target:
    """Refuse callback URLs the gateway must not call; returns the pinned target of one attempt."""
    if gw.webhook_secret is None:
        raise InvalidInput("webhooks are not enabled on this gateway (TUWEN_WEBHOOK_SECRET)",
                           code="webhooks_disabled")
    try:
        parts = urlsplit(url.strip())
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InvalidInput(f"callback_url is not a valid URL: {exc}", code="invalid_callback_url") from exc
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host or len(url) > 2048:
        raise InvalidInput("callback_url must be an http(s) URL with a host", code="invalid_callback_url")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput("callback_url must not carry credentials", code="invalid_callback_url")
    if not host_allowed(host, gw.webhook_allowed_hosts):
        raise InvalidInput(f"callback host {host!r} is not in this gateway's allow-list",
                           code="callback_not_allowed")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidInput(f"callback host {host!r} does not resolve", code="invalid_callback_url") from exc
    addresses = sorted({str(info[4][0]) for info in infos})
    refused = [a for a in addresses if not address_allowed(a, gw.webhook_allow_private)]
    if refused:
        raise InvalidInput(f"callback host {host!r} resolves to a non-public address ({refused[0]})",
                           code="callback_not_allowed")
    if not addresses:
        raise InvalidInput(f"callback host {host!r} has no address", code="invalid_callback_url")
    ip = addresses[0]
    netloc = (f"[{ip}]" if ":" in ip else ip) + (f":{parts.port}" if parts.port else "")
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    return Target(pinned, parts.netloc, host if parts.scheme == "https" else None)


# -- state ------------------------------------------------------------------------------------------------
class WebhookStore:
    """Per-job delivery state in Redis."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._unlock = client.register_script(_UNLOCK)

    @staticmethod
    def key(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

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

    def state(self, job_id: str) -> dict[str, Any] | None:
        f = self.redis.hgetall(self.key(job_id))
        if not f.get("state"):
            return None
        out: dict[str, Any] = {"url": f.get("url", ""), "state": f["state"], "attempts": int(f.get("attempts", 0))}
        for name, cast in (("last_status", int), ("last_error", str), ("next_attempt_at", float),
                           ("delivered_at", float), ("created_at", float)):
            if f.get(name):
                out[name] = cast(f[name])
        return out

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
        token = secrets.token_hex(8)
        return token if self.redis.set(f"{PREFIX}lock:{job_id}", token, nx=True, px=ttl_ms) else None

    def unlock(self, job_id: str, token: str) -> None:
        self._unlock(keys=[f"{PREFIX}lock:{job_id}"], args=[token])


# -- jobs that ended ------------------------------------------------------------------------------------
class DoneListener:
    """One thread per gateway process on ``tuwen:done:*``; calls each callback with the ended job's id.
    Messages missed while Redis is away are covered by the callers' own re-checks (sweep, re-poll)."""

    def __init__(self, client: redis.Redis, callbacks: Sequence[Callable[[str], None]]) -> None:
        self.redis, self.callbacks = client, callbacks
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tuwen-done-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe(DONE_CHANNEL + "*")
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=1.0)
                    if msg and msg.get("type") == "pmessage":
                        job_id = str(msg["channel"])[len(DONE_CHANNEL):]
                        for callback in self.callbacks:
                            callback(job_id)
            except redis.RedisError as exc:
                log.warning("job listener lost Redis (%s); re-checks cover the gap", exc)
                self._stop.wait(1.0)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except redis.RedisError:
                        pass


# -- the delivery loop ----------------------------------------------------------------------------------
class Dispatcher:
    """Delivers webhooks from inside a gateway process (``start`` / ``stop``)."""

    def __init__(self, gw: GatewaySettings, jobs: JobStore, store: WebhookStore,
                 on_outcome: Callable[[str], None] = lambda outcome: None) -> None:
        self.gw, self.jobs, self.store, self.on_outcome = gw, jobs, store, on_outcome
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tuwen-webhook")
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="tuwen-webhook-sweep", daemon=True)
        # No keep-alive: a pooled TLS connection is keyed by address, and must not carry a request for
        # another host name than the one its certificate was checked for. No proxies from the env.
        self._http = httpx.Client(timeout=gw.webhook_timeout_s, follow_redirects=False, trust_env=False,
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
                if time.monotonic() - last_sweep >= self.gw.webhook_sweep_s:
                    self.sweep()
                    last_sweep = time.monotonic()
                self.run_due()
                nxt = self.store.next_due_at()
            except (redis.RedisError, Unavailable) as exc:
                log.warning("webhook sweep failed: %s", exc)
                nxt = None
            # Sleep until the next retry is due or the sweep; a finished delivery or an ended job wakes us.
            pause = self.gw.webhook_sweep_s
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
            elif time.time() - hook.get("created_at", 0) > 60:  # registered just before its job record
                self.store.record(job_id, "expired", hook["attempts"], error="the job no longer exists")

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
        token = self.store.lock(job_id, int((self.gw.webhook_timeout_s + 30) * 1000))
        if token is None:
            return None
        try:
            hook = self.store.state(job_id)
            if hook is None or hook["state"] in FINAL_STATES:
                self.store.drop(job_id)
                return None
            if hook["state"] == "retrying" and hook.get("next_attempt_at", 0) > time.time():
                return None  # another process made the last attempt; this one is not due yet
            result = self.jobs.get(job_id)
            if result.status == JobStatus.unknown:
                self.store.record(job_id, "expired", hook["attempts"], error="the job no longer exists")
                return "expired"
            if not result.status.terminal:
                self.store.wait_again(job_id)
                return None
            attempt = hook["attempts"] + 1
            try:
                target = check_callback_url(hook["url"], self.gw)
            except InvalidInput as exc:
                self.store.record(job_id, "refused", attempt, error=f"{exc.code}: {exc.message}")
                self.on_outcome("refused")
                return "refused"
            status, error = self._post(job_id, target, encode_body(job_payload(result)), attempt)
            if status is not None and 200 <= status < 300:
                state, next_at = "delivered", None
            elif attempt >= self.gw.webhook_max_attempts:
                state, next_at = "failed", None
            else:
                state = "retrying"
                next_at = time.time() + min(self.gw.webhook_backoff_max_s,
                                            self.gw.webhook_backoff_s * 2 ** (attempt - 1))
            self.store.record(job_id, state, attempt, status=status, error=error, next_at=next_at)
            self.on_outcome(state)
            return state
        finally:
            self.store.unlock(job_id, token)

    def _post(self, job_id: str, target: Target, body: bytes, attempt: int) -> tuple[int | None, str | None]:
        assert self.gw.webhook_secret is not None
        timestamp = str(int(time.time()))
        headers = {"Host": target.host_header, "Content-Type": "application/json; charset=utf-8",
                   "X-Tuwen-Timestamp": timestamp, "X-Tuwen-Job-Id": job_id,
                   "X-Tuwen-Delivery-Attempt": str(attempt),
                   "X-Tuwen-Signature": sign(self.gw.webhook_secret.get_secret_value(), timestamp, body)}
        extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
        try:
            response = self._http.post(target.url, content=body, headers=headers, extensions=extensions)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"
        return response.status_code, None if response.is_success else f"HTTP {response.status_code}"
