"""Submitting a bulk's lines: stream the input, prepare lines on a thread pool (reading and uploading
pictures is the slow part), then place them a batch at a time, in input order: the batch's jobs are
recorded (one transaction), published (one pipeline on a Redis broker) and its lines recorded (one
transaction). No round trip is made per line, so lines that name pictures already stored go at thousands a
second (docs/performance.md, row e1).

A batch's lines are appended to the bulk's line list, all or none, only after its jobs were published (and
marked queued, waking idle workers), so a submission run again skips the recorded lines. Only the batch in
flight when a process died is ambiguous: those of its jobs that exist are recorded now, and published again
if still queued (they may have been published already: a duplicate message is harmless, since the job store
never runs a finished job again nor overwrites its result); its other lines are placed as new.

How a line becomes a job depends on the input format: ``QuestionLines`` for the manifest's lines (a
picture and a question); another format passes its own ``LinePreparer``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Protocol, runtime_checkable

from tuwen.pipeline.bulk.manifest import Record, Source
from tuwen.pipeline.bulk.model import Bulk, BulkState, job_id_for
from tuwen.pipeline.bulk.pdfs import PdfPages
from tuwen.pipeline.bulk.records import Entry, Records, entry_for
from tuwen.pipeline.audio import audio_too_large
from tuwen.pipeline.client import Client, OwnedImage, StoredImage, check_budget, read_image
from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.inputs import check_question
from tuwen.pipeline.schema import ErrorInfo, JobRequest, JobStatus, Priority

CHUNK = 256  #: lines read, prepared and placed (recorded and published together) at a time

#: The error of a line not yet submitted when its bulk was stopped (an expired or cancelled bulk's output
#: still has a line for every input line, as an OpenAI batch's error file has).
STOPPED_LINE = {
    BulkState.expired: ErrorInfo(code="bulk_expired", message="the bulk did not finish within its completion window"),
    BulkState.cancelled: ErrorInfo(code="cancelled", message="the bulk was cancelled before this line was submitted"),
}


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


@runtime_checkable
class LooksAhead(Protocol):
    """A ``LinePreparer`` that checks a batch's lines together before it prepares each one."""

    def ahead(self, records: list[Record], bulk: Bulk) -> None:
        """Look up at once what the lines need, so that preparing one makes no round trip of its own."""


class QuestionLines:
    """Lines that ask ``question`` about one picture: a path inside ``base``, the bytes a source carries,
    or the key of a picture the bulk's owner stored before."""

    def __init__(self, client: Client, base: Path | None) -> None:
        self.client = client
        self.base = base
        self._owned: set[str] = set()  #: the stored pictures of the batch at hand that the owner may name
        #: the PDF pages the batch at hand names, rendered at the bulk workers' preferred size
        self.pages = PdfPages(client.settings, base, side=client.page_side(Priority.bulk))

    def ahead(self, records: list[Record], bulk: Bulk) -> None:
        """Which stored pictures the lines name are the owner's: one round trip for the batch; and the PDF
        pages they name, rendered once each."""
        self._owned = self.client.owned_images((r.image for r in records if r.data is None), bulk.owner)
        self.pages.ahead(records)

    def __call__(self, rec: Record, bulk: Bulk, job_id: str) -> JobRequest:
        picture = self._picture(rec) if rec.pdf is None and rec.pages is None else self._page(rec, bulk.owner)
        audio = self._audio(rec)
        try:
            return self.client.prepare(picture, rec.question or ("" if audio is None else None), audio=audio,
                                       params=rec.params, priority=Priority.bulk, owner=bulk.owner, bulk_id=bulk.id,
                                       job_id=job_id)
        except InvalidInput as exc:
            if isinstance(picture, StoredImage) and exc.code == "image_not_found":
                # one message for a missing file, a path out of the images dir and another owner's key
                message = not_found_message(picture.key, self.base, self.client.images.prefix)
                raise InvalidInput(message, code="image_not_found") from exc
            raise

    def _page(self, rec: Record, owner: str) -> OwnedImage:
        """A PDF page's picture, stored once for all the lines that ask about it (``PdfPages.stored``), after
        this line's question and params are checked: a refused line stores nothing."""
        check_question(rec.question or "", max_chars=self.client.settings.max_conversation_chars)
        check_budget(self.client.check_params(rec.params), self.client.settings)
        return OwnedImage(self.pages.stored(rec, lambda png: self.client.store_image(png, owner)))

    def _audio(self, rec: Record) -> bytes | None:
        """The line's spoken question: a file inside the images dir, read bounded (``audio_too_large``)."""
        if rec.audio is None:
            return None
        if not isinstance(rec.audio, str) or not rec.audio.strip():
            raise InvalidInput("the line's audio must name a file", code="invalid_audio")
        path = confined(self.base, rec.audio) if self.base is not None else None
        if path is None:
            raise InvalidInput(f"no audio file {rec.audio!r} inside the images dir {self.base}", code="audio_not_found")
        return read_image(path, self.client.settings.max_audio_bytes, follow_symlinks=False, too_large=audio_too_large)

    def _picture(self, rec: Record) -> bytes | StoredImage:
        if rec.data is not None:
            return rec.data
        if not isinstance(rec.image, str) or not rec.image.strip():
            raise InvalidInput("the line names no image", code="missing_image")
        path = confined(self.base, rec.image) if self.base is not None else None
        if path is not None:
            return read_image(path, self.client.settings.max_image_bytes, follow_symlinks=False)
        return OwnedImage(rec.image) if rec.image in self._owned else StoredImage(rec.image)


