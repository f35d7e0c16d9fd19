"""The worker's Redis transport reads interactive queues past a full prefetch (``workers/serve/transport.py``):
under a bulk backlog the prefetch is always used up, and an interactive message used to wait in Redis
until a bulk hand-over was acknowledged. Real Redis, real kombu consumer, nothing acknowledged."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue

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


def drain(conn: Connection) -> None:
    while True:
        try:
            conn.drain_events(timeout=0.5)
        except (socket.timeout, TimeoutError):
            return


def test_interactive_messages_are_read_past_a_full_prefetch_and_bulk_ones_are_not(connection: Connection) -> None:
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
        drain(connection)
        # Then two of them (the room) are read past the full prefetch, and no more bulk ones
        keys = [m.delivery_info["routing_key"] for m in received]
        assert keys.count(INTERACTIVE.routing_key) == 2 and keys.count(BULK.routing_key) == 3, keys
        assert connection.default_channel.client.llen(INTERACTIVE.name) == 1
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
