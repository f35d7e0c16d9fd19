"""PDFs in a bulk: a manifest line ``{"custom_id", "pdf": "book.pdf", "pages": "3-5,9", "question"}`` and
``tuwen bulk submit --pdf book.pdf --questions questions.txt`` (``PdfSource``: every question of every page).

Each page × question is one line of the bulk (one job, one picture: the page), its custom_id
``<custom_id or file>:p<page>`` (``:q<n>`` per question of ``--questions``), and a page's questions come next to
each other, so its picture is rendered once and its jobs are queued together. Pages are rendered on the
producer side, a chunk of lines at a time (``PdfPages``), and the page picture is stored like any upload: the
worker sees ordinary pictures. A PDF that cannot be read fails its line(s) alone with its code
(``pipeline.pdf``); results and the HTML report carry ``file`` and ``page``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tuwen.pipeline.bulk.manifest import Record, Source
from tuwen.pipeline.client import read_image
from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.inputs import check_question
from tuwen.pipeline.pdf import InvalidPdf, check_pdf, page_count, page_numbers, render_pdf
from tuwen.pipeline.settings import Settings

#: The most bytes ``records`` reads to count a PDF's pages (the preparer applies TUWEN_MAX_PDF_BYTES).
_COUNT_AT_MOST = 1 << 30


def pdf_records(number: int, custom_id: str | None, pdf: Any, pages: Any, question: Any, params: Any,
                base: Path | None) -> Iterator[Record]:
    """A manifest line that names a PDF, as one record per page; a PDF or page list that cannot be read is one
    record with no page, which fails with the reason when prepared."""
    name = pdf if isinstance(pdf, str) else None
    spec = pages if isinstance(pages, str) or pages is None else str(pages)
    stem = custom_id if custom_id is not None else f"{name}:line{number}"
    count = _pages_of(base, name)
    try:
        chosen = page_numbers(spec, count) if count else []
    except InvalidPdf:
        chosen = []
    if not chosen:
        yield Record(number, stem, question=question, params=params, pdf=name, pages=spec)
        return
    for page in chosen:
        yield Record(number, f"{stem}:p{page}", question=question, params=params, pdf=name, page=page, pages=spec)


def _pages_of(base: Path | None, name: str | None) -> int:
    from tuwen.pipeline.bulk.submission import confined

    path = confined(base, name) if base is not None and name else None
    if path is None or not path.is_file() or path.stat().st_size > _COUNT_AT_MOST:
        return 0
    return page_count(path.read_bytes())


class PdfSource(Source):
    """Every question of ``questions`` about every page of ``pdf`` (or of ``pages``), page by page."""

    def __init__(self, pdf: Path, questions: list[str], pages: str | None = None) -> None:
        self.pdf, self.questions, self.pages = pdf, questions, pages
        self.name, self.base = str(pdf), pdf.parent.resolve()

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps(["pdf", str(self.pdf.resolve()), self.questions, self.pages],
                                      ensure_ascii=False).encode())
        with self.pdf.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    def records(self) -> Iterator[Record]:
        name = self.pdf.name
        count = _pages_of(self.base, name)
        try:
            chosen = page_numbers(self.pages, count) if count else []
        except InvalidPdf:
            chosen = []
        if not chosen:  # the whole PDF fails: one line per question, each with the reason
            for n, question in enumerate(self.questions, start=1):
                yield Record(n, f"{name}:q{n}", question=question, pdf=name, pages=self.pages)
            return
        line = 0
        for page in chosen:
            for n, question in enumerate(self.questions, start=1):
                line += 1
                yield Record(line, f"{name}:p{page}:q{n}", question=question, pdf=name, page=page, pages=self.pages)


def read_questions(path: Path, max_chars: int) -> list[str]:
    """``--questions FILE``: one question a line (blank lines skipped), each checked as a question is."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InvalidInput(f"no such file: {path}", code="file_not_found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path} cannot be read as UTF-8 text: {exc}", code="file_not_readable") from None
    questions = [check_question(line, max_chars=max_chars) for line in text.splitlines() if line.strip()]
    if not questions:
        raise InvalidInput(f"{path} has no questions (one a line)", code="missing_question")
    return questions


class PdfPages:
    """The rendered pages a chunk of lines needs, rendered once per chunk (``ahead``) and looked up per line
    (``picture``) from the preparing threads."""

    def __init__(self, settings: Settings, base: Path | None, side: int | None = None) -> None:
        self.settings, self.base, self.side = settings, base, side
        self._lock = threading.Lock()
        self._pages: dict[tuple[str, int], bytes] = {}
        self._failed: dict[str, InvalidInput] = {}
        #: Each page's stored key, once one line stored it (its lock held while storing): a page's other
        #: questions name it, so it is checked and stored once, not once per question.
        self._stored: dict[tuple[str, int], tuple[threading.Lock, list[str]]] = {}

    def ahead(self, records: list[Record]) -> None:
        """Render every page the lines name, one PDF at a time (each read and opened once)."""
        wanted: dict[str, set[int]] = {}
        for rec in records:
            if rec.pdf is not None and rec.page is not None:
                wanted.setdefault(rec.pdf, set()).add(rec.page)
        pages: dict[tuple[str, int], bytes] = {}
        failed: dict[str, InvalidInput] = {}
        for name, numbers in wanted.items():
            try:
                for page in render_pdf(self._read(name), self.settings, sorted(numbers), self.side):
                    pages[name, page.number] = page.png
            except InvalidInput as exc:
                failed[name] = exc
        with self._lock:
            self._pages, self._failed, self._stored = pages, failed, {}

    def stored(self, rec: Record, store: Callable[[bytes], str]) -> str:
        """The key of the line's page, stored by ``store`` the first time a line of the chunk asks for it."""
        png = self.picture(rec)
        with self._lock:
            lock, key = self._stored.setdefault((str(rec.pdf), rec.page or 0), (threading.Lock(), []))
        with lock:
            if not key:
                key.append(store(png))
            return key[0]

    def picture(self, rec: Record) -> bytes:
        """The line's page as PNG bytes, or the ``InvalidInput`` that its PDF or page list gets."""
        if not isinstance(rec.pdf, str) or not rec.pdf.strip():
            raise InvalidInput("the line's pdf must name a PDF file", code="missing_image")
        with self._lock:
            png = self._pages.get((rec.pdf, rec.page or 0))
            failed = self._failed.get(rec.pdf)
        if png is not None:
            return png
        if failed is not None:
            raise failed
        data = self._read(rec.pdf)  # no page: the reason is the PDF's, or the page list's
        page_numbers(rec.pages, check_pdf(data, self.settings, self.side))
        raise InvalidPdf(f"pages {rec.pages!r}: no page chosen", code="invalid_pages")

    def _read(self, name: str) -> bytes:
        from tuwen.pipeline.bulk.submission import confined

        path = confined(self.base, name) if self.base is not None else None
        if path is None:
            raise InvalidInput(f"no PDF {name!r} inside {self.base}", code="file_not_found")
        limit = self.settings.max_pdf_bytes
        if path.is_file() and path.stat().st_size > limit:
            raise InvalidPdf(f"{name} is over TUWEN_MAX_PDF_BYTES ({limit} bytes)", code="pdf_too_large")
        return read_image(path, limit, follow_symlinks=False)
