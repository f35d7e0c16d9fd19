"""A bulk's output: one JSON line per input line, in input order (``results.jsonl``), and the lines that
did not succeed (``errors.jsonl``). ``bulk results`` writes them to files; when a bulk ends, both are
stored in the bucket under ``bulks/<bulk id>/``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tuwen.pipeline.bulk.model import Bulk, BulkState
from tuwen.pipeline.bulk.records import Entry, Records
from tuwen.pipeline.jobs import outage
from tuwen.pipeline.schema import JobResult, JobStatus
from tuwen.pipeline.settings import Settings
from tuwen.pipeline.stores import open_results
from tuwen.storage.errors import StorageError
from tuwen.storage.images import ResultStore


def result_line(entry: Entry, result: JobResult | None, state: BulkState) -> dict[str, Any]:
    """The output line for one input line."""
    line: dict[str, Any] = {"line": entry["n"], "custom_id": entry["c"], "job_id": entry.get("j"),
                            "status": "failed", "question": entry.get("q"), "image": entry.get("i"),
                            "image_key": None, "answer": None, "error": entry.get("e"), "model_id": None}
    if "f" in entry:  # a PDF's page: which file, which page
        line.update(file=entry["f"], page=entry.get("p"))
    if result is None:
        return line
    error = result.error.model_dump(mode="json", exclude={"retryable"}, exclude_none=True) if result.error else None
    line.update(status=result.status.value, image_key=result.image_key, answer=result.answer,
                model_id=result.model_id, error=error)
    if result.transcript is not None:  # a spoken question: what the speech stage heard
        line["transcript"] = result.transcript
    if result.choices:  # a line whose params asked for n > 1 or logprobs: every answer, as the job has them
        line["choices"] = [c.model_dump(mode="json", exclude_none=True) for c in result.choices]
    if result.status == JobStatus.unknown:
        line.update(status="failed", error={"code": "job_expired",
                                            "message": "the job's record expired before its result was read"})
    elif result.status == JobStatus.cancelled and state == BulkState.expired:
        line["error"] = {"code": "bulk_expired", "message": "the bulk did not finish within its completion window"}
    return line


def result_lines(records: Records, bulk: Bulk) -> Iterator[dict[str, Any]]:
    """The output line of every input line handled so far, in input order (streamed page by page)."""
    for page in records.pages(bulk.id):
        for entry, result in page:
            yield result_line(entry, result, bulk.state)


def write_jsonl(lines: Iterable[dict[str, Any]], results: Callable[[str], object],
                errors: Callable[[str], object] | None = None) -> tuple[int, int]:
    """Write every line to ``results`` and the ones that did not succeed to ``errors`` too (UTF-8 as is,
    no ``\\u`` escapes); returns how many lines, and how many did not succeed."""
    n = failed = 0
    for line in lines:
        text = json.dumps(line, ensure_ascii=False) + "\n"
        results(text)
        n += 1
        if line["status"] != "succeeded":
            failed += 1
            if errors is not None:
                errors(text)
    return n, failed


class Outputs:
    """Stores a bulk's two files in the results bucket."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: ResultStore | None = None

    def store(self, bulk: Bulk, lines: Iterable[dict[str, Any]]) -> tuple[str, str]:
        """Store ``results.jsonl`` and ``errors.jsonl`` for ``bulk``; returns their keys."""
        results, errors = io.StringIO(), io.StringIO()
        write_jsonl(lines, results.write, errors.write)
        try:
            if self._store is None:
                self._store = open_results(self.settings)
            return (self._store.put_bytes(f"bulks/{bulk.id}/results.jsonl", results.getvalue().encode(),
                                          "application/jsonl"),
                    self._store.put_bytes(f"bulks/{bulk.id}/errors.jsonl", errors.getvalue().encode(),
                                          "application/jsonl"))
        except StorageError as exc:
            raise outage("could not store the bulk's results", exc, code=exc.code) from exc
