"""The worker's Redis transport: kombu's, with three changes so that a worker keeps going.

* **Poison is refused alone.** Each message BRPOP hands over is screened before Celery sees it: the kombu
  envelope here, the Celery call and the job by the worker's ``Screen`` (``tuwen.workers.serve.poison``). A
  message that fails is handed to the screen (logged, counted, moved to the dead-letter list) and the
  worker reads the next one. Before, ``'not json'``, ``'[1,2,3]'`` or a body that is not base64 made
  the worker exit ("Unrecoverable error"), and ``'{"foo":1}'`` made it reconnect forever.
* **Pub/sub reads never block.** redis-py reads a blocking pub/sub reply with no timeout at all (it sets
  none on purpose), and when that read first reconnects, as after a Redis restart, it waited forever on a
  connection with nothing to say: the worker's consuming loop stopped for good and SIGTERM hung (measured:
  SIGSTOP the worker, restart Redis, SIGCONT). The loop only reads when the socket is readable, so a
  read that waits at most a second loses nothing.
* **No message is lost in flight.** kombu's BRPOP removes a message from Redis before the worker records
  it as unacknowledged; a worker killed between the two lost it for good (measured: 1 of 30 jobs in the
  kill -9 drill), and so did a Redis primary that died between them after replicating the pop (1 of
  38 jobs in a Sentinel failover drill, the kill timed just after a submit). This transport takes every
  message with a Lua script that pops it and records it in the same step. When the queues are empty it
  waits with BRPOP on the queues' wake lists (``keys.WAKE``), never on the queues: producers push a
  token there after each message, so a token wakes one idle worker at once, and a lost token costs at
  most ``brpop_timeout`` (1 s) before the next look.
* **The QoS tells which delivery tags it holds** (received, not acknowledged), for the heartbeat that
  the reaper (``tuwen.workers.serve.reaper``) reads.
* **Interactive jobs get past a full prefetch.** Under a bulk backlog the prefetch is always used up
  (about two batches held), so an interactive message waited in Redis until a hand-over of bulk jobs was
  acknowledged. When the prefetch is full the worker still reads its interactive queues, holding up to
  ``tuwen_interactive_room`` such messages beyond it.

Only the worker uses it, for ``redis://`` and ``redis+sentinel://`` brokers (``broker_transport``); producers keep
kombu's own.
"""

from __future__ import annotations

import binascii
import logging
import time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from tuwen.pipeline import sentinel
from tuwen.pipeline.keys import WAKE

log = logging.getLogger(__name__)

#: Longest a pub/sub read waits for the rest of a reply once the socket was readable.
PUBSUB_READ_TIMEOUT_S = 1.0

# KEYS: unacked hash, unacked index, then the queue keys in the order BRPOP would read them; ARGV: now.
# Pops the next message and records it as unacknowledged as kombu's QoS.append does (same tag, same
# ``[payload, exchange, routing key]`` JSON), in one step; returns {queue key, message} or nil. A message
# that is not a kombu envelope is returned unrecorded (the screen refuses it).
_POP_AND_RECORD = """
for i = 3, #KEYS do
  local m = redis.call('RPOP', KEYS[i])
  if m then
    local ok, p = pcall(cjson.decode, m)
    if ok and type(p) == 'table' and type(p.properties) == 'table' and type(p.properties.delivery_tag) == 'string'
        and type(p.properties.delivery_info) == 'table' then
      local info = p.properties.delivery_info
      local entry = '[' .. m .. ',' .. cjson.encode(info.exchange) .. ',' .. cjson.encode(info.routing_key) .. ']'
      redis.call('HSET', KEYS[1], p.properties.delivery_tag, entry)
      redis.call('ZADD', KEYS[2], ARGV[1], p.properties.delivery_tag)
    end
    return {KEYS[i], m}
  end
end
return false
"""


class Refused(Exception):
    """A message the worker will not run; ``reason`` is a short code (a metric label), ``job_id`` set when
    known, ``detail`` what exactly was wrong, for the log."""

    def __init__(self, reason: str, job_id: str | None = None, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.job_id, self.detail = reason, job_id, detail


#: Each worker's screen by the name its transport options carry: the options must stay plain JSON, since a
#: worker reports them in ``celery inspect stats`` (a Screen object there made every stats reply fail,
#: and Flower showed no pool, broker or resource figures).
_SCREENS: dict[str, Any] = {}


def screen_option(screen: Any) -> str:
    """The transport-option value that hands ``screen`` to the worker's channels."""
    name = f"screen-{id(screen)}"
    _SCREENS[name] = screen
    return name


class QoS(kombu_redis.QoS):
    channel: Channel

    def can_consume(self) -> bool:
        return super().can_consume() or self.interactive_room() > 0

    def full(self) -> bool:
        """The prefetch is used up (only interactive messages may still be read)."""
        return not super().can_consume()

    def interactive_room(self) -> int:
        """How many more interactive messages may be held beyond a full prefetch."""
        room, queues = self.channel.tuwen_interactive_room, self.channel.tuwen_interactive_queues
        if not room:
            return 0
        acked = self._dirty.copy()
        held = sum(1 for tag, message in list(self._delivered.items())
                   if tag not in acked and message.delivery_info.get("routing_key") in queues)
        return room - held

    def held(self) -> list[str]:
        """Delivery tags received and not yet acknowledged. Call it from the consuming thread (acks from
        other threads only mark tags, which ``copy`` reads atomically)."""
        acked = self._dirty.copy()
        return [tag for tag in self._delivered if tag not in acked]


class _BoundedPubSubRead:
    """A pub/sub client whose reads wait at most ``PUBSUB_READ_TIMEOUT_S`` (see the module docstring)."""

    def __init__(self, pubsub: Any) -> None:
        self._pubsub = pubsub

    def parse_response(self, block: bool = True, timeout: float = 0) -> Any:
        return self._pubsub.parse_response(block=False, timeout=PUBSUB_READ_TIMEOUT_S)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pubsub, name)


