"""Input validation: images and questions (no services needed)."""

from __future__ import annotations

import io
import json
import time

import pytest
from PIL import Image

from tuwen.pipeline.errors import InvalidImage, InvalidQuestion
from tuwen.pipeline.inputs import MAX_NESTING, check_question, decode_image, too_deep

LIMITS = dict(max_bytes=5_000_000, max_pixels=20_000_000, max_aspect_ratio=20.0)


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def code_of(data: bytes, **limits: float) -> str:
    with pytest.raises(InvalidImage) as info:
        decode_image(data, **{**LIMITS, **limits})  # type: ignore[arg-type]
    return info.value.code


def test_refuses_bad_images_with_stable_codes() -> None:
    png = encode(Image.new("RGB", (64, 48), "red"), "PNG")
    assert code_of(b"") == "empty_image"
    assert code_of(png[:40]) == "corrupt_image"
    assert code_of(b"<html><body>hi</body></html>") == "unsupported_image_format"
    assert code_of(b"%PDF-1.4\n%...") == "unsupported_image_format"
    assert code_of(png, max_bytes=10) == "image_too_large"
    assert code_of(encode(Image.new("L", (4000, 100)), "PNG")) == "bad_aspect_ratio"


def test_decompression_bomb_is_refused_from_the_header() -> None:
    bomb = encode(Image.new("1", (30000, 30000)), "PNG", optimize=True)
    assert len(bomb) < 200_000
    assert code_of(bomb) == "image_too_many_pixels"


def test_accepts_and_normalises_common_formats() -> None:
    cmyk = decode_image(encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), **LIMITS)
    assert cmyk.mode == "RGB" and cmyk.getpixel((5, 5))[0] > 200
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    transparent = decode_image(encode(pal, "PNG", transparency=1), **LIMITS)
    assert transparent.getpixel((0, 0)) == (255, 255, 255)
    grey16 = decode_image(encode(Image.new("I;16", (8, 8), 65535), "PNG"), **LIMITS)
    assert grey16.getpixel((0, 0))[0] > 200
    assert decode_image(encode(Image.new("RGB", (20, 10)), "WEBP"), **LIMITS).size == (20, 10)


def test_exif_orientation_is_respected() -> None:
    img = Image.new("RGB", (40, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    assert decode_image(encode(img, "JPEG", exif=exif.tobytes()), **LIMITS).size == (20, 40)


def test_questions() -> None:
    assert check_question("  图中有几个圆形？ \n", max_chars=20) == "图中有几个圆形？"
    for bad, code in [("", "empty_question"), (" \t\n", "empty_question"), ("问" * 21, "question_too_long"),
                      ("图中\x00有什么", "invalid_question"), (b"\xff\xfe", "invalid_question"),
                      (None, "invalid_question")]:
        with pytest.raises(InvalidQuestion) as info:
            check_question(bad, max_chars=20)
        assert info.value.code == code, bad


def test_invisible_questions_are_empty() -> None:
    for invisible in ("\u200b", "\u200b\u200c\u200d\u2060", "\ufeff", " \ufeff\u200b\r\n\t", "\u200e\u200f"):
        with pytest.raises(InvalidQuestion) as info:
            check_question(invisible, max_chars=20)
        assert info.value.code == "empty_question", repr(invisible)
    # Trimmed at the ends only: a joiner inside an emoji sequence stays
    assert check_question("\ufeff图中有几个👩\u200d👩？\u200b", max_chars=20) == "图中有几个👩\u200d👩？"


def test_browser_line_breaks_are_accepted_as_newlines() -> None:
    assert check_question("图中有几个圆形？\r\n请数一数。\r\n", max_chars=40) == "图中有几个圆形？\n请数一数。"
    assert check_question("第一行\r第二行", max_chars=40) == "第一行\n第二行"
    assert check_question("多\r\n\r\n行", max_chars=4) == "多\n\n行"  # a CRLF counts as one character
    with pytest.raises(InvalidQuestion):
        check_question("图中\x0b有什么", max_chars=40)  # other control characters are still refused


def nested(depth: int, inner: str = '"x"') -> str:
    """JSON text ``depth`` levels deep, arrays and objects in turn (``json.dumps`` would recurse)."""
    return ("".join("[" if n % 2 == 0 else '{"k": ' for n in range(depth)) + inner
            + "".join("]" if n % 2 == 0 else "}" for n in reversed(range(depth))))


def test_json_nesting_is_measured_exactly_and_fast() -> None:
    # Valid JSON: exactly the limit passes, one level more does not, wherever the depth is
    for depth in (1, 31, 32, 33, 34, 100, 5000):
        for text in (nested(depth), f'{{"a": [1, 2, {nested(depth)}], "b": {nested(3)}}}',
                     "[" + ",".join([nested(depth - 1 if depth > 1 else 1), "[]"] * 30) + "]"):
            assert too_deep(text) == (json_depth(text) > MAX_NESTING), (depth, text[:80])
    # Brackets inside strings do not count, escaped quotes included
    assert not too_deep(json.dumps({"s": "[" * 1000 + '\\"[{' * 100, "t": ["]" * 50]}))
    # What json.loads would recurse on is never let through, valid or not
    assert all(too_deep(t) for t in ("[" * 1200, "[" * 40 + "]" * 10, "{" * 33, '{"a": ' * 40,
                                     "[" * 20 + '"unterminated' + "[" * 20))
    assert not too_deep(")" + "[]" * 100) and not too_deep("]" * 1000)
    # A body of millions of brackets costs a fraction of a second, not seconds
    started = time.perf_counter()
    assert not too_deep("[" + ",".join(["[]"] * 3_000_000) + "]")
    assert not too_deep("[" + ",".join([nested(31)] * 20_000) + "]")
    assert too_deep("[" + ",".join([nested(31)] * 20_000 + [nested(32)]) + "]")
    assert time.perf_counter() - started < 5


def json_depth(text: str) -> int:
    """The depth as ``json.loads`` sees it (the reference the fast check must agree with)."""
    def depth(value: object) -> int:
        if isinstance(value, list):
            return 1 + max((depth(v) for v in value), default=0)
        if isinstance(value, dict):
            return 1 + max((depth(v) for v in value.values()), default=0)
        return 0

    try:
        return depth(json.loads(text))
    except RecursionError:
        return 10**9
