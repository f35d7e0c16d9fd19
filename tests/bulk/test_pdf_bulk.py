"""PDFs in bulks, against the session worker with the demo model: ``tuwen bulk submit --pdf --questions`` asks
every question about every page (a page's questions next to each other), manifest lines name a PDF and its
pages, bad PDFs fail their lines alone with their codes, and results and the HTML report carry file and page.
Every answer is checked against its page's facts."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.bulk.conftest import cli, write_jsonl
from tests.pdfs import GENERIC_QUESTIONS, scene_pdf, sized_pdf, worksheet
from tuwen.pipeline.bulk.store import BulkStore
from tuwen.pipeline.settings import Settings
from tuwen.workers.demo.scenes import has_facts

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
runner = CliRunner()


def submitted(settings: Settings, *args: str) -> str:
    res = runner.invoke(cli(), ["bulk", "submit", *args], env=settings.to_env())
    assert res.exit_code in (0, 1), res.output
    return res.stdout.strip().splitlines()[-1]


def test_every_question_about_every_page_of_a_pdf_is_answered_with_its_facts(
        worker: Any, pipeline_settings: Settings, store: BulkStore, tmp_path: Path) -> None:
    # Given a 4-page worksheet PDF and three questions that fit every page
    pictures, facts = worksheet(uuid.uuid4().int % 10**6, 4)
    (tmp_path / "book.pdf").write_bytes(scene_pdf(pictures))
    (tmp_path / "questions.txt").write_text("\n".join(GENERIC_QUESTIONS.values()) + "\n", encoding="utf-8")
    # When it is submitted with tuwen bulk submit --pdf --questions (pages 1-2 and 4)
    bulk_id = submitted(pipeline_settings, "--pdf", str(tmp_path / "book.pdf"), "--questions",
                        str(tmp_path / "questions.txt"), "--pages", "1-2,4")
    lines = list(store.results(bulk_id))
    # Then the lines go page by page, each page's questions together, and carry file and page
    kinds = list(GENERIC_QUESTIONS)
    assert [(x["file"], x["page"]) for x in lines] == [("book.pdf", p) for p in (1, 2, 4) for _ in kinds]
    assert [x["custom_id"] for x in lines[:3]] == ["book.pdf:p1:q1", "book.pdf:p1:q2", "book.pdf:p1:q3"]
    # And every answer names its page's facts; a page's questions share one stored picture
    wrong = [(x["page"], x["question"], x["answer"]) for i, x in enumerate(lines)
             if not has_facts(x["answer"] or "", facts[x["page"] - 1][kinds[i % 3]])]
    assert x_all_succeeded(lines) and len(wrong) <= 1, wrong  # the demo model: ~95% per question
    assert len({x["image_key"] for x in lines}) == 3
    # And the HTML report names the file and the page under each picture
    page = tmp_path / "report.html"
    assert runner.invoke(cli(), ["bulk", "report", bulk_id, "--html", str(page)],
                         env=pipeline_settings.to_env()).exit_code == 0
    assert page.read_text(encoding="utf-8").count("book.pdf · 第4页 p. 4") == 3


def x_all_succeeded(lines: list[dict[str, Any]]) -> bool:
    return all(x["status"] == "succeeded" for x in lines)


def test_manifest_lines_name_pdfs_and_pages_and_bad_ones_fail_alone(
        worker: Any, pipeline_settings: Settings, store: BulkStore, tmp_path: Path) -> None:
    # Given a manifest mixing a picture line, PDF lines with page lists, and bad PDFs
    pictures, facts = worksheet(uuid.uuid4().int % 10**6, 3)
    (tmp_path / "w.pdf").write_bytes(scene_pdf(pictures))
    (tmp_path / "bomb.pdf").write_bytes(sized_pdf(14400, 14400))
    (tmp_path / "cut.pdf").write_bytes(scene_pdf(pictures)[:400])
    pictures[0].save(tmp_path / "p.png")
    shape = GENERIC_QUESTIONS["shape"]
    manifest = write_jsonl(tmp_path / "in.jsonl", [
        {"custom_id": "pic", "image": "p.png", "question": shape},
        {"custom_id": "w", "pdf": "w.pdf", "pages": "3,1", "question": shape},
        {"custom_id": "bad-pages", "pdf": "w.pdf", "pages": "2-9", "question": shape},
        {"custom_id": "bomb", "pdf": "bomb.pdf", "question": shape},
        {"custom_id": "cut", "pdf": "cut.pdf", "question": shape},
        {"custom_id": "gone", "pdf": "nope.pdf", "question": shape}])
    # When it is submitted
    lines = {x["custom_id"]: x for x in store.results(submitted(pipeline_settings, str(manifest)))}
    # Then the PDF line became one line per page, in the order asked, answered with that page's facts
    assert list(lines) == ["pic", "w:p3", "w:p1", "bad-pages", "bomb:p1", "cut", "gone"]
    for cid, number in (("w:p3", 3), ("w:p1", 1)):
        assert (lines[cid]["file"], lines[cid]["page"], lines[cid]["status"]) == ("w.pdf", number, "succeeded")
        assert has_facts(lines[cid]["answer"], facts[number - 1]["shape"]), lines[cid]
    # And the page and the picture of the same scene are stored as different pictures, both answered
    assert lines["pic"]["status"] == "succeeded" and "file" not in lines["pic"]
    # And each bad PDF failed its line alone, with its code
    assert {cid: lines[cid]["error"]["code"] for cid in ("bad-pages", "bomb:p1", "cut", "gone")} == {
        "bad-pages": "invalid_pages", "bomb:p1": "pdf_page_too_large", "cut": "corrupt_pdf", "gone": "file_not_found"}
    assert json.dumps(lines["bomb:p1"], ensure_ascii=False).count("14400") >= 1
