"""Bulk batches: one input file in, one result per input line out, resumable (the OpenAI Batch API's shape).

Input is streamed, never read whole: JSONL lines ``{"custom_id", "image", "question", "params"?}``, a CSV
with the same columns (``params`` as JSON text), or every picture in a folder × one question (custom_id:
the relative path). ``image`` is a path (relative to ``images_dir``, default the input file's folder) or
the key of a picture already in the image store (``images/<sha256>``).

Resume: the batch id hashes the input and its options, a line's job id hashes (batch id, custom_id), and
each line is appended to the batch's line list, in input order, right after its job is published. The
same submission run again skips the recorded lines. Only the one line in flight when a process died is
ambiguous; its job is re-published if it is still queued (a duplicate message is harmless: the job store
never runs a finished job again nor overwrites its result).

Redis keys, all under ``tuwen:batch:`` with the results' TTL: ``<id>`` (hash: state, counts, times),
``<id>:lines`` (list: one JSON entry per input line), ``<id>:lock`` (the live submitter), ``index``
(sorted set of ids by creation time).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from itertools import islice
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, ValidationError

from tuwen.pipeline import app as queue
from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import InvalidInput, InvalidParams, NotFound, TuwenError, Unavailable
from tuwen.pipeline.inputs import check_question
from tuwen.pipeline.jobs import redis_errors
from tuwen.pipeline.manifest import InvalidManifest, Record, Source, validate
from tuwen.pipeline.schema import ErrorInfo, GenerationParams, JobRequest, JobResult, JobStatus, Priority
from tuwen.pipeline.stores import open_results
from tuwen.storage.errors import InvalidKey, StorageError
from tuwen.storage.images import ResultStore

PREFIX = "tuwen:batch:"
INDEX = PREFIX + "index"
CHUNK = 256  #: lines read, uploaded and enqueued at a time
PAGE = 500  #: lines read back from Redis at a time
WINDOW = 2000  #: lines past the first unfinished one whose states a refresh also counts
LOCK_TTL_S = 10
DEFAULT_WINDOW_S = 24 * 3600.0


class BatchState(str, Enum):
    validating = "validating"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    failed = "failed"  #: the input was refused (duplicate or missing custom_ids …)
    cancelled = "cancelled"
    expired = "expired"  #: not finished within its completion window; the rest was cancelled

    @property
    def terminal(self) -> bool:
        return self in (BatchState.completed, BatchState.failed, BatchState.cancelled, BatchState.expired)


class RequestCounts(BaseModel):
    model_config = ConfigDict(frozen=True)
    total: int = 0
    completed: int = 0
    failed: int = 0


class Batch(BaseModel):
    """A batch as ``bulk status`` shows it. Counts are as of the last refresh."""

    model_config = ConfigDict(frozen=True)
    id: str
    state: BatchState
    input: str
    owner: str
    request_counts: RequestCounts
    #: Input lines handled so far: enqueued as jobs, or failed before (bad picture, empty question …).
    submitted: int = 0
    queued: int = 0
    rejected: int = 0
    created_at: float
    expires_at: float
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    cancelled_at: float | None = None
    expired_at: float | None = None
    #: Why the input was refused (one line each).
    errors: list[str] = []
    output_key: str | None = None
    errors_key: str | None = None
    metadata: dict[str, str] = {}

    @property
    def finished_at(self) -> float | None:
        return self.completed_at or self.failed_at or self.cancelled_at or self.expired_at

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class BatchBusy(TuwenError):
    code = "batch_busy"
    retryable = True


def batch_id_for(digest: str, owner: str, salt: str = "") -> str:
    return "batch_" + hashlib.sha256(f"{digest}\0{owner}\0{salt}".encode()).hexdigest()[:24]


def job_id_for(batch_id: str, custom_id: str) -> str:
    return f"{batch_id}_" + hashlib.sha256(f"{batch_id}\0{custom_id}".encode()).hexdigest()[:20]


# -- the batch store -----------------------------------------------------------------------------------


_SET_STATE = """
local s = redis.call('HGET', KEYS[1], 'state')
for i = 3, #ARGV do if s == ARGV[i] then
  redis.call('HSET', KEYS[1], 'state', ARGV[1], ARGV[1] .. '_at', ARGV[2]); return 1 end end
