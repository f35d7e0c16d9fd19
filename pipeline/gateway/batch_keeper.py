"""The batches of the HTTP API: created, read, listed and cancelled for their owners, and kept going in
the background of every gateway process (``BatchKeeper.start``).

A batch is a bulk (``bulk.store.BulkStore``): the same records, bulk queue, resume, expiry and result files
as ``tuwen bulk submit``. ``POST /v1/batches`` only records it, ``validating``, and answers at once. Then a
gateway thread validates its input file (streamed), submits the lines (``ChatLines``) under the bulk's lock,
refreshes it until it ends (counts; its output and error files; expiry) and delivers its webhook. The
batches still to tend are a set in Redis (``keys.BATCHES_TENDED``) that every gateway process on the same
bulk queue reads, so a
gateway that dies loses nothing: the next one to look resumes the validation or the submission where the
records say it stopped (the dead process's lock lapses within ``lock.LOCK_TTL_S``), and two processes
never submit the same batch at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import redis
from fastapi import Depends, Request

from tuwen.pipeline import keys
from tuwen.pipeline.bulk.files import BATCH_PURPOSE, FileStore, StoredFile, no_such_file
from tuwen.pipeline.bulk.lock import BulkBusy
from tuwen.pipeline.bulk.manifest import InvalidManifest
from tuwen.pipeline.bulk.model import ENDPOINTS, Bulk, BulkState, InputError, OpenAIBatch, batch_id
from tuwen.pipeline.bulk.openai_input import BatchInput
from tuwen.pipeline.bulk.store import BulkStore
from tuwen.pipeline.errors import InvalidInput, NotFound, Unavailable
from tuwen.pipeline.gateway.batch_lines import ChatLines
from tuwen.pipeline.gateway.batch_objects import COMPLETION_WINDOW, WINDOW_S, BatchCreate
from tuwen.pipeline.gateway.batch_webhooks import BatchWebhooks, owed
from tuwen.pipeline.gateway.bodylimits import chat_limit
from tuwen.pipeline.gateway.state import GatewayState
from tuwen.pipeline.jobs import redis_errors
from tuwen.pipeline.locks import Locks
from tuwen.pipeline.gateway.webhooks import check_callback_url

log = logging.getLogger("tuwen.gateway")

#: Seconds between two passes over the batches to tend (a new batch or a finished submission wakes it).
POLL_S = 1.0
#: Batches one gateway process validates or submits at once (their lines are prepared 4 at a time).
SUBMITTERS = 2


class BatchEnded(InvalidInput):
    code = "batch_ended"


def no_such_batch(batch_id: str) -> NotFound:
    """The one refusal for a batch that does not exist and for another owner's."""
    return NotFound(f"no batch {batch_id}", code="bulk_not_found")


def needs_input(bulk: Bulk) -> bool:
    """Whether the batch still reads its input file: to validate it, to submit lines, or (stopped) to record
    the lines it never submitted."""
    return bulk.state == BulkState.validating or bulk.unread or (
        bulk.state == BulkState.in_progress and bulk.submitted < bulk.request_counts.total)


