"""How the gateway takes connections: uvicorn with read deadlines and a connection cap.

uvicorn arms a timer only once a response is done (``timeout_keep_alive``), so a connection that sends
half a request head was held as long as the client liked (slowloris: 200 such connections sat for 45 s
and more), and one that trickles its body holds a request. ``GuardedH11Protocol`` closes a connection
whose request head is not complete ``gateway_header_timeout_s`` after the connection opened (kept
alive: after the next request's first byte), and one whose body has not all arrived
``gateway_body_timeout_s`` after its head.
Trickling bytes does not push a deadline back. ``server_options`` is the one uvicorn configuration,
used by ``tuwen gateway serve`` and by the tests.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
from typing import Any

import h11
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

from tuwen.pipeline.gateway.settings import GatewaySettings

log = logging.getLogger("tuwen.gateway")

#: Largest request head (request line and headers) h11 buffers; beyond it the client gets 400.
MAX_HEAD_BYTES = 16 * 1024
#: Idle seconds a kept-alive connection may wait for its next request.
KEEP_ALIVE_S = 5
_SLOW_HEAD = b"the request head came too slowly"
_HTTP_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_SLOW_HEAD), _SLOW_HEAD))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head and on each request body."""

    def __init__(self, *args: Any, header_timeout_s: float, body_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s, self.body_timeout_s = header_timeout_s, body_timeout_s
        self._phase: str | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("head")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow(received=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow(received=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        super().connection_lost(exc)

    def _follow(self, received: bool) -> None:
        """Arm the deadline of what the client owes now: the rest of a head, the rest of a body, or
        nothing (its request is in; between requests uvicorn's keep-alive timer is in charge)."""
        state = self.conn.their_state
        if state is h11.IDLE:
            started = received or bool(self.conn.trailing_data[0])
            self._arm("head" if started else None)
        elif state is h11.SEND_BODY:
            self._arm("body")
        else:
            self._arm(None)

    def _arm(self, phase: str | None) -> None:
        if phase == self._phase:
            return  # an armed deadline keeps running while bytes trickle in
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is not None:
            delay = self.header_timeout_s if phase == "head" else self.body_timeout_s
            self._deadline = self.loop.call_later(delay, self._expired)

    def _expired(self) -> None:
        phase, self._phase, self._deadline = self._phase, None, None
        if self.transport.is_closing():
            return
        client = "%s:%d" % self.client if self.client else "?"
        if phase == "head":
            log.info("closing %s: no complete request head within %gs", client, self.header_timeout_s)
            if self.conn.our_state is h11.IDLE:
                self.transport.write(_HTTP_408)
        else:
            log.info("closing %s: the request body did not arrive within %gs", client, self.body_timeout_s)
        self.transport.close()


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging configuration, plus tuwen's own loggers at ``level`` (``tuwen.gateway``: each
    chat request's job, owner, ``user`` and ``metadata``; outages; connections closed for slowness),
    with the time and the logger's name. Without it their INFO lines went nowhere."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["tuwen"] = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    config["handlers"]["tuwen"] = {"class": "logging.StreamHandler", "formatter": "tuwen",
                                   "stream": "ext://sys.stderr"}
    config["loggers"]["tuwen"] = {"handlers": ["tuwen"], "level": level.upper(), "propagate": False}
    return config


def server_options(gw: GatewaySettings) -> dict[str, Any]:
    """``uvicorn.run`` / ``uvicorn.Config`` keyword arguments for the gateway."""
    return {
        "host": gw.gateway_host,
        "port": gw.gateway_port,
        # A partial of a module-level class: it pickles, so ``--workers N`` processes get it too.
        "http": functools.partial(GuardedH11Protocol, header_timeout_s=gw.gateway_header_timeout_s,
                                  body_timeout_s=gw.gateway_body_timeout_s),
        "ws": "none",
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
        "timeout_keep_alive": KEEP_ALIVE_S,
        "limit_concurrency": gw.gateway_max_connections or None,
        "proxy_headers": False,
        "server_header": False,
    }