return 0
"""
_ADVANCE = """
if tonumber(redis.call('HGET', KEYS[1], 'cursor') or '0') < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'cursor', ARGV[1], 'cursor_completed', ARGV[2], 'cursor_failed', ARGV[3]) end
redis.call('HSET', KEYS[1], 'completed', ARGV[4], 'failed', ARGV[5])
"""
_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_LIVE = ("validating", "in_progress", "finalizing")


@dataclass
class SubmitProgress:
    batch_id: str
    total: int
    uploaded: int = 0
    queued: int = 0
    rejected: int = 0


def _outcome(entry: dict[str, Any], result: JobResult | None) -> str | None:
    """``completed`` / ``failed`` for a finished line, None while it is queued or running."""
    if result is None:
        return "failed"
    if result.status in (JobStatus.queued, JobStatus.running):
        return None
    return "completed" if result.status == JobStatus.succeeded else "failed"


class BatchStore:
    """Create, submit, refresh, cancel, list and read batches. Jobs go through ``client``."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.settings = client.settings
        self.redis: redis.Redis = client.jobs.redis
        self._set_state = self.redis.register_script(_SET_STATE)
        self._advance = self.redis.register_script(_ADVANCE)
        self._unlock = self.redis.register_script(_UNLOCK)
        self._held: set[str] = set()
        self._results: ResultStore | None = None

    # -- reading -------------------------------------------------------------------------------------
    def find(self, batch_id: str) -> Batch | None:
        with redis_errors():
            f: dict[str, str] = self.redis.hgetall(PREFIX + batch_id)
        if not f:
            return None
        times = {k: float(f[k]) for k in ("in_progress_at", "finalizing_at", "completed_at", "failed_at",
                                          "cancelled_at", "expired_at") if f.get(k)}
        queued, rejected = int(f.get("queued", 0)), int(f.get("rejected", 0))
        return Batch(id=batch_id, state=BatchState(f["state"]), input=f.get("input", ""), owner=f.get("owner", ""),
                     request_counts=RequestCounts(total=int(f.get("total", 0)), completed=int(f.get("completed", 0)),
                                                  failed=int(f.get("failed", 0))),
                     submitted=queued + rejected, queued=queued, rejected=rejected,
                     created_at=float(f["created_at"]), expires_at=float(f["expires_at"]),
                     errors=json.loads(f.get("errors", "[]")), output_key=f.get("output_key"),
                     errors_key=f.get("errors_key"), metadata=json.loads(f.get("metadata", "{}")), **times)

    def get(self, batch_id: str) -> Batch:
        batch = self.find(batch_id)
        if batch is None:
            raise NotFound(f"no batch {batch_id!r} (never created, or expired)", code="batch_not_found")
        return batch

    def recent(self, limit: int = 20) -> list[Batch]:
        """The newest batches first."""
        with redis_errors():
            ids: list[str] = self.redis.zrevrange(INDEX, 0, max(0, limit - 1))
        batches = [b for b in (self.find(i) for i in ids) if b is not None]
        gone = set(ids) - {b.id for b in batches}
        if gone:
            self.redis.zrem(INDEX, *gone)
        return batches

    def _entries(self, batch_id: str, start: int, stop: int) -> list[dict[str, Any]]:
        with redis_errors():
            return [json.loads(e) for e in self.redis.lrange(PREFIX + batch_id + ":lines", start, stop - 1)]

    def _jobs_of(self, entries: list[dict[str, Any]]) -> list[JobResult | None]:
        ids = [e["j"] for e in entries if e.get("j")]
        found = self.client.jobs.get_many(ids) if ids else {}
        return [found[e["j"]] if e.get("j") else None for e in entries]

    def _pages(self, batch_id: str, start: int = 0) -> Iterator[list[tuple[dict[str, Any], JobResult | None]]]:
        while entries := self._entries(batch_id, start, start + PAGE):
            yield list(zip(entries, self._jobs_of(entries)))
            start += len(entries)

    def results(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """One dict per input line handled so far, in input order (streamed page by page)."""
        state = self.get(batch_id).state
        for page in self._pages(batch_id):
            for entry, result in page:
                yield _result_line(entry, result, state)

    # -- submitting ----------------------------------------------------------------------------------
    def submit(self, source: Source, *, owner: str = "default", window_s: float = DEFAULT_WINDOW_S,
               fresh: bool = False, concurrency: int = 8, stop: threading.Event | None = None,
               on_progress: Callable[[SubmitProgress], None] | None = None,
               metadata: dict[str, str] | None = None) -> Batch:
        """Create (or resume) the batch for ``source`` and enqueue its remaining lines; returns the batch.

        Refuses the input with ``InvalidManifest`` (the batch is then ``failed``). Stops early, resumably,
        when ``stop`` is set or the batch is cancelled. An unreachable service raises ``Unavailable``;
        the batch stays ``in_progress`` and the same call later continues it.
        """
        batch_id = batch_id_for(source.digest(), owner, uuid.uuid4().hex if fresh else "")
        with self._lock(batch_id):
            batch = self._open(batch_id, source, owner, window_s, metadata or {})
            if batch.state == BatchState.in_progress:
                self._submit_lines(batch, source, concurrency, stop, on_progress)
        return self.refresh(batch_id)

    def _open(self, batch_id: str, source: Source, owner: str, window_s: float, metadata: dict[str, str]) -> Batch:
        existing = self.find(batch_id)
        if existing is not None and existing.state == BatchState.failed:
            raise InvalidManifest(existing.errors)
        if existing is not None and existing.state != BatchState.validating:
            return existing
        key, now = PREFIX + batch_id, time.time()
        with redis_errors():
            if existing is None:
                self.redis.hset(key, mapping={"state": "validating", "input": source.name, "owner": owner,
                                              "created_at": repr(now), "expires_at": repr(now + window_s),
                                              "metadata": json.dumps(metadata, ensure_ascii=False)})
                self.redis.expire(key, self.settings.result_ttl_s)
                self.redis.zadd(INDEX, {batch_id: now})
        total, problems = validate(source)
        with redis_errors():
            self.redis.hset(key, mapping={"total": total, "errors": json.dumps(problems[:1000], ensure_ascii=False)})
            self._set_state(keys=[key], args=["failed" if problems else "in_progress", repr(time.time()), "validating"])
        if problems:
            raise InvalidManifest(problems)
        return self.get(batch_id)

    def _submit_lines(self, batch: Batch, source: Source, concurrency: int, stop: threading.Event | None,
                      on_progress: Callable[[SubmitProgress], None] | None) -> None:
        done = batch.submitted
        progress = SubmitProgress(batch.id, batch.request_counts.total, done, batch.queued, batch.rejected)
        counter = threading.Lock()
        _ = self.client.images  # open the store once, before the threads share it

        def prepare(rec: Record) -> JobRequest | ErrorInfo:
            out = self._prepare(rec, batch, source.base)
            with counter:
                progress.uploaded += 1
            return out

        last_check, resumed = time.monotonic(), done > 0
        pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="tuwen-upload")
        try:
            records = islice(source.records(), done, None)
            while chunk := list(islice(records, CHUNK)):
                for rec, prepared in zip(chunk, pool.map(prepare, chunk)):
                    if resumed and self._recover(batch.id, rec):  # the line in flight when the last run died
                        progress.queued += 1
                    elif isinstance(prepared, ErrorInfo):
                        self._record(batch.id, rec, error=prepared)
                        progress.rejected += 1
                    else:
                        self.client.enqueue(prepared)
                        self._record(batch.id, rec, job_id=prepared.id, question=prepared.question)
                        progress.queued += 1
                    resumed = False
                    if on_progress:
                        on_progress(progress)
                    if stop is not None and stop.is_set():
                        return
                    if time.monotonic() - last_check > 1.0:
                        last_check = time.monotonic()
                        if self.get(batch.id).state != BatchState.in_progress:
                            return
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _prepare(self, rec: Record, batch: Batch, base: Path | None) -> JobRequest | ErrorInfo:
        """Validate the line and store its picture; a bad line becomes an error, not an exception."""
        assert rec.custom_id is not None
        job_id = job_id_for(batch.id, rec.custom_id)
        try:
            try:
                params = GenerationParams.model_validate(rec.params or {})
            except ValidationError as exc:
                raise InvalidParams(f"invalid params: {exc.errors()[0]['msg']}", code="invalid_params") from exc
            data, key = self._picture(rec, base)
            if key is not None:
                question = check_question(rec.question or "", max_chars=self.settings.max_question_chars)
                return JobRequest(id=job_id, image_key=key, question=question, params=params, priority=Priority.bulk,
                                  owner=batch.owner, batch_id=batch.id)
            return self.client.prepare(data or b"", rec.question or "", max_new_tokens=params.max_new_tokens,
                                       priority=Priority.bulk, owner=batch.owner, batch_id=batch.id, job_id=job_id)
        except InvalidInput as exc:
            return ErrorInfo(code=exc.code, message=exc.message)

    def _picture(self, rec: Record, base: Path | None) -> tuple[bytes | None, str | None]:
        """``(bytes, None)`` for a file or given bytes, ``(None, key)`` for a picture already stored."""
        if rec.data is not None:
            return rec.data, None
        if not isinstance(rec.image, str) or not rec.image.strip():
            raise InvalidInput("the line names no image", code="missing_image")
        path = Path(rec.image).expanduser()
        path = path if path.is_absolute() or base is None else base / path
        if path.is_file():
            try:
                return path.read_bytes(), None
            except OSError as exc:
                raise InvalidInput(f"cannot read {rec.image}: {exc.strerror}", code="file_not_readable") from exc
        images = self.client.images
        if rec.image.startswith(images.prefix):
            try:
                if images.exists(rec.image):
                    return None, rec.image
            except InvalidKey:
                pass
            except StorageError as exc:
                raise Unavailable(f"image storage failed: {exc}", code=exc.code) from exc
        raise InvalidInput(f"no such picture: {rec.image}", code="image_not_found")

    def _recover(self, batch_id: str, rec: Record) -> bool:
        """Whether the line's job already exists (recorded now; re-published if it is still queued)."""
        job_id = job_id_for(batch_id, rec.custom_id or "")
        current = self.client.jobs.get(job_id)
        if current.status == JobStatus.unknown:
            return False
        request = self.client.jobs.request(job_id)
        if current.status == JobStatus.queued and request is not None:
            queue.enqueue(self.client.celery, self.settings, request)
        self._record(batch_id, rec, job_id=job_id, question=request.question if request else rec.question)
        return True

    def _record(self, batch_id: str, rec: Record, *, job_id: str | None = None, question: str | None = None,
                error: ErrorInfo | None = None) -> None:
        entry: dict[str, Any] = {"n": rec.line, "c": rec.custom_id, "q": question or rec.question,
                                 "i": rec.image if isinstance(rec.image, str) else None}
        if job_id:
            entry["j"] = job_id
        if error:
            entry["e"] = {"code": error.code, "message": error.message}
        key = PREFIX + batch_id
        with redis_errors():
            pipe = self.redis.pipeline(transaction=True)
            pipe.rpush(key + ":lines", json.dumps(entry, ensure_ascii=False))
            pipe.hincrby(key, "queued" if job_id else "rejected", 1)
            pipe.expire(key + ":lines", self.settings.result_ttl_s)
            pipe.expire(key, self.settings.result_ttl_s)
            pipe.execute()

    @contextmanager
    def _lock(self, batch_id: str, wait_s: float = LOCK_TTL_S + 2) -> Iterator[None]:
        """One submitter (or canceller) per batch; the lock lapses LOCK_TTL_S after its holder dies."""
        if batch_id in self._held:  # re-entered, e.g. a batch expiring while its submitter refreshes
            yield
            return
        key, token = PREFIX + batch_id + ":lock", secrets.token_hex(8)
        deadline = time.monotonic() + wait_s
        with redis_errors():
            while not self.redis.set(key, token, nx=True, ex=LOCK_TTL_S):
                if time.monotonic() > deadline:
                    raise BatchBusy(f"batch {batch_id} is being submitted by another process")
                time.sleep(0.25)
        held = threading.Event()

        def renew() -> None:
            while not held.wait(LOCK_TTL_S / 3):
                try:
                    self.redis.expire(key, LOCK_TTL_S)
                except redis.RedisError:
                    pass

        renewer = threading.Thread(target=renew, name="tuwen-batch-lock", daemon=True)
        renewer.start()
        self._held.add(batch_id)
        try:
            yield
        finally:
            self._held.discard(batch_id)
            held.set()
            renewer.join()
            try:
                self._unlock(keys=[key], args=[token])
            except redis.RedisError:
                pass

    # -- progress, completion, cancellation ------------------------------------------------------------
    def refresh(self, batch_id: str) -> Batch:
        """Count finished lines (from where the last refresh stopped); finalize or expire when due."""
        batch = self.get(batch_id)
        counts = batch.request_counts
        settled = counts.completed + counts.failed >= counts.total and batch.output_key is not None
        if batch.state in (BatchState.validating, BatchState.failed) or (batch.state.terminal and settled):
            return batch
        key = PREFIX + batch_id
        with redis_errors():
            f = self.redis.hmget(key, ["cursor", "cursor_completed", "cursor_failed"])
        cursor, completed, failed = (int(v or 0) for v in f)
        pending = False
        for page in self._pages(batch_id, cursor):
            for entry, result in page:
                outcome = _outcome(entry, result)
                if outcome is None:
                    pending = True
                    break
                cursor += 1
                completed += outcome == "completed"
                failed += outcome == "failed"
            if pending:
                break
        extra = {"completed": 0, "failed": 0}
        if pending:  # jobs finish a little out of order: count the finished ones just past the cursor
            for page in islice(self._pages(batch_id, cursor), WINDOW // PAGE):
                for entry, result in page:
                    if (outcome := _outcome(entry, result)) is not None:
                        extra[outcome] += 1
        with redis_errors():
            self._advance(keys=[key], args=[cursor, completed, failed, completed + extra["completed"],
                                            failed + extra["failed"]])
        batch = self.get(batch_id)
        if batch.state == BatchState.in_progress:
            if not pending and batch.submitted >= batch.request_counts.total:
                self._set_state(keys=[key], args=["finalizing", repr(time.time()), "in_progress"])
                batch = self.get(batch_id)
            elif time.time() > batch.expires_at:
                return self._halt(batch_id, BatchState.expired)
        if batch.state == BatchState.finalizing or (batch.state.terminal and not pending and not batch.output_key):
            self._write_outputs(batch)
            batch = self.get(batch_id)
        return batch

    def _write_outputs(self, batch: Batch) -> None:
        """Store results.jsonl and errors.jsonl in the bucket under the batch id; then ``completed``."""
        out, errs = bytearray(), bytearray()
        for line in self.results(batch.id):
            text = (json.dumps(line, ensure_ascii=False) + "\n").encode()
            out += text
            if line["status"] != "succeeded":
                errs += text
        if self._results is None:
            self._results = open_results(self.settings)
        store = self._results
        try:
            output = store.put_bytes(f"batches/{batch.id}/results.jsonl", bytes(out), "application/jsonl")
            errors = store.put_bytes(f"batches/{batch.id}/errors.jsonl", bytes(errs), "application/jsonl")
        except StorageError as exc:
            raise Unavailable(f"could not store the batch's results: {exc}", code=exc.code) from exc
        with redis_errors():
            self.redis.hset(PREFIX + batch.id, mapping={"output_key": output, "errors_key": errors})
            self._set_state(keys=[PREFIX + batch.id], args=["completed", repr(time.time()), "finalizing"])

    def cancel(self, batch_id: str) -> Batch:
        """Stop the batch: the submitter stops, queued jobs are cancelled, running ones finish."""
        return self._halt(batch_id, BatchState.cancelled)

    def _halt(self, batch_id: str, state: BatchState) -> Batch:
        with redis_errors():
            changed = self._set_state(keys=[PREFIX + batch_id], args=[state.value, repr(time.time()), *_LIVE])
        if not changed and self.get(batch_id).state != state:
            return self.get(batch_id)  # already ended otherwise: nothing to stop
        with self._lock(batch_id, wait_s=LOCK_TTL_S * 3):  # the submitter notices within a second
            for page in self._pages(batch_id):
                for entry, result in page:
                    if result is not None and result.status == JobStatus.queued:
                        self.client.jobs.cancel(entry["j"])
        return self.refresh(batch_id)

    def wait(self, batch_id: str, timeout: float | None = None, poll_s: float = 1.0,
             on_update: Callable[[Batch], None] | None = None) -> Batch:
        """Refresh until the batch ends (or ``timeout`` seconds pass); returns it either way."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self.refresh(batch_id)
            if on_update:
                on_update(batch)
            if batch.state.terminal or (deadline is not None and time.monotonic() >= deadline):
                return batch
            time.sleep(poll_s)


def _result_line(entry: dict[str, Any], result: JobResult | None, state: BatchState) -> dict[str, Any]:
    """The output line for one input line (what ``bulk results`` writes)."""
    line: dict[str, Any] = {"line": entry["n"], "custom_id": entry["c"], "job_id": entry.get("j"),
                            "status": "failed", "question": entry.get("q"), "image": entry.get("i"),
                            "image_key": None, "answer": None, "error": entry.get("e"), "model_id": None}
    if result is None:
        return line
    line.update(status=result.status.value, image_key=result.image_key, answer=result.answer,
                model_id=result.model_id, error=result.error.model_dump(exclude={"retryable"}) if result.error else None)
    if result.status == JobStatus.unknown:
        line.update(status="failed", error={"code": "job_expired",
                                            "message": "the job's record expired before its result was read"})
    elif result.status == JobStatus.cancelled and state == BatchState.expired:
        line["error"] = {"code": "batch_expired", "message": "the batch did not finish within its completion window"}
    return line