class BatchKeeper:
    """The Batch API of one gateway process; ``start`` / ``stop`` run its background thread."""

    def __init__(self, state: GatewayState, poll_s: float = POLL_S) -> None:
        self.state, self.poll_s = state, poll_s
        #: The batches this process tends: those whose lines go to its bulk queue.
        self.tended_key = keys.BATCHES_TENDED + state.settings.bulk_queue
        self.store = BulkStore(state.client)
        self.files: FileStore = self.store.files
        # Submissions hold the bulk's lock through a store of their own: a cancel in a request thread then
        # waits for the submitter to let go, as it would for another process (the lock is re-entrant per store).
        self._submitter = BulkStore(state.client)
        self.lines = ChatLines(state)
        self.webhooks = BatchWebhooks(state.gw, self.store.records, Locks(state.redis))
        self._stop, self._wake = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tuwen-batch-keeper", daemon=True)
        self._pool = ThreadPoolExecutor(max_workers=SUBMITTERS, thread_name_prefix="tuwen-batch-submit")
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._missing: set[str] = set()
        self._stuck: set[str] = set()

    # -- the owners' side ----------------------------------------------------------------------------------
    def create(self, owner: str, body: BatchCreate, bulk_id: str | None = None) -> Bulk:
        """Record a new batch of ``owner``'s file (under ``bulk_id`` if given, an id an ``Idempotency-Key``
        reserved), ``validating``; the keeper takes it from there."""
        if body.endpoint not in ENDPOINTS:
            raise InvalidInput(f"endpoint must be one of {', '.join(ENDPOINTS)}: tuwen serves chat completions and "
                               "responses", code="invalid_endpoint")
        if body.completion_window != COMPLETION_WINDOW:
            raise InvalidInput(f"completion_window must be {COMPLETION_WINDOW}", code="invalid_completion_window")
        file = self.files.get(body.input_file_id, owner)
        if file.purpose != BATCH_PURPOSE:
            raise InvalidInput(f"input_file_id: {file.id} has purpose {file.purpose}; a batch reads a file "
                               "uploaded with purpose batch", code="invalid_params")
        if body.callback_url is not None:
            check_callback_url(body.callback_url, self.state.gw)
        bulk_id = bulk_id or batch_id()
        facts = OpenAIBatch(input_file_id=file.id, endpoint=body.endpoint, completion_window=COMPLETION_WINDOW,
                            callback_url=body.callback_url)
        self.files.hold(file.id, bulk_id)
        with redis_errors():  # tended first: a batch recorded by a process that dies next is still found
            self.state.redis.sadd(self.tended_key, bulk_id)
        bulk = self.store.create(bulk_id, name=f"{file.filename} ({file.id})", owner=owner, window_s=WINDOW_S,
                                 metadata=dict(body.metadata or {}), openai=facts)
        self._wake.set()
        return bulk

    def get(self, bulk_id: str, owner: str) -> Bulk:
        """The owner's batch (or bulk), its counts as of now."""
        found = self.store.records.find(bulk_id)
        if found is None or found.owner != owner:
            raise no_such_batch(bulk_id)
        return self.store.refresh(bulk_id)

    def page(self, owner: str, limit: int, after: str | None) -> tuple[list[Bulk], bool]:
        return self.store.owned(owner, limit, after)

    def cancel(self, bulk_id: str, owner: str) -> Bulk:
        """Cancel the owner's batch: ``cancelling`` while its running lines finish, then ``cancelled``
        with the output of the lines that finished. Cancelling it again answers the same."""
        bulk = self.get(bulk_id, owner)
        if bulk.state in (BulkState.completed, BulkState.failed, BulkState.expired):
            raise BatchEnded(f"the batch has ended ({bulk.state.value}); it can no longer be cancelled")
        if bulk.state in (BulkState.cancelling, BulkState.cancelled):
            return bulk
        bulk = self.store.cancel(bulk_id)
        self._wake.set()
        return bulk

    def file_readers(self, file: StoredFile) -> list[str]:
        """The batches that still read ``file`` (those done with it are forgotten on the way)."""
        reading = []
        for reader in self.files.readers(file.id):
            bulk = self.store.records.find(reader)
            if bulk is not None and needs_input(bulk):
                reading.append(reader)
            else:
                self.files.release(file.id, reader)
        return reading

    # -- the background --------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.webhooks.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tend()
            except (Unavailable, redis.RedisError) as exc:
                log.warning("tending the batches: %s; trying again in %gs", exc, self.poll_s)
            except Exception:  # noqa: BLE001 - a bug must not stop the batches for good
                log.exception("tending the batches failed; trying again in %gs", self.poll_s)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def tend(self) -> None:
        """One pass: every batch to tend moves on as far as it can now."""
        with redis_errors():
            tended: set[str] = self.state.redis.smembers(self.tended_key)
        for bulk_id in sorted(tended):
            if self._stop.is_set():
                return
            try:
                self._tend(bulk_id)
            except (Unavailable, redis.RedisError):
                raise  # Redis or storage is away for every batch: end the pass
            except Exception:  # noqa: BLE001 - one batch's trouble must not stop the others
                log.exception("tending batch %s failed", bulk_id)

    def _tend(self, bulk_id: str) -> None:
        bulk = self.store.records.find(bulk_id)
        if bulk is None:  # gone (expired), or created a moment ago by a process about to record it
            if bulk_id in self._missing:
                self._forget(bulk_id)
            self._missing.add(bulk_id)
            return
        self._missing.discard(bulk_id)
        if not bulk.state.terminal:
            bulk = self.store.refresh(bulk_id)
        if needs_input(bulk) and not (bulk.unread and self._input_of(bulk) is None):
            self._submit_soon(bulk_id)  # (a stopped batch whose input is gone ends without its unread lines)
            return
        if bulk.openai is not None:
            self.files.release(bulk.openai.input_file_id, bulk_id)
        if not bulk.state.terminal or (bulk.state != BulkState.failed and bulk.output_key is None):
            return  # running, or ended with lines still finishing (its files come when they have)
        if owed(bulk):
            self.webhooks.deliver(bulk_id)
            bulk = self.store.records.get(bulk_id)
        if not owed(bulk):
            self._forget(bulk_id)

    def _forget(self, bulk_id: str) -> None:
        with redis_errors():
            self.state.redis.srem(self.tended_key, bulk_id)
        self._missing.discard(bulk_id)

    def _submit_soon(self, bulk_id: str) -> None:
        with self._busy_lock:
            if bulk_id in self._busy:
                return
            self._busy.add(bulk_id)
        self._pool.submit(self._submit, bulk_id)

    def _submit(self, bulk_id: str) -> None:
        """Validate the batch's input if it was not yet, then submit its remaining lines (resumably)."""
        try:
            bulk = self.store.records.get(bulk_id)
            if (file := self._input_of(bulk)) is None:
                self._input_gone(bulk)
                return
            assert bulk.openai is not None, "only batches created over HTTP are tended"
            source = BatchInput(self.files, file, bulk.openai.endpoint, max_line_bytes=chat_limit(
                self.state.settings, self.state.gw), max_lines=self.state.gw.max_batch_lines)
            self._submitter.submit(source, bulk_id=bulk_id, owner=bulk.owner, prepare=self.lines, stop=self._stop,
                                   concurrency=4)
        except InvalidManifest:
            pass  # the batch is failed, its errors recorded: the next pass sends its webhook
        except BulkBusy:
            pass  # another gateway process is on it
        except Exception:  # noqa: BLE001 - e.g. storage away: the next pass resumes where the records say
            log.exception("submitting batch %s stopped; it resumes on a later pass", bulk_id)
        finally:
            with self._busy_lock:
                self._busy.discard(bulk_id)
            self._wake.set()

    def _input_of(self, bulk: Bulk) -> StoredFile | None:
        return self.files.find(bulk.openai.input_file_id) if bulk.openai is not None else None

    def _input_gone(self, bulk: Bulk) -> None:
        """The input file expired or was deleted before the batch read it all."""
        gone = InputError(line=None, code="unknown_file", message=str(no_such_file(
            bulk.openai.input_file_id if bulk.openai else "").message))
        if bulk.state == BulkState.validating:
            self.store.records.validated(bulk.id, 0, [gone])
        elif bulk.id not in self._stuck:
            self._stuck.add(bulk.id)
            log.warning("batch %s: its input file is gone after %d of %d lines; the rest expire with the batch",
                        bulk.id, bulk.submitted, bulk.request_counts.total)


def idempotency_fingerprint(body: bytes) -> str:
    """A ``POST /v1/batches`` body's content, canonical (the same request sent again has the same one)."""
    try:
        return hashlib.sha256(json.dumps(json.loads(body), sort_keys=True).encode()).hexdigest()
    except ValueError:
        return hashlib.sha256(body).hexdigest()


def batch_keeper(request: Request) -> BatchKeeper:
    keeper: BatchKeeper = request.app.state.batches
    return keeper


Keeper = Annotated[BatchKeeper, Depends(batch_keeper)]
