"""The one Redis lock (``pipeline/locks.py``), shared by bulk submitters and webhook delivery: only its
holder renews or releases it, a waiter gets ``busy`` in time, and a held lock outlives its TTL."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from tuwen.pipeline.jobs import connect
from tuwen.pipeline.keys import ROOT
from tuwen.pipeline.localredis import LocalRedis
from tuwen.pipeline.locks import Locks
from tuwen.pipeline.gateway.webhooks import WebhookStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class Busy(Exception):
    pass


@pytest.fixture
def db(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    client = connect(redis_server.url)
    yield client
    client.close()


def key() -> str:
    return f"{ROOT}test-lock:{uuid.uuid4().hex}"


def test_a_holder_whose_lock_lapsed_cannot_renew_or_release_the_next_holders(db: redis.Redis) -> None:
    # Given A's lock lapsed (its process was paused past the TTL) and B took it
    locks, name = Locks(db), key()
    a = locks.acquire(name, 5)
    assert a is not None and locks.acquire(name, 5) is None
    db.delete(name)
    b = locks.acquire(name, 30)
    assert b is not None
    # When A wakes up and renews, then releases, what it thinks is its lock
    renewed = locks.renew(name, a, 1)
    locks.release(name, a)
    # Then B's lock is untouched: same holder, TTL not cut to A's (a plain EXPIRE used to do that)
    assert not renewed
    assert db.get(name) == b and db.pttl(name) > 25_000
    assert locks.renew(name, b, 60) and db.pttl(name) > 55_000
    locks.release(name, b)
    assert db.get(name) is None


def test_a_held_lock_outlives_its_ttl_and_a_waiter_is_told_busy(db: redis.Redis) -> None:
    locks, name = Locks(db), key()
    with locks.held(name, ttl_s=0.6, wait_s=1, busy=Busy):
        token = db.get(name)
        # While held for several TTLs, the renewer keeps it (and it stays the same holder's)
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            assert db.get(name) == token
            time.sleep(0.05)
        # A second holder waits wait_s for it, then gets busy
        started = time.monotonic()
        with pytest.raises(Busy):
            with locks.held(name, ttl_s=0.6, wait_s=0.5, busy=Busy):
                pass
        assert 0.5 <= time.monotonic() - started < 3
    # Released at the end of the block: the next holder gets it at once
    assert db.get(name) is None
    with locks.held(name, ttl_s=0.6, wait_s=0, busy=Busy):
        assert db.get(name) is not None


def test_webhook_delivery_takes_the_same_lock(db: redis.Redis) -> None:
    hooks, job = WebhookStore(db, 60), uuid.uuid4().hex
    token = hooks.lock(job, 30_000)
    assert token is not None and hooks.lock(job, 30_000) is None  # another process's attempt waits
    hooks.unlock(job, "not-the-token")
    assert hooks.lock(job, 30_000) is None
    hooks.unlock(job, token)
    assert hooks.lock(job, 30_000) is not None
