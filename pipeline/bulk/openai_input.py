"""A Batch API input file as a bulk's source: one line per request, ``{"custom_id", "method": "POST",
"url": "/v1/chat/completions", "body": {…}}`` (or ``/v1/responses``: the batch's endpoint), streamed from the
file store part by part.

Only the line's frame is checked here (OpenAI refuses a file whole for these: a line that is not a JSON
object, a missing or repeated ``custom_id``, another method or url, no body, a line too long, too many
lines); the body is a request of the endpoint, parsed when the line is prepared, so a body that cannot be
answered fails alone, as an error line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from tuwen.pipeline.bulk.files import FileStore, StoredFile
from tuwen.pipeline.bulk.manifest import Record, Source, custom_id_of
from tuwen.pipeline.inputs import MAX_NESTING, too_deep

METHOD = "POST"


class BatchInput(Source):
    """The lines of ``file`` for a batch on ``endpoint``; at most ``max_lines`` lines of at most
    ``max_line_bytes`` bytes each."""

    def __init__(self, files: FileStore, file: StoredFile, endpoint: str, *, max_line_bytes: int,
                 max_lines: int) -> None:
        self.files, self.file, self.endpoint = files, file, endpoint
        self.max_line_bytes, self.max_lines = max_line_bytes, max_lines
        self.name = f"{file.filename} ({file.id})"

    def digest(self) -> str:
        return self.file.id

    def records(self) -> Iterator[Record]:
        count = 0
        for number, raw in self.files.lines(self.file, self.max_line_bytes):
            if raw is None:
                count += 1
                yield Record(number, None, problem=f"the line is longer than {self.max_line_bytes} bytes",
                             code="line_too_long")
                continue
            if not raw.strip():
                continue
            count += 1
            if count > self.max_lines:
                yield Record(number, None, problem=f"the file has more than {self.max_lines} lines",
                             code="too_many_lines")
                return
            yield self._record(number, raw)

    def _record(self, number: int, raw: bytes) -> Record:
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            if too_deep(text):
                return Record(number, None, problem=f"nested deeper than {MAX_NESTING} levels",
                              code="invalid_json_line")
            obj = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            return Record(number, None, problem=f"not a JSON line ({exc})", code="invalid_json_line")
        if not isinstance(obj, dict):
            return Record(number, None, problem="not a JSON object", code="invalid_json_line")
        value = obj.get("custom_id")
        cid, problem = custom_id_of(value) if isinstance(value, str) else (None, None)
        if cid is None:
            return Record(number, None, problem=problem or "custom_id must be a non-empty string",
                          code="missing_custom_id")
        if obj.get("method") != METHOD:
            return Record(number, cid, problem=f"method must be {METHOD}", code="invalid_method")
        if obj.get("url") != self.endpoint:
            return Record(number, cid, problem=f"url must be the batch's endpoint, {self.endpoint}", code="invalid_url")
        if not isinstance(obj.get("body"), dict):
            return Record(number, cid, problem=f"body must be an object: the {self.endpoint} request",
                          code="missing_body")
        return Record(number, cid, request=obj["body"])
