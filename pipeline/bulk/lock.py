"""One submitter (or canceller) per bulk, across processes and threads; re-entrant within one thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tuwen.pipeline.bulk.records import Records
from tuwen.pipeline.errors import TuwenError
from tuwen.pipeline.jobs import redis_errors
from tuwen.pipeline.locks import Locks

#: The lock lapses this long after its holder dies; a resubmission waits that long for it at most.
LOCK_TTL_S = 10


class BulkBusy(TuwenError):
    code = "bulk_busy"
    retryable = True


class BulkLock:
    def __init__(self, locks: Locks) -> None:
        self.locks = locks
        #: The bulks this thread holds: a gateway's request thread must wait for its batch keeper's submitter.
        self._mine = threading.local()

    def busy(self, bulk_id: str) -> bool:
        """Whether a submitter or canceller (in any process, this one included) holds the bulk's lock now."""
        with redis_errors():
            return bool(self.locks.redis.exists(Records.lock_key(bulk_id)))

    @contextmanager
    def held(self, bulk_id: str, wait_s: float = LOCK_TTL_S + 2) -> Iterator[None]:
        """Hold the bulk's lock for the block. Taking it again inside the block (a bulk expiring while its
        submitter refreshes it) goes straight through; another thread of this process waits as another
        process would."""
        held: set[str] = self._mine.__dict__.setdefault("held", set())
        if bulk_id in held:
            yield
            return

        def busy() -> BulkBusy:
            return BulkBusy(f"bulk {bulk_id} is being submitted or cancelled by another process")

        with self.locks.held(Records.lock_key(bulk_id), LOCK_TTL_S, wait_s, busy):
            held.add(bulk_id)
            try:
                yield
            finally:
                held.discard(bulk_id)
