"""A batch's output and error files in OpenAI's format, one JSON line per handled input line:
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``.

A line that succeeded goes to the output file, its body the ``chat.completion`` exactly as
``POST /v1/chat/completions`` answers it (``openai_objects.completion``), or for a batch of ``/v1/responses``
the ``response`` (``responses_objects.response_object``; what its request said, such as ``instructions``, is
not kept with a line, so those fields are null). The others go to the error
file: a request that was refused (before or in the model) has the status and OpenAI error body the chat
endpoint would have answered (its ``param`` too), and ``error: null``; a line the batch itself stopped
(cancelled, expired, its job record gone) has ``response: null`` and ``error: {code, message}``, as at OpenAI.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

from tuwen.pipeline.bulk.files import OUTPUT_PURPOSE, FileStore, output_file_id
from tuwen.pipeline.bulk.model import RESPONSES_ENDPOINT, Bulk
from tuwen.pipeline.bulk.outputs import result_line
from tuwen.pipeline.bulk.records import Entry, Records
from tuwen.pipeline.envelope import error_body
from tuwen.pipeline.errors import http_status
from tuwen.pipeline.openai_objects import completion
from tuwen.pipeline.responses_objects import ResponseFacts, response_object
from tuwen.pipeline.schema import JobResult, JobStatus

#: Codes of a line the batch stopped, not the request (``response`` is then null).
STOPPED = frozenset({"cancelled", "bulk_expired", "job_expired"})


def line_id(bulk_id: str, custom_id: str) -> str:
    return "batch_req_" + hashlib.sha256(f"{bulk_id}\0{custom_id}".encode()).hexdigest()[:24]


def openai_line(bulk: Bulk, entry: Entry, result: JobResult | None) -> tuple[dict[str, Any], bool]:
    """The line for one input line, and whether it succeeded (then it belongs in the output file)."""
    line: dict[str, Any] = {"id": line_id(bulk.id, entry["c"]), "custom_id": entry["c"], "response": None,
                            "error": None}
    job_id = entry.get("j")
    if result is not None and result.status == JobStatus.succeeded:
        line["response"] = {"status_code": 200, "request_id": job_id, "body": answer(bulk, result)}
        return line, True
    error = result_line(entry, result, bulk.state)["error"] or {"code": "internal_error",
                                                                "message": "the line ended without a result"}
    code, message = str(error["code"]), str(error["message"])
    if code in STOPPED:
        line["error"] = {"code": code, "message": message}
        return line, False
    status = http_status(code, openai=True)  # as the chat endpoint answers it, refused or failed in the model
    body = error_body(status, code, message, param=error.get("param"))
    line["response"] = {"status_code": status, "request_id": job_id, "body": body}
    return line, False


def answer(bulk: Bulk, result: JobResult) -> dict[str, Any]:
    """A succeeded line's body, as the batch's endpoint answers it."""
    created, model = int(result.created_at or result.finished_at or time.time()), result.model_id or "tuwen"
    if bulk.openai is not None and bulk.openai.endpoint == RESPONSES_ENDPOINT:
        facts = ResponseFacts(created_at=created, model=model, store=False)
        return response_object(result.id, facts, result).model_dump(mode="json")
    return completion(result, model, created).model_dump(mode="json")


def _chunks(records: Records, bulk: Bulk, succeeded: bool, count: list[int]) -> Iterator[bytes]:
    """The lines of one of the two files as UTF-8 JSON lines (counted in ``count[0]``), page by page."""
    for page in records.pages(bulk.id):
        for entry, result in page:
            line, ok = openai_line(bulk, entry, result)
            if ok == succeeded:
                count[0] += 1
                yield (json.dumps(line, ensure_ascii=False) + "\n").encode()


def write_files(files: FileStore, records: Records, bulk: Bulk) -> tuple[str | None, str | None]:
    """Write the batch's output and error files, streamed (one pass each); a file without lines is not
    kept. Returns their ids (None for one not kept)."""
    ids: list[str | None] = []
    for kind, succeeded, name in (("output", True, "output"), ("errors", False, "error")):
        count = [0]
        file = files.write(output_file_id(bulk.id, kind), bulk.owner, f"{bulk.id}_{name}.jsonl", OUTPUT_PURPOSE,
                           _chunks(records, bulk, succeeded, count))
        if count[0] == 0:
            files.delete(file)
        ids.append(file.id if count[0] else None)
    return ids[0], ids[1]
