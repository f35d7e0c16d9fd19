"""A chat or Responses conversation's PDFs read into pages, before anything is stored (docs/openai.md, "PDFs").

The rule, as OpenAI's: a ``file`` part (``input_file`` in Responses) becomes, in its place, each page in order
as a picture (``pipeline.pdf``: rendered at ``TUWEN_PDF_PAGE_SIDE``), followed by the page's text as a text
part where the PDF has a text layer (``第3页的文字：…``; none for a scan without one). Every page is one
picture of the job: a conversation whose pictures and pages together are more than the served model takes
in one job is refused with ``too_many_pages``, whose message says how many pages fit. A PDF comes inline
(``file_data``: ``data:application/pdf;base64,…``) or as the id of a file the caller uploaded with purpose
``user_data``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from typing import TypeVar

from tuwen.pipeline.bulk.files import USER_DATA_PURPOSE
from tuwen.pipeline.errors import InvalidInput, NotFound
from tuwen.pipeline.gateway.openai_errors import openai_error
from tuwen.pipeline.gateway.openai_request import ChatTurn, Part
from tuwen.pipeline.gateway.parts import FileRef, PagePicture, PictureRef
from tuwen.pipeline.gateway.state import GatewayState
from tuwen.pipeline.inputs import in_mib
from tuwen.pipeline.pdf import check_pdf, page_side, render_pdf

T = TypeVar("T")
#: How a page's text layer enters the conversation, after the page's picture.
PAGE_TEXT = "第{number}页的文字：\n{text}"


def pictures_in(turns: Iterable[ChatTurn]) -> int:
    return sum(isinstance(p, (PictureRef, PagePicture)) for t in turns for p in t.parts)


def with_pages(state: GatewayState, owner: str, turns: tuple[ChatTurn, ...], queue: str) -> tuple[ChatTurn, ...]:
    """``turns`` with every PDF replaced by its pages (pictures, then text); unchanged without a PDF.
    ``OpenAIError`` (400, ``param`` the file part) for a PDF that cannot be had or read, or too many pages."""
    refs = list(dict.fromkeys(p for t in turns for p in t.parts if isinstance(p, FileRef)))
    if not refs:
        return turns
    settings = state.settings
    side = page_side(settings, state.census.picture_side(queue))  # the served family's preferred size
    documents: dict[FileRef, bytes] = {}
    counts: dict[FileRef, int] = {}
    for ref in refs:
        documents[ref] = pdf_bytes(state, ref, owner)
        counts[ref] = _read(ref, lambda: check_pdf(documents[ref], settings, side))
    others = pictures_in(turns)
    limits = [n for n in (state.census.max_images(queue), settings.max_images_per_job) if n]
    limit = min(limits)
    if others + sum(counts.values()) > limit:
        fit = max(0, limit - others)
        sizes = " + ".join(str(counts[r]) for r in refs)
        raise openai_error("too_many_pages", f"the PDFs have {sizes} pages and the conversation {others} other "
                           f"pictures; the served model takes {limit} pictures in one job, so {fit} pages fit. Send "
                           "fewer pages, or ask page by page (the Batch API, or tuwen bulk submit --pdf)",
                           param=refs[0].param)
    expanded: dict[FileRef, list[Part]] = {}
    for ref in refs:
        parts: list[Part] = []
        for page in _read(ref, lambda: render_pdf(documents[ref], settings, side=side)):
            parts.append(PagePicture(page.png, f"{ref.param} (page {page.number})"))
            if page.text:
                parts.append(PAGE_TEXT.format(number=page.number, text=page.text))
        expanded[ref] = parts
    return tuple(ChatTurn(t.role, tuple(q for p in t.parts for q in (expanded[p] if isinstance(p, FileRef) else [p])))
                 for t in turns)


def _read(ref: FileRef, action: Callable[[], T]) -> T:
    """``action``'s value; a refused PDF as an ``OpenAIError`` that names the file part."""
    try:
        return action()
    except InvalidInput as exc:
        raise openai_error(exc.code, exc.message, param=ref.param) from None


def pdf_bytes(state: GatewayState, ref: FileRef, owner: str) -> bytes:
    """The PDF's bytes: decoded from ``file_data``, or read from the owner's ``user_data`` file."""
    limit = state.settings.max_pdf_bytes
    too_large = f"the PDF is over {in_mib(limit)} (TUWEN_MAX_PDF_BYTES is {limit})"
    if ref.file_data is not None:
        head, comma, payload = ref.file_data.partition(",")
        if not head.startswith("data:") or not comma or "base64" not in head.lower().split(";")[1:]:
            raise openai_error("not_a_pdf", "file_data must be a base64 data: URL (data:application/pdf;base64,…)",
                               param=f"{ref.fields}.file_data")
        if len(payload) > 4 * -(-limit // 3) + 4:
            raise openai_error("pdf_too_large", too_large, param=f"{ref.fields}.file_data")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise openai_error("not_a_pdf", "file_data is not valid base64", param=f"{ref.fields}.file_data") from None
    assert ref.file_id is not None
    try:
        file = state.files.get(ref.file_id, owner)
    except NotFound as exc:
        raise openai_error(exc.code, exc.message, param=f"{ref.fields}.file_id") from None
    if file.purpose != USER_DATA_PURPOSE:
        raise openai_error("unsupported_purpose", f"{ref.file_id} was uploaded with purpose {file.purpose}; a "
                           f"conversation reads files uploaded with purpose {USER_DATA_PURPOSE}",
                           param=f"{ref.fields}.file_id")
    if file.bytes > limit:
        raise openai_error("pdf_too_large", too_large, param=f"{ref.fields}.file_id")
    return b"".join(state.files.chunks(file))
