"""Bulk input: JSONL, CSV or a folder × one question, streamed line by line and validated whole.

JSONL lines ``{"custom_id", "image", "question", "params"?}``; a CSV with the same columns (``params`` as
JSON text); or every picture in a folder × one question (custom_id: the relative path). ``image`` is a
path (relative to ``images_dir``, default the input file's folder) or the key of a picture already in
the image store (``images/<sha256>``).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuwen.pipeline.errors import InvalidInput

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
    problem: str | None = None


class Source:
    """Where a batch's lines come from. ``records()`` streams them again on every call."""

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


def _custom_id(value: Any) -> tuple[str | None, str | None]:
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
                    obj = json.loads(text) if text else None
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    yield Record(number, None, problem=f"not a JSON line ({exc})")
                    continue
                if obj is None:
                    continue
                if not isinstance(obj, dict):
                    yield Record(number, None, problem="not a JSON object")
                    continue
                cid, problem = _custom_id(obj.get("custom_id"))
                yield Record(number, cid, obj.get("image"), obj.get("question", self.question), obj.get("params"),
                             problem=problem)


class CsvSource(JsonlSource):
    def digest(self) -> str:
        return _file_digest(self.path, "csv", self.base, self.question)

    def records(self) -> Iterator[Record]:
        with self.path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.DictReader(f)
            if "custom_id" not in (reader.fieldnames or []):
                yield Record(1, None, problem="the CSV header has no custom_id column")
                return
            for row in reader:
                number = reader.line_num
                if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    continue
                params: Any = (row.get("params") or "").strip() or None
                try:
                    params = json.loads(params) if params else None
                except json.JSONDecodeError:
                    pass  # left as text: that line fails with invalid_params
                cid, problem = _custom_id(row.get("custom_id"))
                yield Record(number, cid, (row.get("image") or "").strip() or None,
                             row.get("question") or self.question, params, problem=problem)


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


def validate(source: Source) -> tuple[int, list[str]]:
    """Count the lines and list what refuses the file: unreadable lines, missing or repeated custom_ids."""
    seen: dict[str, int] = {}
    problems: list[str] = []
    total = 0
    for rec in source.records():
        total += 1
        if rec.problem:
            problems.append(f"line {rec.line}: {rec.problem}")
        elif rec.custom_id is None:
            problems.append(f"line {rec.line}: no custom_id")
        elif rec.custom_id in seen:
            problems.append(f"line {rec.line}: custom_id {rec.custom_id!r} repeats line {seen[rec.custom_id]}")
        else:
            seen[rec.custom_id] = rec.line
    if total == 0:
        problems.append("the input has no lines")
    return total, problems