class Channel(kombu_redis.Channel):
    QoS = QoS
    #: Decides about each message and takes the refused ones (``tuwen.workers.serve.poison.Screen``); set per
    #: worker through the transport option ``tuwen_screen`` (``screen_option``). None: envelope checks only,
    #: refusals logged.
    tuwen_screen: str | None = None
    #: Queues read past a full prefetch, and how many of their messages may be held beyond it.
    tuwen_interactive_queues: tuple[str, ...] = ()
    tuwen_interactive_room = 0
    from_transport_options = kombu_redis.Channel.from_transport_options + (
        "tuwen_screen", "tuwen_interactive_queues", "tuwen_interactive_room")
    #: Read with the pop-and-record script next (the last read found a message, or a wait just ended),
    #: rather than wait on the wake lists.
    _backlog = True
    #: The read in flight is a wait on the wake lists (its reply is a token or nothing, never a message).
    _waking = False

    def _brpop_start(self, timeout: float | None = None) -> None:
        if self.global_keyprefix:
            return super()._brpop_start(timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if queues and self.qos.full():
            queues = [q for q in queues if q in self.tuwen_interactive_queues]
        if not queues:
            return None
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        self._waking = not self._backlog
        if self._backlog:
            self.client.connection.send_command("EVAL", _POP_AND_RECORD, 2 + len(keys), self.unacked_key,
                                                self.unacked_index_key, *keys, time.time())
        else:  # wait for a token (or kombu's timeout), then look with the script
            wait = self.brpop_timeout if timeout is None else timeout
            self.client.connection.send_command("BRPOP", *[WAKE + queue for queue in queues], wait or 0)
        return None

    def _get_client(self) -> Any:
        base = super()._get_client()
        if not isinstance(base, type):  # a global key prefix: kombu's own client, unscreened
            return base
        channel = self

        class ScreeningClient(base):  # type: ignore[misc, valid-type]
            def parse_response(self, connection: Any, command_name: str, **options: Any) -> Any:
                reply = super().parse_response(connection, command_name, **options)
                if command_name == "BRPOP" and channel._waking:  # a token, or the wait timed out: look next
                    channel._backlog = True
                    return None
                if command_name == "BRPOP":  # a pop-and-record reply (BRPOP's shape)
                    channel._backlog = bool(reply)
                    if reply:
                        return channel._screen(reply)
                return reply

        return ScreeningClient

    def _screen(self, reply: Any) -> Any:
        """The BRPOP reply unchanged, or None (as if nothing came) when the message was refused."""
        dest, item = reply
        queue = bytes_to_str(dest).rsplit(self.sep, 1)[0]
        screen = _SCREENS.get(self.tuwen_screen) if self.tuwen_screen else None
        if screen is not None:
            screen.consumed()
        try:
            message = self._envelope(item)
            if screen is not None:
                screen.check(message)
            return reply
        except Refused as refused:
            self._forget(item)
            text = item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
            if screen is not None:
                screen.refuse(queue, text, refused)
            else:
                kombu_redis.logger.error("dropped a message on %s that is not a kombu envelope (%s): %.2000s",
                                         queue, refused, text)
            return None

    def _forget(self, item: Any) -> None:
        """Drop a refused message's unacknowledged record, if the pop-and-record script wrote one."""
        try:
            tag = loads(bytes_to_str(item))["properties"]["delivery_tag"]
        except Exception:  # noqa: BLE001 - no tag, no record
            return
        if isinstance(tag, str):
            try:
                with self.conn_or_acquire() as client:
                    client.pipeline().zrem(self.unacked_index_key, tag).hdel(self.unacked_key, tag).execute()
            except self.connection_errors:
                log.warning("could not drop the unacked record of refused message %s", tag)

    def _envelope(self, item: Any) -> Any:
        """The kombu message in ``item``, built as kombu will build it, or ``Refused``."""
        try:
            payload = loads(bytes_to_str(item))
        except (UnicodeDecodeError, ValueError, TypeError) as exc:
            raise Refused("not_json") from exc
        if not isinstance(payload, dict) or not isinstance(payload.get("properties"), dict):
            raise Refused("not_an_envelope")
        try:
            message = self.Message(payload, channel=self)
        except (binascii.Error, ValueError, TypeError, AttributeError) as exc:
            raise Refused("bad_body_encoding") from exc
        except KeyError as exc:
            raise Refused("not_an_envelope") from exc
        info = message.delivery_info
        if (not isinstance(info, dict) or "exchange" not in info or "routing_key" not in info
                or not isinstance(message.delivery_tag, str) or message.errors):
            raise Refused("not_an_envelope")
        return message

    def _receive_one(self, c: Any) -> Any:
        return super()._receive_one(_BoundedPubSubRead(c))


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The same channel on kombu's Sentinel pool: each new connection goes to the current primary."""

    from_transport_options = kombu_redis.SentinelChannel.from_transport_options + (
        "tuwen_screen", "tuwen_interactive_queues", "tuwen_interactive_room")


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel




def transport_for(broker_url: str) -> str:
    """The transport class a worker names in ``broker_transport`` for ``broker_url``."""
    kind = "SentinelTransport" if sentinel.parse(broker_url) else "Transport"
    return f"{__name__}:{kind}"
