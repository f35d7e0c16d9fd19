"""The worker's Redis transport reads interactive queues past a full prefetch (``workers/serve/transport.py``):
under a bulk backlog the prefetch is always used up, and an interactive message used to wait in Redis
until a bulk hand-over was acknowledged. Real Redis, real kombu consumer, nothing acknowledged."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from tuwen.pipeline.keys import WAKE
from tuwen.pipeline.localredis import LocalRedis

pytestmark = pytest.mark.integration

EXCHANGE = Exchange("tuwen-transport-test", type="direct")
INTERACTIVE, BULK = Queue("tt-interactive", EXCHANGE, "tt-interactive"), Queue("tt-bulk", EXCHANGE, "tt-bulk")


@pytest.fixture
def connection(redis_server: LocalRedis) -> Iterator[Connection]:
    url = redis_server.url.rsplit("/", 1)[0] + "/9"
    with Connection(url, transport="tuwen.workers.serve.transport:Transport",
                    transport_options={"tuwen_interactive_queues": (INTERACTIVE.name,),
                                       "tuwen_interactive_room": 2}) as conn:
        conn.default_channel.client.flushdb()
        yield conn


@pytest.fixture
def side(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    """A client of the same database beside the consumer (whose own connection has a read in flight)."""
    client = redis.Redis(port=redis_server.port, db=9, decode_responses=True)
    yield client
    client.close()


def drain(conn: Connection) -> None:
    while True:
        try:
            conn.drain_events(timeout=0.5)
        except (socket.timeout, TimeoutError):
            return


def test_interactive_messages_are_read_past_a_full_prefetch_and_bulk_ones_are_not(connection: Connection,
                                                                                    side: redis.Redis) -> None:
    received: list[Any] = []
    producer = connection.Producer(serializer="json")
    for n in range(6):
        producer.publish({"n": n}, exchange=EXCHANGE, routing_key=BULK.routing_key, declare=[INTERACTIVE, BULK])
    consumer = connection.Consumer([INTERACTIVE, BULK], callbacks=[lambda body, message: received.append(message)],
                                   prefetch_count=3)
    with consumer:
        # Given a full prefetch of bulk messages (3 of 6 read, none acknowledged)
        drain(connection)
        assert [m.delivery_info["routing_key"] for m in received] == [BULK.routing_key] * 3
        # When interactive messages arrive
        for n in range(3):
            producer.publish({"i": n}, exchange=EXCHANGE, routing_key=INTERACTIVE.routing_key)
            side.lpush(WAKE + INTERACTIVE.name, 1)  # as Client.publish does
        drain(connection)
        # Then two of them (the room) are read past the full prefetch, and no more bulk ones
        keys = [m.delivery_info["routing_key"] for m in received]
        assert keys.count(INTERACTIVE.routing_key) == 2 and keys.count(BULK.routing_key) == 3, keys
        assert side.llen(INTERACTIVE.name) == 1
        # And acknowledging one interactive message makes room for the third
        received[3].ack()
        drain(connection)
        keys = [m.delivery_info["routing_key"] for m in received]
        assert keys.count(INTERACTIVE.routing_key) == 3 and keys.count(BULK.routing_key) == 3, keys
        for message in received:
            if not message.acknowledged:
                message.ack()
        drain(connection)  # with room again, the rest of the bulk comes
        assert [m.delivery_info["routing_key"] for m in received].count(BULK.routing_key) == 6


def test_an_idle_worker_waits_on_the_wake_lists_so_no_message_is_popped_before_it_is_recorded(
        connection: Connection, side: redis.Redis) -> None:
    """kombu's BRPOP popped a message before the worker recorded it: Redis dying in between lost it."""
    received: list[Any] = []
    producer = connection.Producer(serializer="json")
    client = side
    consumer = connection.Consumer([INTERACTIVE, BULK], callbacks=[lambda body, message: received.append(message)],
                                   prefetch_count=8)
    with consumer:
        drain(connection)  # the worker idles: its read in flight is a wait on the wake lists
        # Given a message published with no wake token, while the worker waits
        producer.publish({"n": 1}, exchange=EXCHANGE, routing_key=BULK.routing_key, declare=[INTERACTIVE, BULK])
        # Then the waiting read did not take it: it is in the queue, or recorded with the message it became
        assert client.llen(BULK.name) + client.hlen("unacked") == 1
        # And the next look (after the wait's 1 s timeout) reads it, recorded as unacknowledged
        drain_until(connection, received, 1, timeout=3)
        assert client.hlen("unacked") == 1 and client.llen(BULK.name) == 0
        # And a message with a token is read at once
        producer.publish({"n": 2}, exchange=EXCHANGE, routing_key=INTERACTIVE.routing_key)
        client.lpush(WAKE + INTERACTIVE.name, 1)
        drain_until(connection, received, 2, timeout=0.5)
        assert client.hlen("unacked") == 2
        for message in received:
            message.ack()


def drain_until(conn: Connection, received: list[Any], count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(received) < count:
        assert time.monotonic() < deadline, f"{len(received)} of {count} messages within {timeout} s"
        try:
            conn.drain_events(timeout=0.1)
        except (socket.timeout, TimeoutError):
            pass
