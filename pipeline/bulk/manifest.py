"""Bulk input: JSONL, CSV or a folder × one question, streamed line by line and validated whole.

JSONL lines ``{"custom_id", "image", "question", "params"?}`` (or ``"pdf"`` and ``"pages"`` instead of
``image``: one line per page, ``bulk.pdfs``); a CSV with the same columns (``params`` as
JSON text); or every picture in a folder × one question (custom_id: the relative path). ``image`` is a
path inside ``images_dir`` (default: the input file's folder) or the key of a picture the same owner
stored before (``images/<sha256>``). A line nested deeper than ``inputs.MAX_NESTING`` is refused, unparsed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tuwen.pipeline.bulk.model import InputError
from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.inputs import MAX_NESTING, too_deep

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".avif"})


class InvalidManifest(InvalidInput):
    """The input file as a whole is refused; ``problems`` lists the offending lines."""

    code = "invalid_manifest"

    def __init__(self, problems: list[str], *, code: str | None = None) -> None:
        shown = problems[:20] + ([f"… and {len(problems) - 20} more"] if len(problems) > 20 else [])
        super().__init__("the input is refused:\n  " + "\n  ".join(shown), code=code)
        self.problems = problems


# -- input -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One input line. ``problem`` set: the line cannot be read at all, which refuses the whole file."""

    line: int
    custom_id: str | None
    image: str | None = None
    question: str | None = None
    params: Any = None
    #: The picture's bytes, for sources that carry them (evaluation) instead of a path.
    data: bytes | None = field(default=None, repr=False)
    #: A Batch API line's request body (a chat completion request), for ``openai_input.BatchInput``.
    request: Any = field(default=None, repr=False)
    problem: str | None = None
    #: The problem's error code (``invalid_manifest`` if none is given).
    code: str | None = None
    #: A PDF's page instead of a picture (``bulk.pdfs``): the file as the line names it, the page (1-based;
    #: None when the PDF or its page list cannot be read) and the line's page list.
    pdf: str | None = None
    page: int | None = None
    pages: str | None = None
    #: A spoken question: an audio file inside ``images_dir`` (transcribed by the speech stage first); the line's
    #: ``question``, if any, goes before it.
    audio: str | None = None


class Source:
    """Where a bulk's lines come from. ``records()`` streams them again on every call."""

    name: str = ""
    base: Path | None = None  #: folder that relative image paths are read from

    def records(self) -> Iterator[Record]:
        raise NotImplementedError

    def digest(self) -> str:
        raise NotImplementedError


def _file_digest(path: Path, *extra: object) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    h.update(json.dumps([str(e) for e in extra], ensure_ascii=False).encode())
    return h.hexdigest()


