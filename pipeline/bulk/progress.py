"""How far a bulk has got: count its finished lines (from where the last count stopped), then finalize
it (store its output files: ``completed``) or, past its completion window, expire it. A cancelled bulk is
``cancelling`` until its running lines have finished, then ``cancelled`` with the output of what finished.
A batch created over HTTP also gets its output and error files in OpenAI's format (``openai_outputs``).

Counting walks the line list in order from a cursor kept in Redis, so a refresh of a 50,000-line bulk
reads only what finished since the last one. Jobs finish a little out of order, so the lines just past
the first unfinished one (``WINDOW`` of them) are counted too, for the counts shown, without moving
the cursor past them.
"""

from __future__ import annotations

import time
from itertools import islice

from tuwen.pipeline.bulk.files import FileStore
from tuwen.pipeline.bulk.lock import LOCK_TTL_S, BulkLock
from tuwen.pipeline.bulk.model import LIVE, STOPPED, Bulk, BulkState
from tuwen.pipeline.bulk.openai_outputs import write_files
from tuwen.pipeline.bulk.outputs import Outputs, result_lines
from tuwen.pipeline.bulk.records import PAGE, Records
from tuwen.pipeline.jobs import JobStore
from tuwen.pipeline.schema import JobResult, JobStatus

WINDOW = 2000  #: lines past the first unfinished one whose states a refresh also counts


def outcome(result: JobResult | None) -> str | None:
    """``completed`` / ``failed`` for a finished line, None while its job is queued or running. A line
    without a job was refused before it became one: failed."""
    if result is None:
        return "failed"
    if result.status in (JobStatus.queued, JobStatus.running):
        return None
    return "completed" if result.status == JobStatus.succeeded else "failed"


class Progress:
    """Refreshes bulks' counts and states; stops them (cancelled, expired)."""

    def __init__(self, records: Records, jobs: JobStore, outputs: Outputs, files: FileStore, lock: BulkLock) -> None:
        self.records = records
        self.jobs = jobs
        self.outputs = outputs
        self.files = files
        self.lock = lock

    def refresh(self, bulk_id: str) -> Bulk:
        """Count finished lines; finalize or expire the bulk when due. Returns it as it is now."""
        bulk = self.records.get(bulk_id)
        counts = bulk.request_counts
        settled = counts.completed + counts.failed >= counts.total and bulk.output_key is not None
        if bulk.state in (BulkState.validating, BulkState.failed) or (bulk.state.terminal and settled):
            return bulk
        # What was submitted is read before the lines are counted: a line the submitter records meanwhile
        # must not make the bulk look finished (the count may have missed it).
        submitted = bulk.submitted
        pending = self._count(bulk_id)
        bulk = self.records.get(bulk_id)
        if bulk.state == BulkState.in_progress:
            if not pending and submitted >= bulk.request_counts.total:
                self.records.set_state(bulk_id, BulkState.finalizing, BulkState.in_progress)
                bulk = self.records.get(bulk_id)
            elif time.time() > bulk.expires_at:
                return self.halt(bulk_id, BulkState.expired)
        # A stopped bulk's files wait until its submitter (or canceller) has let go: until then lines may
        # still be recorded, or queued ones not yet cancelled.
        stopping = bulk.state in STOPPED
        if pending or (stopping and (self.lock.busy(bulk_id) or self._unread_input(bulk))):
            return bulk
        if bulk.state in (BulkState.finalizing, BulkState.cancelling):
            self._store_outputs(bulk)
            ended = BulkState.completed if bulk.state == BulkState.finalizing else BulkState.cancelled
            self.records.set_state(bulk_id, ended, bulk.state)
            bulk = self.records.get(bulk_id)
        elif bulk.state.terminal and not bulk.output_key:
            self._store_outputs(bulk)
            bulk = self.records.get(bulk_id)
        return bulk

    def _unread_input(self, bulk: Bulk) -> bool:
        """A stopped batch's lines never submitted, while its input file is still there to read them from
        (its batch keeper records them as stopped; without the file they are left out)."""
        return bulk.unread and bulk.openai is not None and self.files.find(bulk.openai.input_file_id) is not None

    def _store_outputs(self, bulk: Bulk) -> None:
        output_key, errors_key = self.outputs.store(bulk, result_lines(self.records, bulk))
        output_file_id = error_file_id = None
        if bulk.openai is not None:
            output_file_id, error_file_id = write_files(self.files, self.records, bulk)
        self.records.set_outputs(bulk.id, output_key, errors_key, output_file_id=output_file_id,
                                 error_file_id=error_file_id)

    def _count(self, bulk_id: str) -> bool:
        """Move the cursor over the lines finished in order and update the counts; whether any line is
        still queued or running."""
        cursor, completed, failed = self.records.cursor(bulk_id)
        pending = False
        for page in self.records.pages(bulk_id, cursor):
            for _, result in page:
                if (done := outcome(result)) is None:
                    pending = True
                    break
                cursor += 1
                completed += done == "completed"
                failed += done == "failed"
            if pending:
                break
        ahead = {"completed": 0, "failed": 0}
        if pending:
            for page in islice(self.records.pages(bulk_id, cursor), WINDOW // PAGE):
                for _, result in page:
                    if (done := outcome(result)) is not None:
                        ahead[done] += 1
        self.records.advance(bulk_id, (cursor, completed, failed), completed + ahead["completed"],
                             failed + ahead["failed"])
        return pending

    def halt(self, bulk_id: str, state: BulkState) -> Bulk:
        """Stop a live bulk as ``cancelled`` (``cancelling`` until its running lines finish) or ``expired``:
        its submitter stops (it checks the state every second), its queued jobs are cancelled, running ones
        finish."""
        into = BulkState.cancelling if state == BulkState.cancelled else state
        if not self.records.set_state(bulk_id, into, *LIVE) and self.records.get(bulk_id).state != into:
            return self.records.get(bulk_id)  # it ended otherwise: nothing to stop
        with self.lock.held(bulk_id, wait_s=LOCK_TTL_S * 3):  # the submitter lets go within a second
            for page in self.records.pages(bulk_id):
                for entry, result in page:
                    if result is not None and result.status == JobStatus.queued:
                        self.jobs.cancel(entry["j"])
        return self.refresh(bulk_id)
