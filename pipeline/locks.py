"""The one Redis lock: a key holding a random token, set only if absent and with a TTL, so it lapses
when its holder dies. Only the holder (who knows the token) can renew or release it, so a holder whose
lock lapsed and was taken by another process can neither extend nor delete the new holder's lock.

Webhook delivery takes it for one attempt (``acquire`` / ``release``); a bulk's submitter holds it for
minutes (``held``: waits for it, renews it while the block runs).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from tuwen.pipeline.jobs import redis_errors

# KEYS[1]=lock; ARGV: token. Deletes the lock if it is still this holder's.
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
# KEYS[1]=lock; ARGV: token, ttl in ms. Extends the lock if it is still this holder's.
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"


class Locks:
    """Token locks on Redis keys."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)

    def acquire(self, key: str, ttl_s: float) -> str | None:
        """Take the lock for ``ttl_s``; its token, or None if another holder has it."""
        token = secrets.token_hex(8)
        return token if self.redis.set(key, token, nx=True, px=max(1, round(ttl_s * 1000))) else None

    def release(self, key: str, token: str) -> None:
        self._release(keys=[key], args=[token])

    def renew(self, key: str, token: str, ttl_s: float) -> bool:
        """Extend the lock to ``ttl_s`` from now; False if it is no longer this holder's."""
        return bool(self._renew(keys=[key], args=[token, max(1, round(ttl_s * 1000))]))

    @contextmanager
    def held(self, key: str, ttl_s: float, wait_s: float, busy: Callable[[], Exception]) -> Iterator[None]:
        """Hold the lock for the block: wait up to ``wait_s`` for it (then raise ``busy()``) and renew it
        every third of ``ttl_s``, so that it lapses within ``ttl_s`` of its holder's death."""
        deadline = time.monotonic() + wait_s
        with redis_errors():
            while (token := self.acquire(key, ttl_s)) is None:
                if time.monotonic() > deadline:
                    raise busy()
                time.sleep(0.25)
        mine: str = token
        done = threading.Event()

        def renew() -> None:
            while not done.wait(ttl_s / 3):
                try:
                    self.renew(key, mine, ttl_s)
                except redis.RedisError:
                    pass  # tried again a third of the TTL later; it lapses only if Redis stays away

        renewer = threading.Thread(target=renew, name="tuwen-lock", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            done.set()
            renewer.join()
            try:
                self.release(key, mine)
            except redis.RedisError:
                pass  # it lapses by itself
