"""Puts a dead worker's jobs back on their queue within a minute, without touching the visibility timeout.

A job's message stays in Redis while a worker holds it: kombu keeps every received, unacknowledged
message in the ``unacked`` hash (delivery tag -> ``[payload, exchange, routing key]``) and its delivery
time in the ``unacked_index`` sorted set, and restores only entries older than the visibility timeout
(600 s by default, and it must exceed the longest prefetch wait plus batch). A worker killed with
``kill -9`` thus left its running and prefetched jobs stuck for up to ten minutes.

Every worker's heartbeat (``tuwen.pipeline.registry``) lists the delivery tags it holds, taken by its
consuming loop. Every ``INTERVAL_S`` each worker sweeps: an entry that no live worker lists and that was
delivered more than ``GRACE_S`` ago belongs to a dead worker, and goes back to the front of its queue.
``GRACE_S`` exceeds the heartbeat's time to live plus its period, so a live worker has listed every
tag it held that long. The move is one Lua script that runs only if the entry is still there as read,
so an owner that acknowledges at the same moment cannot race it; and the job store lets the first
result win, so a job that did finish is not run again (its next claim sees it ended).

Only entries routed to tuwen's queues are touched (exchange and routing key both the queue's name, as
Celery routes ``tuwen.answer``; no message priority): other apps sharing the Redis keep theirs. While a
live worker runs a version that does not list its tags, nothing is swept. With a RabbitMQ broker none of
this is needed (RabbitMQ requeues a dead consumer's messages itself).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from kombu.utils.json import dumps, loads

from tuwen.pipeline import registry

log = logging.getLogger(__name__)

#: How often each worker sweeps.
INTERVAL_S = 10.0
#: An entry is swept only this long after its delivery (> heartbeat time to live + period + margin).
GRACE_S = registry.TTL_S + registry.PERIOD_S + 5.0
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"

# KEYS: unacked hash, unacked index, destination queue; ARGV: tag, the entry as read, the payload to push.
# Moves the message back to the consuming end of its queue only if the entry is still the one read.
_RESTORE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


class Reaper:
    """Sweeps the broker's unacknowledged messages for ones whose holder is gone."""

    def __init__(self, broker: Any, heartbeats: Any, queues: Iterable[str],
                 own_tags: Callable[[], Iterable[str]] = tuple, grace_s: float = GRACE_S) -> None:
        self.broker, self.heartbeats = broker, heartbeats
        self.queues = set(queues)
        self.own_tags, self.grace_s = own_tags, grace_s
        self._restore = broker.register_script(_RESTORE)

    def sweep(self) -> list[str]:
        """Put back what dead workers held; returns the job ids put back."""
        live = registry.live_workers(self.heartbeats)
        if any("held" not in w for w in live):
            log.debug("a live worker does not list its messages; not sweeping")
            return []
        held = {tag for w in live for tag in w["held"]} | set(self.own_tags())
        old = self.broker.zrangebyscore(UNACKED_INDEX, "-inf", time.time() - self.grace_s)
        restored = []
        for tag in (t for t in old if t not in held):
            job_id = self._restore_one(tag)
            if job_id is not None:
                restored.append(job_id)
        if restored:
            log.warning("put back %d jobs of dead workers: %s", len(restored), ", ".join(restored))
        return restored

    def _restore_one(self, tag: str) -> str | None:
        raw = self.broker.hget(UNACKED, tag)
        if raw is None:
            return None
        try:
            payload, exchange, routing_key = loads(raw)
            queue = routing_key if routing_key in self.queues and exchange in (routing_key, "") else None
            if queue is None or payload.get("properties", {}).get("priority"):
                return None  # not ours, or in a priority sub-queue: left to the visibility timeout
            payload["headers"]["redelivered"] = True
            payload["properties"]["delivery_info"]["redelivered"] = True
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("unacked entry %s is not a kombu message; left to the visibility timeout", tag)
            return None
        if not self._restore(keys=[UNACKED, UNACKED_INDEX, queue], args=[tag, raw, dumps(payload)]):
            return None  # acknowledged (or restored) meanwhile
        return str(payload["headers"].get("id", tag))