def confined(base: Path, name: str) -> Path | None:
    """``base / name`` with every symlink resolved, if that is an existing path inside ``base``; else
    None: missing, absolute, escaping (``..`` or a symlink out) and unresolvable paths alike."""
    if not name or "\0" in name or Path(name).is_absolute():
        return None
    if not os.path.lexists(os.path.join(base, name)):  # most often a stored picture's key: one lstat, no resolving
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


@dataclass(frozen=True)
class LeftBehind:
    """A line's job that a run which died created (and perhaps published) but did not record."""

    job_id: str
    request: JobRequest | None
    queued: bool


Prepared = JobRequest | InvalidInput | LeftBehind


class Submission:
    """One run over a bulk's input, from its first unrecorded line to the end or until stopped: the bulk
    leaves ``in_progress`` (cancelled, expired) or ``stop`` is set (the lines taken so far are placed)."""

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
        resumed = self.bulk.submitted > 0
        pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="tuwen-upload")
        try:
            lines = islice(source.records(), self.bulk.submitted, None)
            while chunk := list(islice(lines, CHUNK)):
                if self._stopped_rest(chunk, lines):
                    return
                found = self._left_behind(chunk) if resumed else {}
                resumed = False
                if isinstance(self.prepare, LooksAhead):
                    self.prepare.ahead(chunk, self.bulk)
                batch: list[tuple[Record, Prepared]] = []
                for rec, prepared in zip(chunk, pool.map(partial(self._prepared, found), chunk)):
                    batch.append((rec, prepared))
                    if isinstance(prepared, InvalidInput):
                        self.progress.rejected += 1
                    else:
                        self.progress.queued += 1
                    if self.on_progress:
                        self.on_progress(self.progress)
                    if self.stop is not None and self.stop.is_set():
                        break
                # Checked again: a bulk stopped while its pictures were stored gets none of its jobs queued.
                if self._stopped_rest([rec for rec, _ in batch], lines):
                    return
                self._place(batch)
                if self.stop is not None and self.stop.is_set():
                    return
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _stopped_rest(self, chunk: list[Record], rest: Iterator[Record]) -> bool:
        """If the bulk was stopped (cancelled, expired), record ``chunk`` and every line after it as stopped,
        with no job, so that its output accounts for every input line; whether it was. One read per chunk."""
        state = self.records.get(self.bulk.id).state
        if state == BulkState.in_progress:
            return False
        error = STOPPED_LINE.get(state, STOPPED_LINE[BulkState.cancelled])
        part = chunk
        while part:
            self.records.append_many(self.bulk.id, [entry_for(rec, error=error) for rec in part])
            part = list(islice(rest, CHUNK))
        self.records.outputs_stale(self.bulk.id)  # stored before (its submitter had died): they lack these lines
        return True

    def _prepared(self, found: dict[str, LeftBehind], rec: Record) -> Prepared:
        """The line's job, the job a dead run left behind for it, or why it is refused: a bad line fails
        alone, it does not stop the bulk."""
        job_id = job_id_for(self.bulk.id, rec.custom_id or "")
        out: Prepared
        try:
            out = found.get(job_id) or self.prepare(rec, self.bulk, job_id)
        except InvalidInput as exc:
            out = exc
        with self._counter:
            self.progress.uploaded += 1
        return out

    def _place(self, batch: list[tuple[Record, Prepared]]) -> None:
        """Record the batch's new jobs, publish them (and the queued jobs left behind), then record its
        lines. A failure on the way leaves the lines unrecorded, for the next run to find (``_left_behind``)."""
        new = [p for _, p in batch if isinstance(p, JobRequest)]
        again = [p.request for _, p in batch if isinstance(p, LeftBehind) and p.queued and p.request is not None]
        if new:
            self.client.jobs.create_many(new)
        self.client.publish_many([*new, *again])
        self.records.append_many(self.bulk.id, [_entry(rec, p) for rec, p in batch])

    def _left_behind(self, chunk: list[Record]) -> dict[str, LeftBehind]:
        """The jobs of the first lines not recorded that exist already: a run that died in the middle of a
        batch (which starts at the first unrecorded line and is at most ``CHUNK`` lines) left them."""
        ids = [job_id_for(self.bulk.id, rec.custom_id or "") for rec in chunk]
        states = self.client.jobs.get_many(ids)
        return {job_id: LeftBehind(job_id, self.client.jobs.request(job_id), state.status == JobStatus.queued)
                for job_id, state in states.items() if state.status != JobStatus.unknown}


def _entry(rec: Record, prepared: Prepared) -> Entry:
    if isinstance(prepared, InvalidInput):
        return entry_for(rec, error=ErrorInfo(code=prepared.code, message=prepared.message), param=prepared.param)
    if isinstance(prepared, LeftBehind):
        return entry_for(rec, job_id=prepared.job_id, question=prepared.request.question if prepared.request else None)
    return entry_for(rec, job_id=prepared.id, question=prepared.question)
