"""Hearing that jobs ended: one thread per process on ``tuwen:done:*`` (the channel ``JobStore.finish``
publishes on) that hands each ended job's id to its callbacks (long-poll waiters, webhooks, batches)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import redis

from tuwen.pipeline.keys import DONE

log = logging.getLogger("tuwen.done")


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
                pubsub.psubscribe(DONE + "*")
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=1.0)
                    if msg and msg.get("type") == "pmessage":
                        job_id = str(msg["channel"])[len(DONE):]
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
