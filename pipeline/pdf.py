"""PDF pages as pictures: a PDF (a worksheet, a textbook, an exam paper) becomes one picture per page, plus the
page's text layer, before any job is stored. The producer side does this (gateway, client, bulk), so a worker
only ever sees ordinary pictures.

Untrusted bytes are opened with PDFium (pypdfium2, its binary inside the wheel) and refused with a code of
the catalogue, before anything is stored: not a PDF (``not_a_pdf``), over ``TUWEN_MAX_PDF_BYTES``
(``pdf_too_large``), damaged or truncated (``corrupt_pdf``), password-protected (``encrypted_pdf``), no pages
(``empty_pdf``), more pages than ``TUWEN_MAX_PDF_PAGES`` (``too_many_pages``), and a page that would render
over ``TUWEN_MAX_IMAGE_PIXELS`` (``pdf_page_too_large``: checked from the page's size before a pixel is drawn,
a "PDF bomb") or longer than ``TUWEN_MAX_ASPECT_RATIO`` times its width (``bad_aspect_ratio``). Forms are never
initialised: JavaScript is never run (the wheel's PDFium has no JavaScript engine either) and embedded files
are never read.

Each page is rendered so that its long side is ``TUWEN_PDF_PAGE_SIDE`` pixels (the served family's preferred
picture size, docs/education.md), at no less than ``TUWEN_PDF_MIN_DPI``. PDFium is not thread-safe: one lock
serialises every call into it in this process.
"""

from __future__ import annotations

import io
import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.inputs import in_mib
from tuwen.pipeline.settings import Settings

#: Where a PDF's header may start (PDF 1.7, annex H: within the first 1,024 bytes).
_HEADER_WITHIN = 1024
#: PDFium is not thread-safe, even across documents: every call into it holds this lock.
_PDFIUM = threading.Lock()
#: A page range list: ``3-5,9`` (1-based, inclusive; spaces allowed).
_RANGES = re.compile(r"^\s*\d+\s*(-\s*\d+\s*)?(,\s*\d+\s*(-\s*\d+\s*)?)*$")
POINTS_PER_INCH = 72.0


class InvalidPdf(InvalidInput):
    code = "corrupt_pdf"


@dataclass(frozen=True)
class Page:
    """One rendered page: its number (1-based), the picture (PNG bytes) and its text layer ('' if none)."""

    number: int
    png: bytes
    text: str
    size: tuple[int, int]


def is_pdf(data: bytes) -> bool:
    """Whether the bytes declare themselves a PDF (``%PDF-`` within the first 1,024 bytes)."""
    return b"%PDF-" in data[:_HEADER_WITHIN]


def page_numbers(spec: str | None, count: int) -> list[int]:
    """The 1-based pages ``spec`` names (``"3-5,9"``; None or ``""``: every page), in the order given,
    each once; ``invalid_pages`` when malformed or past the document's ``count`` pages."""
    if spec is None or not str(spec).strip():
        return list(range(1, count + 1))
    if not isinstance(spec, str) or not _RANGES.match(spec):
        raise InvalidPdf(f"pages {str(spec)[:64]!r}: give page numbers and ranges like 3-5,9", code="invalid_pages")
    chosen: list[int] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
        if low < 1 or high < low:
            raise InvalidPdf(f"pages {spec!r}: {part.strip()} is not a range of pages (they start at 1)",
                             code="invalid_pages")
        if high > count:
            raise InvalidPdf(f"pages {spec!r}: the PDF has {count} pages", code="invalid_pages")
        chosen += [n for n in range(low, high + 1) if n not in chosen]
    return chosen


#: A page's long side when neither ``TUWEN_PDF_PAGE_SIDE`` nor a live worker says one.
DEFAULT_PAGE_SIDE = 1024


def page_side(settings: Settings, announced: int | None = None) -> int:
    """The long side pages are rendered at: ``TUWEN_PDF_PAGE_SIDE`` if set, else the served family's
    preferred size its workers announce (``registry.picture_side``), else ``DEFAULT_PAGE_SIDE``."""
    return settings.pdf_page_side or announced or DEFAULT_PAGE_SIDE


def render_scale(width_pt: float, height_pt: float, settings: Settings, side: int | None = None) -> float:
    """Pixels per point for a page: its long side becomes ``side`` pixels (``page_side``), at no less than
    ``pdf_min_dpi`` (a big page is drawn bigger rather than illegibly small)."""
    long = side or page_side(settings)
    return max(long / max(width_pt, height_pt, 1e-3), settings.pdf_min_dpi / POINTS_PER_INCH)


def page_count(data: bytes) -> int:
    """How many pages a PDF has; 0 when PDFium cannot open it (no limits applied: ``check_pdf`` does)."""
    if not is_pdf(data):
        return 0
    with _PDFIUM:
        raw = pdfium_c.FPDF_LoadMemDocument64(data, len(data), None)
        if not raw:
            return 0
        try:
            return int(pdfium_c.FPDF_GetPageCount(raw))
        finally:
            pdfium_c.FPDF_CloseDocument(raw)


