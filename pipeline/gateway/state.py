"""What a gateway process shares between its requests, built once by ``create_app`` and kept on
``app.state.gateway``: the producer ``Client``, API keys, idempotency records, webhooks, long-poll
waiters, the worker census and the metrics. The routes get it through ``deps``."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

import redis

from tuwen.pipeline.bulk.files import FileStore
from tuwen.pipeline import registry
from tuwen.pipeline.aclient import AsyncClient
from tuwen.pipeline.gateway.apikeys import ApiKey, Idempotency, KeyStore
from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.gateway.metrics import Metrics
from tuwen.pipeline.gateway.responses_store import ResponseStore
from tuwen.pipeline.gateway.settings import GatewaySettings
from tuwen.pipeline.gateway.remote import RemotePictures
from tuwen.pipeline.settings import Settings
from tuwen.pipeline.gateway.ssrf import UrlGuard
from tuwen.pipeline.gateway.done import DoneListener
from tuwen.pipeline.gateway.webhooks import Dispatcher, WebhookStore


log = logging.getLogger("tuwen.gateway")


class Waiters:
    """Long-polls park on an ``asyncio.Event`` (not a thread) until the ``DoneListener`` says their job
    ended; each re-reads the job at least every second, so a missed message costs a second at most."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parked: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def notify(self, job_id: str) -> None:
        with self._lock:
            for loop, event in self._parked.get(job_id, ()):
                loop.call_soon_threadsafe(event.set)

    async def wait(self, job_id: str, timeout: float) -> None:
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._parked.setdefault(job_id, set()).add(entry)
        try:
            await asyncio.wait_for(entry[1].wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                parked = self._parked.get(job_id, set())
                parked.discard(entry)
                if not parked:
                    self._parked.pop(job_id, None)


#: The response header that lists the request's parameters tuwen ignored (vLLM's rule: unknown is ignored).
IGNORED_HEADER = "tuwen-ignored-params"
#: Most (key, parameter) pairs the gateway remembers having logged.
_IGNORED_LOGGED = 10_000


class WorkerCensus:
    """Live workers per queue, and the models they hold, from the workers' announcements
    (``registry.consumers``: a worker that is shutting down does not count), kept for ``max_age_s`` so
    that probes, timed-out long-polls and chat requests do not each scan Redis."""

    def __init__(self, client: redis.Redis, queues: list[str], max_age_s: float = 2.0,
                 speech_queue: str | None = None) -> None:
        self.redis, self.max_age_s, self.speech_queue = client, max_age_s, speech_queue
        self.queues = [*queues, speech_queue] if speech_queue else queues
        self._lock = threading.Lock()
        self._workers: list[dict[str, Any]] = []
        self._at = -max_age_s

    def _live(self) -> list[dict[str, Any]]:
        with self._lock:
            if time.monotonic() - self._at >= self.max_age_s:
                self._workers = registry.live_workers(self.redis)
                self._at = time.monotonic()
            return self._workers

    def counts(self) -> dict[str, int]:
        """``{queue: live workers}`` for this gateway's queues; raises ``redis.RedisError``."""
        live = registry.consumers(self._live(), self.queues)
        return {queue: len(names) for queue, names in live.items()}

    def models(self, queue: str) -> dict[str, float]:
        """``{model id: when a worker holding it was first seen}`` for the live workers consuming
        ``queue``, oldest first; raises ``redis.RedisError``."""
        workers = self._live()
        names = set(registry.consumers(workers, [queue])[queue])
        seen: dict[str, float] = {}
        for w in workers:
            if w["name"] in names and w.get("model_id"):
                seen[w["model_id"]] = min(seen.get(w["model_id"], w.get("seen_at", 0.0)), w.get("seen_at", 0.0))
        return dict(sorted(seen.items(), key=lambda item: (item[1], item[0])))

    def max_images(self, queue: str) -> int | None:
        """Most pictures one job may carry for every live worker consuming ``queue`` (their model family's
        limit, which each announces), or None when none is live or none says."""
        workers = self._live()
        names = set(registry.consumers(workers, [queue])[queue])
        limits = [int(w["max_images"]) for w in workers if w["name"] in names and w.get("max_images")]
        return min(limits) if limits else None

    def picture_side(self, queue: str) -> int | None:
        """The long side the live workers consuming ``queue`` resize pictures to (``registry.picture_side``)."""
        return registry.picture_side(self._live(), queue)

    def renders_tools(self, queue: str) -> bool:
        """Every live worker consuming ``queue`` announces that its checkpoint's chat template renders tools
        (``renders_tools``, found by rendering a probe); False when none is live."""
        workers = self._live()
        names = set(registry.consumers(workers, [queue])[queue])
        flags = [bool(w.get("renders_tools")) for w in workers if w["name"] in names]
        return bool(flags) and all(flags)

    def check_pictures(self, queue: str, count: int) -> None:
        """Refuse a job of ``count`` pictures before anything is fetched or stored when the model served on
        ``queue`` takes fewer (``too_many_images``, as the worker would)."""
        limit = self.max_images(queue)
        if limit is not None and count > limit:
            raise InvalidInput(f"{count} pictures in one job; the served model takes at most {limit}",
                               code="too_many_images")

    def missing(self, queue: str) -> str | None:
        """Why jobs on ``queue`` get no answer (``registry.no_worker``), or None."""
        return None if self.counts().get(queue, 0) else registry.no_worker(queue, speech=queue == self.speech_queue)


class GatewayState:
    """Everything the routes use, whole when built; ``start``/``stop`` run the background threads (the
    listener on ended jobs, and the webhook dispatcher when webhooks are on)."""

    def __init__(self, settings: Settings, gw: GatewaySettings) -> None:
        self.settings, self.gw = settings, gw
        self.client = Client(settings)
        self.redis = self.client.jobs.redis
        self.keys = KeyStore(self.redis)
        self.idempotency = Idempotency(self.redis, gw.gateway_idempotency_ttl_s)
        #: The Responses API's stored responses (``store: true``), kept as long as job results.
        self.responses = ResponseStore(self.redis, self.client.jobs, settings.result_ttl_s)
        self.hooks = WebhookStore(self.redis, settings.result_ttl_s)
        self.metrics = Metrics()
        self.waiters = Waiters()
        self.census = WorkerCensus(self.redis, [settings.interactive_queue, settings.bulk_queue],
                                   speech_queue=settings.speech_queue)
        #: The owners' uploaded files: chat and Responses PDFs by ``file_id`` (purpose ``user_data``).
        self.files = FileStore(self.redis, settings)
        #: Job state on the event loop (chat waits and streams), and the chat API's remote pictures.
        self.aclient = AsyncClient(settings)
        self.pictures = RemotePictures(  # no hosts listed: any host, at public addresses only
            UrlGuard(tuple(gw.gateway_image_url_hosts) or ("*",), gw.gateway_image_url_allow_private, what="image_url"),
            settings.max_image_bytes, gw.gateway_image_url_timeout_s, max_redirects=gw.gateway_image_url_max_redirects,
            enabled=gw.gateway_image_urls)
        self.dispatcher = (Dispatcher(gw, self.client.jobs, self.hooks, self._count_webhook)
                           if gw.webhook_secret is not None else None)
        self._ignored_logged: set[tuple[str, str]] = set()
        self.listener = DoneListener(self.redis, [self.waiters.notify]
                                     + ([self.dispatcher.job_done] if self.dispatcher else []))

    def ignored(self, key: ApiKey, names: tuple[str, ...]) -> dict[str, str]:
        """The ``tuwen-ignored-params`` header for parameters a request sent that tuwen ignored; each name is
        logged once per key (up to ``_IGNORED_LOGGED`` pairs a process)."""
        if not names:
            return {}
        fresh = [n for n in dict.fromkeys(names) if (key.id, n) not in self._ignored_logged]
        if fresh and len(self._ignored_logged) < _IGNORED_LOGGED:
            self._ignored_logged.update((key.id, n) for n in fresh)
            log.info("key %s (%s) sent parameters tuwen ignores: %s", key.id, key.owner, json.dumps(fresh))
        return {IGNORED_HEADER: ", ".join(dict.fromkeys(names))}

    def _count_webhook(self, outcome: str) -> None:
        self.metrics.webhooks.labels(outcome).inc()

    def start(self) -> None:
        self.listener.start()
        if self.dispatcher is not None:
            self.dispatcher.start()

    def stop(self) -> None:
        self.listener.stop()
        if self.dispatcher is not None:
            self.dispatcher.stop()
        self.pictures.close()
        self.client.close()
