"""Validation of what users send: image bytes, question text, and how deep JSON nests.

The producer calls these before anything is stored or queued; the worker calls them again on what it
fetched (it trusts nothing), so a bad item fails alone with a stable code.
"""

from __future__ import annotations

import io
import re
import unicodedata
import warnings

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from tuwen.pipeline.errors import InvalidImage, InvalidQuestion

#: Formats Pillow may open. Anything else (SVG, PDF, HTML, zip …) is refused as unsupported.
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP", "TIFF", "HEIF", "AVIF"})

try:  # optional extra: tuwen[heif] adds HEIC/AVIF phone photos
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:  # pragma: no cover - depends on the installed extras
    pass


def in_mib(n: int) -> str:
    """A byte count as people read limits: ``20 MiB``, ``25.3 MiB`` (``512 KiB`` below one MiB)."""
    if n < 1024 * 1024:
        return f"{n / 1024:.3g} KiB"
    value = n / (1024 * 1024)
    return f"{value:.0f} MiB" if value == int(value) else f"{value:.1f} MiB"


def picture_too_large(limit: int, size: int | None = None) -> InvalidImage:
    """``image_too_large``, saying the limit as people read it, then the bytes: "picture over 20 MiB (it is
    26214400 bytes; TUWEN_MAX_IMAGE_BYTES is 20971520)". ``size`` None: more than the limit was read."""
    seen = f"it is {size} bytes" if size is not None else f"more than {limit} bytes arrived"
    return InvalidImage(f"picture over {in_mib(limit)} ({seen}; TUWEN_MAX_IMAGE_BYTES is {limit})",
                        code="image_too_large")


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, max_aspect_ratio: float) -> Image.Image:
    """Decode untrusted bytes to an RGB picture, or raise ``InvalidImage`` with a precise code.

    EXIF orientation is applied; transparency is flattened onto white; an animated image gives its
    first frame. Dimensions are checked from the header before any pixel is decoded (bomb-safe).
    """
    if not data:
        raise InvalidImage("the image is empty (0 bytes)", code="empty_image")
    if len(data) > max_bytes:
        raise picture_too_large(max_bytes, len(data))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            raise InvalidImage("the image declares too many pixels", code="image_too_many_pixels") from exc
        if _looks_like_image(data):
            raise InvalidImage("the image data is damaged or truncated", code="corrupt_image") from exc
        raise InvalidImage("this is not an image format tuwen reads (PNG, JPEG, GIF, WebP, BMP, TIFF)",
                           code="unsupported_image_format") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on hostile input
        raise InvalidImage(f"the image could not be read: {exc}", code="corrupt_image") from exc
    if img.format not in ALLOWED_FORMATS:
        raise InvalidImage(f"image format {img.format} is not accepted", code="unsupported_image_format")
    w, h = img.size
    if w < 1 or h < 1:
        raise InvalidImage("the image has no pixels", code="corrupt_image")
    if w * h > max_pixels:
        raise InvalidImage(f"the image is {w}×{h} pixels; the limit is {max_pixels} pixels",
                           code="image_too_many_pixels")
    if max(w, h) / min(w, h) > max_aspect_ratio:
        raise InvalidImage(f"the image is {w}×{h}; its sides differ by more than {max_aspect_ratio:g}×",
                           code="bad_aspect_ratio")
    try:
        img.seek(0)
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
        upright: Image.Image = ImageOps.exif_transpose(img) or img
        return _to_rgb(upright)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data surfaces here
        raise InvalidImage(f"the image data is damaged or truncated: {exc}", code="corrupt_image") from exc


_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale to 8 bits rather than clipping everything to white.
        return img.point(lambda v: v / 256).convert("L").convert("RGB")
    return img.convert("RGB")


def check_question(question: object, *, max_chars: int) -> str:
    """Return the question trimmed, with line breaks as ``\\n``, or raise ``InvalidQuestion`` (empty,
    too long, not text).

    CRLF and lone CR become ``\\n`` (browser text areas send CRLF). Whitespace and invisible format
    characters (zero-width space/joiners, word joiner, BOM, bidi marks) are trimmed from both ends, so a
    question made only of them is empty.
    """
    if isinstance(question, bytes):
        try:
            question = question.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidQuestion("the question is not valid UTF-8 text", code="invalid_question") from exc
    if not isinstance(question, str):
        raise InvalidQuestion("the question must be text", code="invalid_question")
    text = _trim(question.replace("\r\n", "\n").replace("\r", "\n"))
    if not text:
        raise InvalidQuestion("the question is empty", code="empty_question")
    if len(text) > max_chars:
        raise InvalidQuestion(f"the question has {len(text)} characters; the limit is {max_chars}",
                              code="question_too_long")
    bad = [ch for ch in text if unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn") and ch not in "\n\t"]
    if bad:
        raise InvalidQuestion(f"the question contains control or invalid characters ({bad[0]!r})",
                              code="invalid_question")
    return text


def _invisible(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch) == "Cf"


def _trim(text: str) -> str:
    """``str.strip`` that also drops format characters (category Cf: U+200B, U+FEFF …) at the ends."""
    start, end = 0, len(text)
    while start < end and _invisible(text[start]):
        start += 1
    while end > start and _invisible(text[end - 1]):
        end -= 1
    return text[start:end]


#: Deepest JSON nesting a request body, a bulk input line or a CSV ``params`` cell may have. ``json.loads``
#: recurses: a line nested 100,000 deep raised RecursionError and left its bulk in ``validating``; a chat
#: body of 1,200 ``[`` was a 500 with a traceback.
MAX_NESTING = 32
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
#: A text's brackets as a walk: ``(`` for ``[`` and ``{``, ``)`` for ``]`` and ``}``; everything else dropped.
_WALK = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(c for c in range(128) if chr(c) not in "[]{}")


def too_deep(text: str, limit: int = MAX_NESTING) -> bool:
    """Whether the JSON text nests arrays/objects deeper than ``limit`` (brackets in strings do not count).

    Every step runs at C speed, so a body of millions of brackets costs a fraction of what ``json.loads``
    itself would: the text's brackets become a walk of ``(`` and ``)``, and each pass drops every
    innermost ``()``, one level off every balanced part. Valid JSON is gone within ``limit`` passes
    unless it is deeper. What no pass drops is unmatched: closes, then opens, which add their excess.
    A text that is not JSON may be called too deep (it is refused either way); a deep one never passes."""
    if text.count("[") + text.count("{") <= limit:
        return False
    walk = _STRINGS.sub("", text).encode("ascii", "ignore").translate(_WALK, _NOT_BRACKETS)
    if b"(" * (limit + 1) in walk:
        return True
    for shaved in range(limit + 1):
        if not walk:
            return False
        shorter = walk.replace(b"()", b"")
        if len(shorter) == len(walk):
            return shaved + walk.count(b"(") - walk.count(b")") > limit
        walk = shorter
    return True
