"""Test PDFs: worksheet pages drawn with the demo scenes (known facts per page), with or without a text
layer, and the bad ones of the corpus (encrypted, truncated, no pages, a PDF bomb, JavaScript and an
attachment). Written by Pillow, fpdf2 or by hand (``raw_pdf``: a few objects and a correct xref)."""

from __future__ import annotations

import io
import random
from collections.abc import Sequence

from fpdf import FPDF
from fpdf.enums import TextMode
from PIL import Image

from tuwen.workers.demo.scenes import Example, draw_worksheet_example

#: A font with Chinese glyphs (Debian's fonts-wqy-microhei, in the Makefile's system-deps).
CJK_FONT = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"
#: The questions a worksheet page is asked in the tests, with the scene kind whose facts answer each.
PAGE_KINDS = ("shape", "colour", "count")


def scenes(seed: int, kinds: Sequence[str]) -> list[Example]:
    """One worksheet scene per kind (224×224 pages, the demo model's held-out style), seeded."""
    rng = random.Random(seed)
    return [draw_worksheet_example(rng, kind) for kind in kinds]


#: Questions that fit every page (``--questions``), with the scene kind whose facts answer each.
GENERIC_QUESTIONS = {"shape": "图中是什么形状？", "colour": "图形是什么颜色的？", "count": "数一数，图中一共有几个图形？"}


def worksheet(seed: int, pages: int) -> tuple[list[Image.Image], list[dict[str, tuple[str, ...]]]]:
    """``pages`` worksheet pages of shapes and, per page, the facts that answer each kind of question (a
    shape, colour or count scene drawn from the same seed is the same picture)."""
    pictures, facts = [], []
    for n in range(pages):
        drawn = {kind: draw_worksheet_example(random.Random(seed * 1000 + n), kind) for kind in GENERIC_QUESTIONS}
        assert len({ex.image.tobytes() for ex in drawn.values()}) == 1  # one picture, three questions
        pictures.append(drawn["shape"].image)
        facts.append({kind: ex.facts for kind, ex in drawn.items()})
    return pictures, facts


def scene_pdf(pictures: Sequence[Image.Image]) -> bytes:
    """A PDF with one page per picture, each page the picture's size at 72 DPI (Pillow)."""
    out = io.BytesIO()
    pictures[0].save(out, "PDF", save_all=True, append_images=list(pictures[1:]), resolution=72.0)
    return out.getvalue()


def text_layer_pdf(pictures: Sequence[Image.Image], texts: Sequence[str], **encryption: str) -> bytes:
    """Scanned-worksheet pages: each picture fills its page and an invisible text layer carries ``texts``
    (as OCR leaves it); ``encryption`` (``owner_password``, ``user_password``) encrypts it (fpdf2)."""
    pdf = FPDF(unit="pt")
    pdf.add_font("cjk", fname=CJK_FONT)
    pdf.set_font("cjk", size=8)
    for picture, text in zip(pictures, texts):
        w, h = picture.size
        pdf.add_page(format=(w, h))
        pdf.image(picture, x=0, y=0, w=w, h=h)
        if text:
            with pdf.local_context(text_mode=TextMode.INVISIBLE):
                pdf.set_xy(4, 4)
                pdf.multi_cell(w - 8, 10, text)
    if encryption:
        pdf.set_encryption(**encryption)
    return bytes(pdf.output())


def raw_pdf(objects: Sequence[bytes]) -> bytes:
    """A PDF of these objects (``objects[0]`` is 1 0 obj, the catalogue), with a correct cross-reference table."""
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _stream(head: bytes, data: bytes) -> bytes:
    return b"<< " + head + b" /Length %d >>\nstream\n" % len(data) + data + b"\nendstream"


def scripted_pdf(picture: Image.Image) -> bytes:
    """One page showing ``picture``, with JavaScript run on open (document, page and a named script) and an
    embedded executable: a reader that runs the script or opens the attachment is wrong."""
    jpeg = io.BytesIO()
    picture.convert("RGB").save(jpeg, "JPEG", quality=95)
    w, h = picture.size
    script = b"<< /S /JavaScript /JS (app.alert('pwned'); this.exportDataObject({cName: 'run.exe', nLaunch: 2});) >>"
    return raw_pdf([
        b"<< /Type /Catalog /Pages 2 0 R /OpenAction 5 0 R /Names << /JavaScript 6 0 R /EmbeddedFiles 8 0 R >> >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Resources << /XObject << /Im0 4 0 R >> >> "
        b"/Contents 7 0 R /AA << /O 5 0 R >> >>" % (w, h),
        _stream(b"/Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceRGB /BitsPerComponent 8 "
                b"/Filter /DCTDecode" % (w, h), jpeg.getvalue()),
        script,
        b"<< /Names [(opener) 5 0 R] >>",
        _stream(b"", b"q %d 0 0 %d 0 0 cm /Im0 Do Q" % (w, h)),
        b"<< /Names [(run.exe) 9 0 R] >>",
        b"<< /Type /Filespec /F (run.exe) /EF << /F 10 0 R >> >>",
        _stream(b"/Type /EmbeddedFile", b"MZ\x90\x00 not really a program"),
    ])


def sized_pdf(width_pt: float, height_pt: float, pages: int = 1) -> bytes:
    """``pages`` blank pages of this size in points (a PDF bomb when huge, a strip when long); 0 pages too."""
    kids = b" ".join(b"%d 0 R" % (3 + i) for i in range(pages))
    return raw_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages),
                    *[b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %g %g] >>" % (width_pt, height_pt)] * pages])


def bad_pdfs(good: bytes) -> dict[str, tuple[bytes, str]]:
    """The bad-PDF corpus: name → (bytes, the code it gets). ``good`` is a valid multi-page PDF."""
    return {
        "pdf: encrypted with a password": (
            text_layer_pdf([Image.new("RGB", (64, 64), "white")], ["secret"], owner_password="o",
                           user_password="u"), "encrypted_pdf"),
        "pdf: truncated": (good[: len(good) // 3], "corrupt_pdf"),
        "pdf: garbage after the header": (b"%PDF-1.7\n" + bytes(range(256)) * 8, "corrupt_pdf"),
        "pdf: no pages": (sized_pdf(200, 200, pages=0), "empty_pdf"),
        "pdf: a bomb (a 14400-point square page)": (sized_pdf(14400, 14400), "pdf_page_too_large"),
        "pdf: a strip page (1 × 40)": (sized_pdf(20, 800), "bad_aspect_ratio"),
        "pdf: empty file": (b"", "not_a_pdf"),
    }
