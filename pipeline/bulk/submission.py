"""Submitting a bulk's lines: stream the input, prepare lines on a thread pool (reading and uploading
pictures is the slow part), then publish and record them one by one, in input order.

Each line is appended to the bulk's line list right after its job is published, so a submission run
again skips the recorded lines. Only the one line in flight when a process died is ambiguous: if its job
exists it is recorded now, and published again if it is still queued (a duplicate message is harmless:
the job store never runs a finished job again nor overwrites its result).

How a line becomes a job depends on the input format: ``QuestionLines`` for the manifest's lines (a
picture and a question); another format passes its own ``LinePreparer``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Protocol

from tuwen.pipeline.bulk.manifest import Record, Source
from tuwen.pipeline.bulk.model import Bulk, BulkState, job_id_for
from tuwen.pipeline.bulk.records import Records, entry_for
from tuwen.pipeline.client import Client, StoredImage, read_image
from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.schema import ErrorInfo, JobRequest, JobStatus, Priority

CHUNK = 256  #: lines read, uploaded and published at a time


@dataclass
class SubmitProgress:
    bulk_id: str
    total: int
    uploaded: int = 0
    queued: int = 0
    rejected: int = 0


class LinePreparer(Protocol):
    def __call__(self, rec: Record, bulk: Bulk, job_id: str) -> JobRequest:
        """The line's job, not yet queued (its pictures stored); ``InvalidInput`` refuses the line."""


class QuestionLines:
    """Lines that ask ``question`` about one picture: a path inside ``base``, the bytes a source carries,
    or the key of a picture the bulk's owner stored before."""

    def __init__(self, client: Client, base: Path | None) -> None:
        self.client = client
        self.base = base

    def __call__(self, rec: Record, bulk: Bulk, job_id: str) -> JobRequest:
        picture = self._picture(rec)
        try:
            return self.client.prepare(picture, rec.question or "", params=rec.params, priority=Priority.bulk,
                                       owner=bulk.owner, bulk_id=bulk.id, job_id=job_id)
        except InvalidInput as exc:
            if isinstance(picture, StoredImage) and exc.code == "image_not_found":
                # one message for a missing file, a path out of the images dir and another owner's key
                message = not_found_message(picture.key, self.base, self.client.images.prefix)
                raise InvalidInput(message, code="image_not_found") from exc
            raise

    def _picture(self, rec: Record) -> bytes | StoredImage:
        if rec.data is not None:
            return rec.data
        if not isinstance(rec.image, str) or not rec.image.strip():
            raise InvalidInput("the line names no image", code="missing_image")
        path = confined(self.base, rec.image) if self.base is not None else None
        if path is not None:
            return read_image(path, self.client.settings.max_image_bytes, follow_symlinks=False)
        return StoredImage(rec.image)


def confined(base: Path, name: str) -> Path | None:
    """``base / name`` with every symlink resolved, if that is an existing path inside ``base``; else
    None: missing, absolute, escaping (``..`` or a symlink out) and unresolvable paths alike."""
    if not name or "\0" in name or Path(name).is_absolute():
        return None
    try:
        root = base.resolve(strict=True)
        path = (root / name).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, permission denied, a symlink loop
        return None
    return path if path.is_relative_to(root) and path != root else None


def not_found_message(name: str, base: Path | None, key_prefix: str = "images/") -> str:
    """The one message for a picture a line may not use. It depends on what the line says, never on
    what exists, so a missing file, a path out of the images dir and another owner's key read alike."""
    if base is None:
        where = "a picture this owner stored (no images dir)"
    elif Path(name).is_absolute():
        where = f"a path inside the images dir {base} (paths are relative to it)"
    else:
        where = f"a file inside the images dir {base} (looked for {base / name})"
    stored = " or a picture this owner stored" if base is not None and name.startswith(key_prefix) else ""
    return f"no picture {name!r}: not {where}{stored}"


class Submission:
    """One run over a bulk's input, from its first unrecorded line to the end or until stopped: the bulk
    leaves ``in_progress`` (cancelled, expired) or ``stop`` is set."""

    def __init__(self, client: Client, records: Records, bulk: Bulk, prepare: LinePreparer, *,
                 stop: threading.Event | None = None,
                 on_progress: Callable[[SubmitProgress], None] | None = None) -> None:
        self.client, self.records, self.bulk, self.prepare = client, records, bulk, prepare
        self.stop, self.on_progress = stop, on_progress
        self.progress = SubmitProgress(bulk.id, bulk.request_counts.total, bulk.submitted, bulk.queued,
                                       bulk.rejected)
        self._counter = threading.Lock()

    def run(self, source: Source, concurrency: int = 8) -> None:
        _ = self.client.images  # open the store once, before the threads share it
        resumed, last_check = self.bulk.submitted > 0, time.monotonic()
        pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="tuwen-upload")
        try:
            lines = islice(source.records(), self.bulk.submitted, None)
            while chunk := list(islice(lines, CHUNK)):
                for rec, prepared in zip(chunk, pool.map(self._prepared, chunk)):
                    if resumed and self._recover(rec):  # the line in flight when the last run died
                        self.progress.queued += 1
                    else:
                        self._place(rec, prepared)
                    resumed = False
                    if self.on_progress:
                        self.on_progress(self.progress)
                    if self.stop is not None and self.stop.is_set():
                        return
                    if time.monotonic() - last_check > 1.0:
                        last_check = time.monotonic()
                        if self.records.get(self.bulk.id).state != BulkState.in_progress:
                            return
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _prepared(self, rec: Record) -> JobRequest | ErrorInfo:
        """The line's job, or why it is refused: a bad line fails alone, it does not stop the bulk."""
        try:
            out: JobRequest | ErrorInfo = self.prepare(rec, self.bulk, job_id_for(self.bulk.id, rec.custom_id or ""))
        except InvalidInput as exc:
            out = ErrorInfo(code=exc.code, message=exc.message)
        with self._counter:
            self.progress.uploaded += 1
        return out

    def _place(self, rec: Record, prepared: JobRequest | ErrorInfo) -> None:
        if isinstance(prepared, ErrorInfo):
            self.records.append(self.bulk.id, entry_for(rec, error=prepared))
            self.progress.rejected += 1
        else:
            self.client.enqueue(prepared)
            self.records.append(self.bulk.id, entry_for(rec, job_id=prepared.id, question=prepared.question))
            self.progress.queued += 1

    def _recover(self, rec: Record) -> bool:
        """Whether the line's job already exists (then it is recorded now, and re-published if still queued)."""
        job_id = job_id_for(self.bulk.id, rec.custom_id or "")
        current = self.client.jobs.get(job_id)
        if current.status == JobStatus.unknown:
            return False
        request = self.client.jobs.request(job_id)
        if current.status == JobStatus.queued and request is not None:
            self.client.publish(request)
        self.records.append(self.bulk.id, entry_for(rec, job_id=job_id,
                                                    question=request.question if request else None))
        return True