def check_pdf(data: bytes, settings: Settings, side: int | None = None) -> int:
    """The page count of a PDF tuwen will render (at ``side``, as ``render_pdf``), or ``InvalidPdf`` with its
    code (nothing is rendered)."""
    with _PDFIUM:
        doc = _open(data, settings)
        try:
            count = len(doc)
            for index in range(count):
                _page_size(doc, index, settings, side)
            return count
        finally:
            doc.close()


def render_pdf(data: bytes, settings: Settings, pages: Sequence[int] | None = None,
               side: int | None = None) -> list[Page]:
    """Every page of ``pages`` (1-based; None: all) as a PNG picture, its long side ``side`` pixels
    (``page_side``), and its text, checked first: a refused PDF renders nothing. Raises ``InvalidPdf`` (its
    code) for what ``check_pdf`` refuses."""
    with _PDFIUM:
        doc = _open(data, settings)
        try:
            chosen = list(pages) if pages is not None else list(range(1, len(doc) + 1))
            if any(n < 1 or n > len(doc) for n in chosen):
                raise InvalidPdf(f"the PDF has {len(doc)} pages", code="invalid_pages")
            scales = {n: _page_size(doc, n - 1, settings, side)[2] for n in chosen}
            return [_render(doc, n, scales[n]) for n in chosen]
        finally:
            doc.close()


def _open(data: bytes, settings: Settings) -> pdfium.PdfDocument:
    """The document, opened without forms (no JavaScript, no attachments read); refusals by code."""
    if not data:
        raise InvalidPdf("the PDF is empty (0 bytes)", code="not_a_pdf")
    if len(data) > settings.max_pdf_bytes:
        raise InvalidPdf(f"the PDF is over {in_mib(settings.max_pdf_bytes)} (it is {len(data)} bytes; "
                         f"TUWEN_MAX_PDF_BYTES is {settings.max_pdf_bytes})", code="pdf_too_large")
    if not is_pdf(data):
        raise InvalidPdf("this is not a PDF (no %PDF- header)", code="not_a_pdf")
    # The raw call, not PdfDocument(data): it tells a document that did not open (its error) from one with an
    # empty page tree, which PdfDocument refuses alike, with a stale error code. ``data`` outlives ``doc``.
    raw = pdfium_c.FPDF_LoadMemDocument64(data, len(data), None)
    if not raw:
        if pdfium_c.FPDF_GetLastError() == pdfium_c.FPDF_ERR_PASSWORD:
            raise InvalidPdf("the PDF is encrypted with a password; send it decrypted", code="encrypted_pdf")
        raise InvalidPdf("the PDF is damaged or truncated and cannot be read", code="corrupt_pdf")
    doc = pdfium.PdfDocument(raw)
    count = len(doc)
    if count == 0:
        doc.close()
        raise InvalidPdf("the PDF has no pages", code="empty_pdf")
    if count > settings.max_pdf_pages:
        doc.close()
        raise InvalidPdf(f"the PDF has {count} pages; the limit is {settings.max_pdf_pages} "
                         "(TUWEN_MAX_PDF_PAGES)", code="too_many_pages")
    return doc


def _page_size(doc: pdfium.PdfDocument, index: int, settings: Settings,
               side: int | None = None) -> tuple[int, int, float]:
    """A page's rendered size and scale, refused before rendering when too many pixels or too long."""
    try:
        width, height = doc.get_page_size(index)
    except pdfium.PdfiumError:
        raise InvalidPdf(f"page {index + 1} of the PDF cannot be read", code="corrupt_pdf") from None
    if not (width > 0 and height > 0):
        raise InvalidPdf(f"page {index + 1} of the PDF has no area", code="corrupt_pdf")
    scale = render_scale(width, height, settings, side)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    if w * h > settings.max_image_pixels:
        raise InvalidPdf(f"page {index + 1} is {width:.0f}×{height:.0f} points: {w}×{h} pixels at "
                         f"{scale * POINTS_PER_INCH:.0f} DPI, over the limit of {settings.max_image_pixels} pixels",
                         code="pdf_page_too_large")
    if max(w, h) / min(w, h) > settings.max_aspect_ratio:
        raise InvalidPdf(f"page {index + 1} is {width:.0f}×{height:.0f} points; its sides differ by more than "
                         f"{settings.max_aspect_ratio:g}×", code="bad_aspect_ratio")
    return w, h, scale


def _render(doc: pdfium.PdfDocument, number: int, scale: float) -> Page:
    try:
        page = doc[number - 1]
        try:
            bitmap = page.render(scale=scale, may_draw_forms=False)
            picture = bitmap.to_pil().convert("RGB")
            textpage = page.get_textpage()
            text = textpage.get_text_bounded()
            textpage.close()
        finally:
            page.close()
    except pdfium.PdfiumError:
        raise InvalidPdf(f"page {number} of the PDF cannot be rendered", code="corrupt_pdf") from None
    out = io.BytesIO()
    picture.save(out, "PNG", compress_level=1)
    return Page(number, out.getvalue(), clean_text(text), picture.size)


def clean_text(text: str) -> str:
    """A page's text layer as prompt text: line ends as ``\\n``, control and unassigned characters dropped
    (PDFs carry ``\\x00``, ``\\ufffe`` and form feeds), runs of blank lines as one, trimmed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    kept = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cs", "Co", "Cn"))
    lines = [line.rstrip() for line in kept.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
