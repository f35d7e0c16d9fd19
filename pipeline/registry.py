"""Live workers announce themselves in Redis with a short TTL, so clients can see who is up."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import redis

KEY = "tuwen:worker:"
TTL_S = 30


def announce(client: redis.Redis, name: str, info: dict[str, Any]) -> None:
    client.set(KEY + name, json.dumps({**info, "name": name, "seen_at": time.time()}, ensure_ascii=False), ex=TTL_S)


def live_workers(client: redis.Redis) -> list[dict[str, Any]]:
    keys = sorted(client.scan_iter(KEY + "*", count=500))
    values = client.mget(keys) if keys else []
    return [json.loads(v) for v in values if v]


def wait_for_worker(client: redis.Redis, timeout: float, name: str | None = None) -> dict[str, Any]:
    """Block until a worker (``name`` or any) has announced itself; raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in live_workers(client):
            if name is None or w["name"] == name:
                return w
        time.sleep(0.2)
    raise TimeoutError(f"no worker{' ' + name if name else ''} became ready within {timeout:.0f}s")


class Heartbeat(threading.Thread):
    """Re-announces a worker every ``TTL_S / 3`` seconds until stopped; removes it on stop."""

    def __init__(self, client: redis.Redis, name: str, info: dict[str, Any]) -> None:
        super().__init__(daemon=True, name="tuwen-heartbeat")
        self.client, self.name, self.info = client, name, info
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                announce(self.client, self.name, self.info)
            except redis.RedisError:
                pass
            self._stop_event.wait(TTL_S / 3)

    def stop(self) -> None:
        self._stop_event.set()
        try:
            self.client.delete(KEY + self.name)
        except redis.RedisError:
            pass
