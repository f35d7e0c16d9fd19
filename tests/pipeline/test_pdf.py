"""PDF pages as pictures (``pipeline.pdf``): the demo scenes saved into a PDF come back as pictures of the
chosen size with their text layer, page lists read as people write them, and every bad PDF of the corpus
gets its code before a page is rendered. Nothing running; about 2 s."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.pdfs import PAGE_KINDS, bad_pdfs, scene_pdf, scenes, scripted_pdf, sized_pdf, text_layer_pdf
from tuwen.pipeline import registry
from tuwen.pipeline.pdf import (DEFAULT_PAGE_SIDE, InvalidPdf, check_pdf, clean_text, page_numbers, page_side,
                                render_pdf)
from tuwen.pipeline.settings import Settings

SETTINGS = Settings(pdf_page_side=448)


def test_pages_come_back_as_pictures_of_the_page_side_with_their_text() -> None:
    examples = scenes(11, PAGE_KINDS)
    data = text_layer_pdf([e.image for e in examples], ["第一页：3 + 4 = ?", "", "Page three\r\n\x00done"])
    pages = render_pdf(data, SETTINGS)
    assert [p.number for p in pages] == [1, 2, 3]
    assert [p.size for p in pages] == [(448, 448)] * 3
    assert [p.text for p in pages] == ["第一页：3 + 4 = ?", "", "Page three\ndone"]
    first = Image.open(io.BytesIO(pages[0].png))
    assert first.format == "PNG" and first.size == (448, 448)
    # The picture is the scene, scaled: its colours are where the scene's are.
    scene = examples[0].image.convert("RGB").resize((448, 448))
    diff = sum(abs(a - b) for a, b in zip(first.convert("RGB").tobytes()[::97], scene.tobytes()[::97]))
    assert diff / len(scene.tobytes()[::97]) < 24
    assert [p.number for p in render_pdf(data, SETTINGS, [3, 1])] == [3, 1]


def test_pages_are_drawn_at_the_size_the_served_family_announces_unless_the_setting_says() -> None:
    # Given workers of two families on the bulk queue, announcing the side their processors bring pictures to
    workers = [{"name": "a", "queues": ["bulk"], "picture_side": 336}, {"name": "b", "queues": ["bulk"],
               "picture_side": 672}, {"name": "c", "queues": ["interactive"], "picture_side": 96}]
    announced = registry.picture_side(workers, "bulk")
    # Then a bulk's pages are drawn at the larger (no worker sees a page smaller than it takes) ...
    assert announced == 672 and registry.picture_side(workers, "nobody") is None
    page = scene_pdf([e.image for e in scenes(3, PAGE_KINDS)[:1]])
    assert render_pdf(page, Settings(), side=page_side(Settings(), announced))[0].size == (672, 672)
    # ... TUWEN_PDF_PAGE_SIDE wins over them, and with no worker to ask, the default
    assert page_side(Settings(pdf_page_side=448), announced) == 448
    assert page_side(Settings(), None) == DEFAULT_PAGE_SIDE


def test_a_big_page_is_drawn_at_the_minimum_dpi_and_a_bomb_is_refused_before_drawing() -> None:
    # An A0 poster (2384 × 3370 points) at 72 DPI: bigger than the page side, under the pixel limit.
    assert check_pdf(sized_pdf(2384, 3370), SETTINGS) == 1
    assert render_pdf(sized_pdf(2384, 3370), SETTINGS)[0].size == (2384, 3370)
    with pytest.raises(InvalidPdf) as refused:
        check_pdf(sized_pdf(14400, 14400), SETTINGS)
    assert refused.value.code == "pdf_page_too_large" and "14400×14400 pixels at 72 DPI" in refused.value.message


def test_javascript_and_attachments_are_ignored_and_the_page_is_drawn() -> None:
    example = scenes(12, ["shape"])[0]
    pages = render_pdf(scripted_pdf(example.image), SETTINGS)
    assert len(pages) == 1 and pages[0].text == "" and pages[0].size == (448, 448)


@pytest.mark.parametrize(("spec", "pages"), [(None, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]), ("3-5,9", [3, 4, 5, 9]),
                                             (" 2 , 2-3 ", [2, 3]), ("10", [10])])
def test_page_lists(spec: str | None, pages: list[int]) -> None:
    assert page_numbers(spec, 10) == pages


@pytest.mark.parametrize("spec", ["0", "5-3", "1,,2", "x", "11", "3-12", "-2"])
def test_bad_page_lists(spec: str) -> None:
    with pytest.raises(InvalidPdf) as refused:
        page_numbers(spec, 10)
    assert refused.value.code == "invalid_pages"


def test_the_bad_pdf_corpus_gets_its_codes() -> None:
    good = scene_pdf([e.image for e in scenes(13, PAGE_KINDS)])
    corpus = {**bad_pdfs(good), "over TUWEN_MAX_PDF_PAGES": (good, "too_many_pages"),
              "over TUWEN_MAX_PDF_BYTES": (good, "pdf_too_large"), "a PNG": (_png(), "not_a_pdf")}
    small = {"over TUWEN_MAX_PDF_PAGES": SETTINGS.model_copy(update={"max_pdf_pages": 2}),
             "over TUWEN_MAX_PDF_BYTES": SETTINGS.model_copy(update={"max_pdf_bytes": len(good) - 1})}
    got = {}
    for name, (data, _) in corpus.items():
        try:
            check_pdf(data, small.get(name, SETTINGS))
            got[name] = "accepted"
        except InvalidPdf as exc:
            got[name] = exc.code
    assert got == {name: code for name, (_, code) in corpus.items()}


def test_page_text_is_cleaned_for_the_prompt() -> None:
    assert clean_text("  a\r\nb\x0c\n\n\n\nc\ufffe  ") == "a\nb\n\nc"


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "PNG")
    return out.getvalue()
