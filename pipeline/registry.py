"""Live workers announce themselves in Redis with a short TTL, so clients can see who is up.

A worker's announcement is written every ``PERIOD_S`` only while its consuming loop is running (the
beat comes from that loop, see ``tuwen.workers.serve.liveness``) and lapses ``TTL_S`` after the last one: a
worker whose loop has stopped drops out of the list within ``TTL_S``, even if its process lives on.
Each announcement lists the queues the worker consumes and the delivery tags it holds (``held``: jobs
received and not yet acknowledged, for the reaper of ``tuwen.workers.serve.reaper``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import redis

from tuwen.pipeline import keys

KEY = keys.WORKER
#: An announcement lapses this long after it was last written.
TTL_S = 20
#: A live worker re-announces itself this often.
PERIOD_S = 5


def announce(client: redis.Redis, name: str, info: dict[str, Any]) -> None:
    client.set(KEY + name, json.dumps({**info, "name": name, "seen_at": time.time()}, ensure_ascii=False), ex=TTL_S)


def withdraw(client: redis.Redis, name: str) -> None:
    client.delete(KEY + name)


def live_workers(client: redis.Redis) -> list[dict[str, Any]]:
    keys = sorted(client.scan_iter(KEY + "*", count=500))
    values = client.mget(keys) if keys else []
    return [json.loads(v) for v in values if v]


def consumers(workers: list[dict[str, Any]], queues: Iterable[str]) -> dict[str, list[str]]:
    """``{queue: names of the live workers consuming it}`` (a worker that is shutting down does not count)."""
    return {q: [w["name"] for w in workers if q in (w.get("queues") or []) and not w.get("stopping")]
            for q in queues}


def picture_side(workers: list[dict[str, Any]], queue: str) -> int | None:
    """The long side, in pixels, that the live workers consuming ``queue`` resize a picture to (their model
    family's preferred size, which each announces); the largest of them, or None when none says."""
    names = set(consumers(workers, [queue])[queue])
    sides = [int(w["picture_side"]) for w in workers if w["name"] in names and w.get("picture_side")]
    return max(sides) if sides else None


#: What starts a worker: the end of every "no live worker" message.
START_A_WORKER = "start one with `tuwen worker`, or everything on one machine with `tuwen serve`"


def no_worker(queue: str, speech: bool = False) -> str:
    """Why jobs on ``queue`` get no answer, and what to do about it (``speech``: the speech stage's queue)."""
    start = "start one with `tuwen worker --role speech`" if speech else START_A_WORKER
    return f"no live worker is consuming {queue}: {start}"


def no_consumer_message(client: redis.Redis, queue: str, speech: bool = False) -> str | None:
    """``no_worker(queue, speech)`` when no live worker consumes ``queue``, else None."""
    return None if consumers(live_workers(client), [queue])[queue] else no_worker(queue, speech)


def wait_for_worker(client: redis.Redis, timeout: float, name: str | None = None) -> dict[str, Any]:
    """Block until a worker (``name`` or any) has announced itself; raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in live_workers(client):
            if name is None or w["name"] == name:
                return w
        time.sleep(0.2)
    raise TimeoutError(f"no worker{' ' + name if name else ''} became ready within {timeout:.0f}s")
