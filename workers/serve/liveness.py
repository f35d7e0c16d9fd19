"""A worker is live while its consuming loop runs: heartbeat, stall watchdog, shutdown deadline.

* **Pulse.** A consumer bootstep puts a one-second timer on Celery's event loop, the loop that reads
  the queues. Each tick records the time and the delivery tags the worker holds. Nothing else beats: a
  side thread only relays fresh beats to Redis (``registry.announce`` every ``PERIOD_S``, with the held
  tags for the reaper), so a worker whose loop has stopped drops out of ``tuwen status`` within
  ``registry.TTL_S`` even though its process and threads live on. (Before, a heartbeat thread kept a
  wedged worker "live" for good.)
* **Stall watchdog.** When the worker's queues have had jobs waiting for ``TUWEN_STALL_TIMEOUT_S`` and
  it took none in that time although it had room for more (or its loop had not run at all), the process
  exits with status 75 (``EX_TEMPFAIL``) so that its supervisor starts a fresh one; the reaper puts back
  what it held. While Redis is unreachable the queues cannot be read and nothing counts as a stall.
* **Shutdown deadline.** A warm shutdown (SIGTERM) still running after ``TUWEN_SHUTDOWN_TIMEOUT_S``, e.g.
  because Redis is gone and the batch cannot write its results, ends the process (status 1).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps, signals

from tuwen.pipeline import registry

log = logging.getLogger(__name__)

EXIT_STALLED = 75
EXIT_SHUTDOWN_TIMEOUT = 1
#: How often the consuming loop beats.
TICK_S = 1.0
#: A beat older than this is not relayed: the loop has stopped.
FRESH_S = 2 * registry.PERIOD_S


class Pulse:
    """What the consuming loop last reported. Written by the loop, read by the relay and the reaper."""

    def __init__(self) -> None:
        self.loop_at: float | None = None  #: monotonic time of the last beat; None before the first
        self.held: list[str] = []  #: delivery tags held at that beat
        self.room = True  #: whether the worker could take more messages (prefetch not used up)
        self.consumed_at = time.monotonic()  #: when a message last came off a queue

    def beat(self, held: list[str], room: bool) -> None:
        self.held, self.room, self.loop_at = held, room, time.monotonic()

    def consumed(self) -> None:
        self.consumed_at = time.monotonic()

    def loop_age(self) -> float:
        return float("inf") if self.loop_at is None else time.monotonic() - self.loop_at


def pulse_step(pulse: Pulse) -> type[bootsteps.StartStopStep]:
    """A consumer bootstep whose timer on the event loop feeds ``pulse`` (re-registered after a reconnect)."""

    class LoopPulse(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def register_with_event_loop(self, c: Any, hub: Any) -> None:
            hub.call_repeatedly(TICK_S, self.tick, c)
            self.tick(c)

        def tick(self, c: Any) -> None:
            qos = getattr(getattr(c.task_consumer, "channel", None), "qos", None)
            held = qos.held() if hasattr(qos, "held") else []
            room = qos.can_consume() if hasattr(qos, "can_consume") else True
            pulse.beat(held, room)

    return LoopPulse


class Repeating(threading.Thread):
    """Calls ``fn`` every ``interval_s`` seconds on a daemon thread until stopped; errors are logged."""

    def __init__(self, name: str, interval_s: float, fn: Callable[[], object]) -> None:
        super().__init__(name=name, daemon=True)
        self.interval_s, self.fn = interval_s, fn
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.fn()
            except Exception:  # noqa: BLE001 - a blip (Redis away) must not end the thread
                log.debug("%s failed", self.name, exc_info=True)
            self._stopped.wait(self.interval_s)

    def stop(self) -> None:
        self._stopped.set()


class Keeper:
    """Relays the pulse to the worker registry and watches for a stall; one per worker process."""

    def __init__(self, client: Any, name: str, info: dict[str, Any], pulse: Pulse, stall_timeout_s: float,
                 queue_depth: Callable[[], int | None], exit: Callable[[int], object] = os._exit) -> None:
        self.client, self.name, self.info, self.pulse = client, name, info, pulse
        self.stall_timeout_s, self.queue_depth, self._exit = stall_timeout_s, queue_depth, exit
        self.stopping = False
        self._waiting_since: float | None = None
        self._thread = Repeating("tuwen-heartbeat", registry.PERIOD_S, self.beat)

    def start(self) -> None:
        self._thread.start()

    def beat(self) -> None:
        """One relay: announce if the loop beat lately (or we are draining), then check for a stall."""
        age = self.pulse.loop_age()
        if self.stopping or age < FRESH_S:
            registry.announce(self.client, self.name, {**self.info, "held": self.pulse.held,
                                                       "loop_age_s": round(min(age, 1e6), 1),
                                                       "stopping": self.stopping})
        elif self.pulse.loop_at is not None:
            log.warning("the consuming loop has not run for %.0fs; not announcing this worker", age)
        if not self.stopping:
            self.check_stall()

    def check_stall(self) -> None:
        depth = self.queue_depth()
        now = time.monotonic()
        if not depth:  # empty, or unknown (Redis unreachable): not a stall
            self._waiting_since = None
            return
        self._waiting_since = self._waiting_since or now
        idle = min(now - self._waiting_since, now - self.pulse.consumed_at)
        if idle >= self.stall_timeout_s and (self.pulse.room or self.pulse.loop_age() >= self.stall_timeout_s):
            log.critical("stalled: %d jobs waiting and none taken for %.0fs (consuming loop last ran %.0fs ago); "
                         "exiting with status %d so that the supervisor restarts this worker",
                         depth, idle, self.pulse.loop_age(), EXIT_STALLED)
            self.leave(EXIT_STALLED)

    def leave(self, status: int) -> None:
        """Exit now, from any thread (the main one may be stuck): withdraw, flush, ``os._exit``."""
        self._thread.stop()
        try:
            registry.withdraw(self.client, self.name)
        except Exception:  # noqa: BLE001 - the announcement lapses by itself
            pass
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self._exit(status)

    def stop(self) -> None:
        """Normal end: stop relaying and withdraw the announcement."""
        self._thread.stop()
        try:
            registry.withdraw(self.client, self.name)
        except Exception:  # noqa: BLE001 - it lapses by itself
            pass

    def shutdown_started(self, timeout_s: float) -> None:
        """SIGTERM: keep announcing (the running batch's tags stay claimed) and arm the deadline."""
        if self.stopping:
            return
        self.stopping = True

        def overdue() -> None:
            log.error("warm shutdown still running after %.0fs; exiting (the jobs held go back to the queue)",
                      timeout_s)
            self.leave(EXIT_SHUTDOWN_TIMEOUT)

        timer = threading.Timer(timeout_s, overdue)
        timer.daemon = True
        timer.start()


def install_fault_stall(after: int) -> None:
    """Test hook (``TUWEN_FAULT_STALL_AFTER_JOBS``): block the consuming loop for good once ``after``
    messages were received, as a wedged Redis read did."""
    received = [0]

    def on_received(**_: Any) -> None:
        received[0] += 1
        if received[0] >= after:
            log.warning("fault injection: blocking the consuming loop for good")
            threading.Event().wait()

    signals.task_received.connect(on_received, weak=False)
