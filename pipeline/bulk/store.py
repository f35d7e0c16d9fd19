"""``BulkStore``: create, submit, refresh, cancel, list and read bulks; the one front door the CLI, the
evaluation and the HTTP API use. Jobs are prepared and published through the ``Client``.

The bulk of an input is found again by its id (a hash of the input, its options and the owner), so the
same submission run again continues it; ``fresh`` makes a new bulk of the same input instead. A batch
created over HTTP is ``create``d first (``validating``, answered at once) and then ``submit``ted by its id.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import redis

from tuwen.pipeline.bulk.files import FileStore
from tuwen.pipeline.bulk.lock import BulkLock
from tuwen.pipeline.bulk.manifest import InvalidManifest, Source, check
from tuwen.pipeline.bulk.model import LEGACY_ID_PREFIX, Bulk, BulkState, OpenAIBatch, bulk_id_for
from tuwen.pipeline.bulk.outputs import Outputs, result_lines
from tuwen.pipeline.bulk.progress import Progress
from tuwen.pipeline.bulk.records import Records
from tuwen.pipeline.bulk.submission import LinePreparer, QuestionLines, SubmitProgress, Submission
from tuwen.pipeline.client import Client
from tuwen.pipeline.locks import Locks

DEFAULT_WINDOW_S = 24 * 3600.0


class BulkStore:
    """Bulks in Redis, their jobs through ``client``, their output files in the results bucket."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.settings = client.settings
        self.redis: redis.Redis = client.jobs.redis
        self.records = Records(self.redis, client.jobs, self.settings.result_ttl_s)
        self.lock = BulkLock(Locks(self.redis))
        self.files = FileStore(self.redis, self.settings)
        self.progress = Progress(self.records, client.jobs, Outputs(self.settings), self.files, self.lock)

    # -- reading -----------------------------------------------------------------------------------------
    def get(self, bulk_id: str) -> Bulk:
        """The bulk; ``bulk_not_found`` if there is none."""
        return self.records.get(bulk_id)

    def recent(self, limit: int = 20) -> list[Bulk]:
        """The newest bulks first."""
        return self.records.recent(limit)

    def owned(self, owner: str, limit: int = 20, after: str | None = None) -> tuple[list[Bulk], bool]:
        """The owner's bulks, newest first, after the bulk ``after``; and whether there are more."""
        return self.records.owned(owner, limit, after)

    def results(self, bulk_id: str) -> Iterator[dict[str, Any]]:
        """One dict per input line handled so far, in input order (streamed page by page)."""
        return result_lines(self.records, self.get(bulk_id))

    # -- submitting --------------------------------------------------------------------------------------
    def submit(self, source: Source, *, owner: str = "default", window_s: float = DEFAULT_WINDOW_S,
               fresh: bool = False, concurrency: int = 8, stop: threading.Event | None = None,
               on_progress: Callable[[SubmitProgress], None] | None = None,
               metadata: dict[str, str] | None = None, prepare: LinePreparer | None = None,
               bulk_id: str | None = None) -> Bulk:
        """Create (or resume) the bulk for ``source`` and enqueue its remaining lines; returns the bulk.
        ``bulk_id`` names the bulk (one ``create``d before) instead of the input's hash.

        Lines become jobs through ``prepare`` (default: ``QuestionLines``, a picture and a question).
        Refuses the input with ``InvalidManifest`` (the bulk is then ``failed``). Stops early, resumably,
        when ``stop`` is set or the bulk is cancelled. An unreachable service raises ``Unavailable``; the
        bulk stays ``in_progress`` and the same call later continues it.
        """
        bulk_id = bulk_id or self._id_for(source.digest(), owner, fresh)
        with self.lock.held(bulk_id):
            bulk = self._open(bulk_id, source, owner, window_s, metadata or {})
            if bulk.state == BulkState.in_progress or bulk.unread:  # a stopped bulk's rest is recorded as such
                lines = prepare or QuestionLines(self.client, source.base)
                Submission(self.client, self.records, bulk, lines, stop=stop, on_progress=on_progress).run(
                    source, concurrency)
        return self.refresh(bulk_id)

    def _id_for(self, digest: str, owner: str, fresh: bool) -> str:
        if fresh:
            return bulk_id_for(digest, owner, uuid.uuid4().hex)
        bulk_id, legacy = bulk_id_for(digest, owner), bulk_id_for(digest, owner, prefix=LEGACY_ID_PREFIX)
        # An input first submitted when bulks were still called batches resumes under its old id.
        return legacy if not self.records.exists(bulk_id) and self.records.exists(legacy) else bulk_id

    def create(self, bulk_id: str, *, name: str, owner: str, window_s: float = DEFAULT_WINDOW_S,
               metadata: dict[str, str] | None = None, openai: OpenAIBatch | None = None) -> Bulk:
        """A new bulk, ``validating``, to ``submit`` by its id later (a batch created over HTTP)."""
        self.records.create(bulk_id, name=name, owner=owner, window_s=window_s, metadata=metadata or {}, openai=openai)
        return self.records.get(bulk_id)

    def _open(self, bulk_id: str, source: Source, owner: str, window_s: float, metadata: dict[str, str]) -> Bulk:
        """The bulk, created and validated if it is new (or was left ``validating`` by a dead process)."""
        existing = self.records.find(bulk_id)
        if existing is not None and existing.state == BulkState.failed:
            raise InvalidManifest(existing.errors)
        if existing is not None and existing.state != BulkState.validating:
            return existing
        if existing is None:
            self.records.create(bulk_id, name=source.name, owner=owner, window_s=window_s, metadata=metadata)
        total, problems = check(source)
        self.records.validated(bulk_id, total, problems)
        if problems:
            raise InvalidManifest([p.text for p in problems])
        return self.records.get(bulk_id)

    # -- progress, completion, cancellation --------------------------------------------------------------
    def refresh(self, bulk_id: str) -> Bulk:
        """Count finished lines (from where the last refresh stopped); finalize or expire when due."""
        return self.progress.refresh(bulk_id)

    def cancel(self, bulk_id: str) -> Bulk:
        """Stop the bulk: the submitter stops, queued jobs are cancelled, running ones finish (until then
        the bulk is ``cancelling``, then ``cancelled``)."""
        return self.progress.halt(bulk_id, BulkState.cancelled)

    def wait(self, bulk_id: str, timeout: float | None = None, poll_s: float = 1.0,
             on_update: Callable[[Bulk], None] | None = None) -> Bulk:
        """Refresh until the bulk ends (or ``timeout`` seconds pass); returns it either way."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            bulk = self.refresh(bulk_id)
            if on_update:
                on_update(bulk)
            if bulk.state.terminal or (deadline is not None and time.monotonic() >= deadline):
                return bulk
            time.sleep(poll_s)