def custom_id_of(value: Any) -> tuple[str | None, str | None]:
    """The line's custom_id as text, or why there is none (None, None: absent or blank)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, "custom_id must be a string"
    return (str(value), None) if len(str(value)) <= 512 else (None, "custom_id is longer than 512 characters")


class JsonlSource(Source):
    def __init__(self, path: Path, images_dir: Path | None = None, question: str | None = None) -> None:
        self.path, self.question, self.name = path, question, str(path)
        self.base = (images_dir or path.parent).resolve()

    def digest(self) -> str:
        return _file_digest(self.path, "jsonl", self.base, self.question)

    def records(self) -> Iterator[Record]:
        with self.path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
                    if too_deep(text):
                        yield Record(number, None, problem=f"nested deeper than {MAX_NESTING} levels",
                                     code="invalid_json_line")
                        continue
                    obj = json.loads(text) if text else None
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                    yield Record(number, None, problem=f"not a JSON line ({exc})", code="invalid_json_line")
                    continue
                if obj is None:
                    continue
                if not isinstance(obj, dict):
                    yield Record(number, None, problem="not a JSON object", code="invalid_json_line")
                    continue
                cid, problem = custom_id_of(obj.get("custom_id"))
                if "pdf" in obj and not problem:
                    from tuwen.pipeline.bulk.pdfs import pdf_records

                    yield from pdf_records(number, cid, obj["pdf"], obj.get("pages"),
                                           obj.get("question", self.question), obj.get("params"), self.base)
                    continue
                audio = obj.get("audio")  # a spoken line asks only what it says
                question = obj.get("question", None if audio is not None else self.question)
                yield Record(number, cid, obj.get("image"), question, obj.get("params"), problem=problem,
                             code="missing_custom_id" if problem else None, audio=audio)


class CsvSource(JsonlSource):
    def digest(self) -> str:
        return _file_digest(self.path, "csv", self.base, self.question)

    def records(self) -> Iterator[Record]:
        with self.path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.DictReader(f)
            rows = iter(reader)
            try:
                if "custom_id" not in (reader.fieldnames or []):
                    yield Record(1, None, problem="the CSV header has no custom_id column", code="missing_custom_id")
                    return
                while (row := next(rows, None)) is not None:
                    if any((v or "").strip() for v in row.values() if isinstance(v, str)):
                        yield self._record(reader.line_num, row)
            except csv.Error as exc:  # e.g. a field over csv's size limit: the rest cannot be read
                yield Record(reader.line_num, None, problem=f"not readable as CSV ({exc})")

    def _record(self, number: int, row: dict[str, Any]) -> Record:
        params: Any = (row.get("params") or "").strip() or None
        try:
            params = json.loads(params) if params and not too_deep(params) else params
        except (json.JSONDecodeError, RecursionError):
            pass  # left as text: that line fails with invalid_params
        cid, problem = custom_id_of(row.get("custom_id"))
        audio = (row.get("audio") or "").strip() or None
        return Record(number, cid, (row.get("image") or "").strip() or None,
                      row.get("question") or (None if audio else self.question), params, problem=problem,
                      code="missing_custom_id" if problem else None, audio=audio)


class FolderSource(Source):
    """Every picture under a folder (recursively, sorted by path) with the same question."""

    def __init__(self, root: Path, question: str) -> None:
        self.root, self.question, self.name = root.resolve(), question, str(root)
        self.base = self.root

    def _files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps(["folder", str(self.root), self.question], ensure_ascii=False).encode())
        for p in self._files():
            st = p.stat()
            h.update(f"{p.relative_to(self.root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def records(self) -> Iterator[Record]:
        for number, p in enumerate(self._files(), 1):
            rel = p.relative_to(self.root).as_posix()
            yield Record(number, rel, rel, self.question)


class RecordSource(Source):
    """Records made by code (e.g. an evaluation); ``make`` is called for every pass."""

    def __init__(self, name: str, make: Callable[[], Iterable[Record]], digest: str) -> None:
        self.name, self._make, self._digest = name, make, digest

    def digest(self) -> str:
        return self._digest

    def records(self) -> Iterator[Record]:
        yield from self._make()


class WithParams(Source):
    """Another source's lines with default generation params (``tuwen bulk submit --schema``): a line's own
    params override them key by key; the defaults are part of the digest (another schema, another bulk)."""

    def __init__(self, inner: Source, defaults: dict[str, Any]) -> None:
        self.inner, self.defaults = inner, defaults
        self.name, self.base = inner.name, inner.base

    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.inner.digest(), self.defaults], sort_keys=True,
                                         ensure_ascii=False).encode()).hexdigest()

    def records(self) -> Iterator[Record]:
        for rec in self.inner.records():
            own = rec.params if isinstance(rec.params, dict) else {} if rec.params is None else None
            yield rec if own is None else replace(rec, params={**self.defaults, **own})  # text: fails as it is


def schema_params(path: Path) -> dict[str, Any]:
    """The params of ``--schema FILE``: a JSON Schema file, as the answer's ``json_schema`` response_format."""
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInput(f"no such file: {path}", code="file_not_found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{path} is not a JSON file: {exc}", code="invalid_schema") from None
    name = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:64] or "schema"
    return {"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}}


def open_source(path: Path, *, images_dir: Path | None = None, question: str | None = None) -> Source:
    """A JSONL file, a ``.csv`` file, or a folder of pictures (which needs ``question``)."""
    if path.is_dir():
        if not (question or "").strip():
            raise InvalidManifest(["a folder of pictures needs --question"], code="missing_question")
        return FolderSource(path, question or "")
    if not path.is_file():
        raise InvalidInput(f"no such file: {path}", code="file_not_found")
    cls = CsvSource if path.suffix.lower() == ".csv" else JsonlSource
    return cls(path, images_dir, question)


def check(source: Source) -> tuple[int, list[InputError]]:
    """Count the lines and list what refuses the file (line, code, message): unreadable lines, missing or
    repeated custom_ids. Streams the input; only the custom_ids are kept, to find repeats."""
    seen: dict[str, int] = {}
    problems: list[InputError] = []
    total = 0
    for rec in source.records():
        total += 1
        if rec.problem:
            problems.append(InputError(line=rec.line, code=rec.code or "invalid_manifest", message=rec.problem))
        elif rec.custom_id is None:
            problems.append(InputError(line=rec.line, code="missing_custom_id", message="no custom_id"))
        elif rec.custom_id in seen:
            problems.append(InputError(line=rec.line, code="duplicate_custom_id",
                                       message=f"custom_id {rec.custom_id!r} repeats line {seen[rec.custom_id]}"))
        else:
            seen[rec.custom_id] = rec.line
    if total == 0:
        problems.append(InputError(line=None, code="empty_file", message="the input has no lines"))
    return total, problems


def validate(source: Source) -> tuple[int, list[str]]:
    """``check`` with each problem as one line of text (``line 3: custom_id 'a' repeats line 1``)."""
    total, problems = check(source)
    return total, [p.text for p in problems]
