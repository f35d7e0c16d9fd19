"""PDFs in the OpenAI-compatible APIs, driven by the official ``openai`` SDK against a real gateway and the
session's worker with the demo model: chat ``file`` parts (inline ``file_data`` and a ``file_id`` uploaded
with purpose ``user_data``), the Responses API's ``input_file`` and Batch API lines. Each page of a worksheet
PDF drawn with the demo scenes is answered with that page's facts; a text layer goes into the prompt after its
page; more pages than the family takes is a 400 that says how many fit, with nothing stored."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable

import openai
import pytest

from tests.gateway.conftest import Gateway
from tests.gateway.test_openai import chat_gateway, data_url, sdk  # noqa: F401 - chat_gateway: fixture
from tests.gateway.test_batches import batch_gateway, jsonl, line, read_lines, upload, wait_for  # noqa: F401
from tests.gateway.test_openai_errors import stored
from tests.pdfs import GENERIC_QUESTIONS, scene_pdf, scenes, sized_pdf, text_layer_pdf, worksheet
from tuwen.pipeline.client import Client
from tuwen.pipeline.schema import JobRequest
from tuwen.workers.demo.scenes import has_facts

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

Keys = Callable[..., str]


def file_part(pdf: bytes, name: str = "worksheet.pdf") -> dict[str, object]:
    return {"type": "file", "file": {"file_data": data_url(pdf, "application/pdf"), "filename": name}}


def job_of(gateway: Gateway, job_id: str) -> JobRequest:
    client = Client(gateway.settings)
    try:
        job = client.jobs.request(job_id)
        assert job is not None
        return job
    finally:
        client.close()


def test_each_page_of_a_pdf_is_answered_with_its_facts_inline_and_by_file_id(chat_gateway: Gateway,
                                                                                new_key: Keys) -> None:
    # Given a three-page worksheet PDF (a shape, a colour and a count scene) and an uploaded copy of each page
    pages = scenes(uuid.uuid4().int, ("shape", "colour", "count"))
    with sdk(chat_gateway, new_key()) as api:
        uploaded = api.files.create(file=("p2.pdf", io.BytesIO(scene_pdf([pages[1].image])), "application/pdf"),
                                    purpose="user_data")
        assert uploaded.purpose == "user_data"
        # (an upload that is not a PDF tuwen can read is refused with its code, and not kept)
        for bad, code in ((b"%PDF-1.7\n" + bytes(range(256)), "corrupt_pdf"), (b"hello", "not_a_pdf")):
            with pytest.raises(openai.BadRequestError) as refused:
                api.files.create(file=("bad.pdf", io.BytesIO(bad), "application/pdf"), purpose="user_data")
            assert refused.value.code == code
        assert [f.id for f in api.files.list()] == [uploaded.id]
        answers = []
        for number, page in enumerate(pages, start=1):
            # When each page is sent as a one-page PDF, inline or (page 2) by its file id, with its question
            part = ({"type": "file", "file": {"file_id": uploaded.id}} if number == 2
                    else file_part(scene_pdf([page.image])))
            raw = api.chat.completions.with_raw_response.create(model="tuwen", max_tokens=32, messages=[
                {"role": "user", "content": [part, {"type": "text", "text": page.question}]}])
            answers.append((raw.parse().choices[0].message.content or "", raw.headers["x-tuwen-job-id"]))
    # Then every answer names its page's facts, and each job holds one picture: the page
    assert [has_facts(a, p.facts) for (a, _), p in zip(answers, pages)] == [True] * 3, answers
    assert [len(job_of(chat_gateway, j).image_keys) for _, j in answers] == [1, 1, 1]


def test_a_text_layer_goes_into_the_prompt_after_its_page_and_responses_take_input_file(
        chat_gateway: Gateway, new_key: Keys) -> None:
    # Given a two-page scan with an OCR text layer on page 1 only
    pages = scenes(uuid.uuid4().int, ("shape", "colour"))
    pdf = text_layer_pdf([p.image for p in pages], ["练习一：看图回答", ""])
    with sdk(chat_gateway, new_key()) as api:
        # When it is asked about through the Responses API as an input_file
        response = api.responses.create(model="tuwen", max_output_tokens=32, input=[{"role": "user", "content": [
            {"type": "input_file", "file_data": data_url(pdf, "application/pdf"), "filename": "scan.pdf"},
            {"type": "input_text", "text": pages[0].question}]}])
    # Then the job's user turn is page 1, its text, page 2, the question (OpenAI's rule)
    job = job_of(chat_gateway, response.id.removeprefix("resp_"))
    content = job.messages[-1].content
    kinds = [c.type for c in content]
    assert kinds == ["image", "text", "image", "text"], content
    assert content[1].text == "第1页的文字：\n练习一：看图回答" and content[3].text == pages[0].question
    assert response.status == "completed" and response.output_text


def test_more_pages_than_the_family_takes_says_how_many_fit_and_stores_nothing(chat_gateway: Gateway,
                                                                                new_key: Keys) -> None:
    # Given a five-page PDF and the demo model (LLaVA: 4 pictures in one job)
    pdf = scene_pdf([p.image for p in scenes(uuid.uuid4().int, ("shape",) * 5)])
    client = Client(chat_gateway.settings)
    before = stored(client)
    # When it is sent with one picture beside it
    with sdk(chat_gateway, new_key()) as api, pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(model="tuwen", messages=[{"role": "user", "content": [
            file_part(pdf), {"type": "text", "text": "图中是什么形状？"}]}])
    # Then the 400 says how many pages fit, names the part, and nothing is stored
    assert refused.value.code == "too_many_pages"
    assert "takes 4 pictures in one job, so 4 pages fit" in refused.value.message
    assert refused.value.param == "messages[0].content[0]"
    assert stored(client) == before
    client.close()


def test_batch_api_lines_carry_pdfs_as_file_parts(batch_gateway: Gateway, new_key: Keys) -> None:
    # Given a batch whose lines each ask about a one-page PDF (file parts), and one line with a bad PDF
    pictures, facts = worksheet(uuid.uuid4().int % 10**6, 3)
    lines = [line(f"page-{n}", [{"role": "user", "content": [file_part(scene_pdf([p])), {
        "type": "text", "text": GENERIC_QUESTIONS["colour"]}]}], max_tokens=32) for n, p in enumerate(pictures, 1)]
    lines.append(line("bomb", [{"role": "user", "content": [file_part(sized_pdf(14400, 14400)),
                                                            {"type": "text", "text": "图中是什么形状？"}]}]))
    with sdk(batch_gateway, new_key()) as api:
        # When it runs through the Batch API
        batch = api.batches.create(input_file_id=upload(api, jsonl(lines)), endpoint="/v1/chat/completions",
                                   completion_window="24h")
        done = wait_for(api, batch.id, lambda b: b.status in ("completed", "failed", "expired", "cancelled"))
        out = {x["custom_id"]: x for x in read_lines(api, done.output_file_id)}
        errors = {x["custom_id"]: x for x in read_lines(api, done.error_file_id)}
    # Then each page's line names its page's colour, and the bomb fails alone with its code
    assert done.status == "completed"
    answers = {cid: x["response"]["body"]["choices"][0]["message"]["content"] for cid, x in out.items()}
    assert all(has_facts(answers[f"page-{n}"], facts[n - 1]["colour"]) for n in (1, 2, 3)), answers
    refused = errors["bomb"]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["code"] == "pdf_page_too_large", refused
    assert refused["body"]["error"]["param"] == "messages[0].content[0]"
