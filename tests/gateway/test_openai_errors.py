"""The chat API's refusals, as the official SDK sees them: its own exception classes, a code, and the
parameter at fault; the bad-input corpus sent as data: URLs is refused with its codes and stores nothing;
another owner's stored picture is refused exactly like a missing one."""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import openai
import pytest
from PIL import Image

from tuwen.pipeline.client import Client
from tuwen.pipeline.gateway.bodylimits import chat_limit
from tuwen.pipeline.jobs import PREFIX
from tests.gateway.conftest import UPLOAD_LIMIT, Gateway
from tests.gateway.test_gateway import _corpus as upload_corpus
from tests.pdfs import PAGE_KINDS, bad_pdfs, scene_pdf, scenes
from tests.gateway.test_openai import MIB, ask, chat_gateway, data_url, knows, sdk  # noqa: F401 - chat_gateway: fixture
from tests.reliability.test_bad_input import REFUSED
from tuwen.workers.demo.samples import load_samples

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

Keys = Callable[..., str]
SAMPLE = load_samples()[0]
ALL_NEUTRAL = dict(n=1, logprobs=False, frequency_penalty=0, presence_penalty=0.0, response_format={"type": "text"},
                   tools=[], logit_bias={}, store=False, modalities=["text"], service_tier="auto")


def turn(text: object = None, url: str | None = None) -> dict[str, Any]:
    picture = {"type": "image_url", "image_url": {"url": url or data_url(SAMPLE.path.read_bytes())}}
    return {"role": "user", "content": [picture, {"type": "text", "text": SAMPLE.question if text is None else text}]}


#: name → (create() keyword arguments, the code, the param it names)
BAD_REQUESTS: dict[str, tuple[dict[str, Any], str, str | None]] = {
    "n over the limit": ({"n": 99}, "invalid_params", "n"),
    "tools with tool_choice auto": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
                                    "unsupported_parameter", "tool_choice"),
    "tool_choice without tools": ({"tool_choice": "required"}, "invalid_params", "tool_choice"),
    "functions": ({"functions": [{"name": "f", "parameters": {}}]}, "unsupported_parameter", "functions"),
    "top_logprobs without logprobs": ({"top_logprobs": 2}, "invalid_params", "top_logprobs"),
    "logit_bias out of range": ({"logit_bias": {"1": 500}}, "invalid_params", "logit_bias"),
    "frequency_penalty out of range": ({"frequency_penalty": 2.5}, "invalid_params", "frequency_penalty"),
    "top_k below -1": ({"extra_body": {"top_k": -2}}, "invalid_params", "top_k"),
    "max_tokens above the server's cap": ({"max_tokens": 49}, "invalid_params", None),
    "temperature out of range": ({"temperature": 3.5}, "invalid_params", "temperature"),
    "top_p zero": ({"top_p": 0}, "invalid_params", "top_p"),
    "max_tokens too big": ({"max_tokens": 10**6}, "invalid_params", "max_tokens"),
    "max_completion_tokens zero": ({"max_completion_tokens": 0}, "invalid_params", "max_completion_tokens"),
    "both token limits, different": ({"max_tokens": 5, "max_completion_tokens": 6}, "invalid_params",
                                     "max_completion_tokens"),
    "five stop strings": ({"stop": ["a", "b", "c", "d", "e"]}, "invalid_params", "stop"),
    "negative seed": ({"seed": -1}, "invalid_params", "seed"),
    "temperature as text": ({"extra_body": {"temperature": "hot"}}, "invalid_params", "temperature"),
    "stream_options without stream": ({"stream_options": {"include_usage": True}}, "invalid_params", "stream_options"),
    "unknown truncation": ({"extra_body": {"truncation": "sideways"}}, "invalid_params", "truncation"),
    "17 metadata pairs": ({"metadata": {f"k{i}": "v" for i in range(17)}}, "invalid_params", "metadata"),
    "a tool message answering no call": ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
                                         "invalid_messages", "messages[0].tool_call_id"),
    "an unknown role": ({"messages": [{"role": "robot", "content": "x"}]}, "invalid_messages", "messages[0].role"),
    "an audio part of a format tuwen does not read": ({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}}]}]}, "unsupported_audio_format",
        "messages[0].content[0].input_audio.format"),
    "an audio part that is not audio": ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": "AAAA", "format": "wav"}}]}]}, "unsupported_audio_format", None),
    "image_url without url": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                              "invalid_messages", "messages[0].content[0].image_url.url"),
    "empty messages": ({"messages": []}, "invalid_messages", "messages"),
    "a file part with no file": ({"messages": [{"role": "user", "content": [{"type": "file", "file": {
        "filename": "a.pdf"}}]}]}, "invalid_messages", "messages[0].content[0].file"),
    "a file part with both": ({"messages": [{"role": "user", "content": [{"type": "file", "file": {
        "file_id": "file-1", "file_data": "data:application/pdf;base64,JVBERi0="}}]}]}, "invalid_messages",
        "messages[0].content[0].file"),
    "file_data not a data: URL": ({"messages": [{"role": "user", "content": [{"type": "file", "file": {
        "file_data": "JVBERi0xLjcK"}}]}]}, "not_a_pdf", "messages[0].content[0].file.file_data"),
    "a PDF in a system turn": ({"messages": [{"role": "system", "content": [{"type": "file", "file": {
        "file_id": "file-1"}}]}, {"role": "user", "content": "?"}]}, "invalid_messages", "messages[0].content"),
    "a picture in an assistant turn": ({"messages": [
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "tuwen://images/" + "0" * 64}}]},
        {"role": "user", "content": "?"}]}, "invalid_messages", "messages[0].content"),
    "too many pictures": ({"messages": [{"role": "user", "content": [
        *[{"type": "image_url", "image_url": {"url": data_url(SAMPLE.path.read_bytes())}}] * 9,
        {"type": "text", "text": "?"}]}]}, "too_many_images", None),
}


def test_bad_requests_are_bad_request_errors_that_name_the_parameter(chat_gateway: Gateway, new_key: Keys) -> None:
    got = {}
    with sdk(chat_gateway, new_key()) as client:
        for name, (kwargs, _, _) in BAD_REQUESTS.items():
            request = {"model": "tuwen", "messages": [turn()], "max_tokens": 8, **kwargs}
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(**request)
            err = info.value
            assert err.status_code == 400 and err.type == "invalid_request_error" and err.message, name
            got[name] = (err.code, err.param)
        # The neutral values of the refused parameters change nothing, so they are accepted
        fine = client.chat.completions.create(model="tuwen", messages=[turn()], max_tokens=32, **ALL_NEUTRAL)
    assert got == {name: (code, param) for name, (_, code, param) in BAD_REQUESTS.items()}
    assert knows(fine.choices[0].message.content or "", SAMPLE)


def test_auth_not_found_and_rate_limit_are_the_sdks_own_classes(chat_gateway: Gateway, new_key: Keys) -> None:
    # A wrong key: AuthenticationError
    with sdk(chat_gateway, "tw_not_a_key") as stranger, pytest.raises(openai.AuthenticationError) as unknown_key:
        stranger.chat.completions.create(model="tuwen", messages=[turn()])
    assert unknown_key.value.code == "invalid_api_key" and unknown_key.value.type == "authentication_error"
    with sdk(chat_gateway, "tw_not_a_key") as stranger, pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    # A model nobody serves: NotFoundError naming `model`
    with sdk(chat_gateway, new_key()) as client, pytest.raises(openai.NotFoundError) as no_model:
        client.chat.completions.create(model="gpt-4o", messages=[turn()])
    assert (no_model.value.code, no_model.value.param) == ("model_not_served", "model")
    # Past the key's rate limit: RateLimitError with Retry-After
    with sdk(chat_gateway, new_key(rate_limit=1)) as limited:
        limited.chat.completions.create(model="tuwen", messages=[turn()], max_tokens=8)
        with pytest.raises(openai.RateLimitError) as throttled:
            limited.chat.completions.create(model="tuwen", messages=[turn()], max_tokens=8)
    assert throttled.value.code == "rate_limited" and int(throttled.value.response.headers["retry-after"]) >= 1


def test_a_failed_job_is_an_error_with_its_code(chat_gateway: Gateway, new_key: Keys) -> None:
    # Given a conversation longer than the model's context (but within the gateway's character limit)
    history: list[dict[str, Any]] = []
    for i in range(12):
        history += [{"role": "user", "content": f"第{i}个问题：" + "图中有几个圆形？" * 20},
                    {"role": "assistant", "content": "图中有3个圆形。" * 10}]
    messages = [*history, turn()]
    with sdk(chat_gateway, new_key()) as client:
        # When it is asked
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tuwen", messages=messages, max_tokens=32)
        # Then it fails with context_too_long and names the job; truncation: oldest_turns answers it
        shortened = client.chat.completions.create(model="tuwen", messages=messages, max_tokens=32,
                                                   extra_body={"truncation": "oldest_turns"})
    assert refused.value.code == "context_too_long" and "job_id" in refused.value.body  # type: ignore[operator]
    assert knows(shortened.choices[0].message.content or "", SAMPLE)


# -- the bad-input corpus, as data: URLs -----------------------------------------------------------------------
def fresh_picture() -> bytes:
    """A picture no test stored before: if a refused request stored it, the bucket would show it."""
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), tuple(uuid.uuid4().bytes[:3])).save(buf, format="PNG")
    return buf.getvalue()


def chat_corpus() -> dict[str, tuple[dict[str, Any], str]]:
    """name → (the request's changes, the code). The reliability corpus (pictures, questions, params)
    and the gateway's picture corpus, each picture as a data: URL, plus what only URLs can get wrong.
    A case about the text or the params comes with a fresh picture."""
    cases: dict[str, tuple[dict[str, Any], str]] = {}
    for name, (image, question, kwargs, code) in REFUSED.items():
        if code == "empty_question":
            continue  # a picture with no text is a question in OpenAI's API (issue 22): tests/gateway/test_clients.py
        if isinstance(question, bytes):  # not UTF-8: JSON carries it as lone surrogates
            question = question.decode("utf-8", "surrogateescape")
        if image == SAMPLE.path.read_bytes():
            image = fresh_picture()
        request: dict[str, Any] = {"messages": [turn(question, data_url(image))]}
        if "max_new_tokens" in kwargs:
            request["max_tokens"] = kwargs["max_new_tokens"]
        if "priority" in kwargs:
            continue  # a /v1/jobs field: chat ignores it and says so (tuwen-ignored-params)
        if not isinstance(question, str):
            code = "invalid_messages"  # a text part whose text is not a string
        if code == "question_too_long":
            code = "conversation_too_long"  # a conversation's sanity cap is checked first
        cases[name] = (request, code)
    for name, case, code in upload_corpus():
        if set(case) <= {"image", "name"} and isinstance(case.get("image"), bytes):
            cases[f"upload corpus: {name}"] = ({"messages": [turn(url=data_url(case["image"]))]}, code)
    sha = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    for name, url, code in [
        ("not base64", "data:image/png,%89PNG", "invalid_image_url"),
        ("broken base64", "data:image/png;base64,@@@@", "invalid_image_url"),
        ("data: without a comma", "data:image/png;base64", "invalid_image_url"),
        ("ftp URL", "ftp://127.0.0.1/a.png", "invalid_image_url"),
        ("file URL", "file:///etc/passwd", "invalid_image_url"),
        ("host off the allow-list", "http://example.com/a.png", "image_url_not_allowed"),
        ("malformed tuwen URL", "tuwen://images/../../secret", "invalid_image_url"),
        ("tuwen URL of no picture", f"tuwen://images/{sha}", "image_not_found"),
    ]:
        cases[name] = ({"messages": [turn(url=url)]}, code)
    # The bad-PDF corpus as chat file parts (tests/pdfs.py), each with a good first page beside it: nothing stored.
    good = scene_pdf([e.image for e in scenes(uuid.uuid4().int, PAGE_KINDS)])
    five = scene_pdf([e.image for e in scenes(uuid.uuid4().int, ("shape",) * 5)])
    more = {"pdf: 5 pages, the demo family takes 4": (five, "too_many_pages"),
            "pdf: a PNG as file_data": (fresh_picture(), "not_a_pdf")}
    for name, (pdf, code) in {**bad_pdfs(good), **more}.items():
        cases[name] = ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(fresh_picture())}},
            {"type": "file", "file": {"file_data": data_url(pdf, "application/pdf"), "filename": "w.pdf"}},
            {"type": "text", "text": "图中是什么形状？"}]}]}, code)
    return cases


def sendable(body: dict[str, Any]) -> bool:
    try:
        json.dumps(body, ensure_ascii=False).encode()
        return True
    except UnicodeEncodeError:
        return False


def stored(client: Client) -> tuple[set[str], set[str]]:
    return (set(client.images.objects.list("images/")), set(client.jobs.redis.scan_iter(PREFIX + "*")))


def test_the_bad_input_corpus_as_data_urls_gets_400s_with_codes_and_stores_nothing(
        chat_gateway: Gateway, new_key: Keys) -> None:
    client = Client(chat_gateway.settings)
    before = stored(client)
    got: dict[str, str | None] = {}
    cases = chat_corpus()
    token = new_key()
    with sdk(chat_gateway, token) as api, chat_gateway.client(token) as raw:
        for name, (request, _) in cases.items():
            body = {"model": "tuwen", **request}
            if not sendable(body):
                # The SDK cannot encode text that is not UTF-8; JSON's \u escapes can carry it
                answer = raw.post("/v1/chat/completions", content=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})
                assert answer.status_code == 400, name
                got[name] = answer.json()["error"]["code"]
                continue
            with pytest.raises(openai.BadRequestError) as info:
                api.chat.completions.create(**body)
            assert info.value.status_code == 400 and info.value.message, name
            got[name] = info.value.code
    assert got == {name: code for name, (_, code) in cases.items()}
    # Nothing was stored: no picture object, no job record
    assert stored(client) == before
    client.close()


def test_a_bad_second_picture_stores_not_even_the_first(chat_gateway: Gateway, new_key: Keys) -> None:
    fresh = io.BytesIO()
    Image.new("RGB", (48, 48), (uuid.uuid4().int % 256, 80, 160)).save(fresh, format="PNG")
    client = Client(chat_gateway.settings)
    before = stored(client)
    with sdk(chat_gateway, new_key()) as api, pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model="tuwen", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(fresh.getvalue())}},
            {"type": "image_url", "image_url": {"url": data_url(b"<html>not a picture</html>")}},
            {"type": "text", "text": "这两张图有什么不同？"}]}])
    assert info.value.code == "unsupported_image_format"
    assert stored(client) == before
    client.close()


# -- owners ------------------------------------------------------------------------------------------------------
def test_another_owners_stored_picture_is_refused_like_a_missing_one(chat_gateway: Gateway, new_key: Keys) -> None:
    picture = SAMPLE.path.read_bytes()
    key = "images/" + hashlib.sha256(picture).hexdigest()
    missing = "images/" + hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    with sdk(chat_gateway, new_key()) as owner, sdk(chat_gateway, new_key()) as stranger:
        # Given a picture an owner sent once, as a data: URL
        owner.chat.completions.create(model="tuwen", messages=[turn()], max_tokens=8)
        # When the owner names it again by key, it is the same picture
        again = owner.chat.completions.create(model="tuwen", messages=[turn(url=f"tuwen://{key}")], max_tokens=32)
        # And when another owner names it, or a key no one stored, both are refused alike
        refusals = []
        for name in (key, missing):
            with pytest.raises(openai.BadRequestError) as info:
                stranger.chat.completions.create(model="tuwen", messages=[turn(url=f"tuwen://{name}")])
            refusals.append((info.value.code, info.value.param, info.value.message.replace(name, "<key>")))
    assert knows(again.choices[0].message.content or "", SAMPLE)
    assert refusals[0] == refusals[1] and refusals[0][:2] == ("image_not_found", None)


def test_chat_bodies_have_their_own_size_limit(parked_gateway: Gateway, new_key: Keys) -> None:
    """Pictures come base64-encoded in the JSON, so a chat body may be larger than an upload (1 MiB on
    this gateway): by default it may hold one picture of max_image_bytes as a data: URL."""
    limit = chat_limit(parked_gateway.settings, parked_gateway.gw)
    body = json.dumps({"model": "tuwen", "messages": [turn(url=data_url(b"\0" * (2 * UPLOAD_LIMIT)))]}).encode()
    with parked_gateway.client(new_key()) as api:
        bigger_than_an_upload = api.post("/v1/chat/completions", content=body,
                                         headers={"Content-Type": "application/json"})
        too_big = api.post("/v1/chat/completions", content=b"{" + b" " * limit + b"}",
                           headers={"Content-Type": "application/json"})
    # The first is read (no worker serves this gateway's queue: 503, the model check comes after the body)
    assert bigger_than_an_upload.status_code == 503, bigger_than_an_upload.text
    assert bigger_than_an_upload.json()["error"]["code"] == "model_not_served"
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    assert limit == 4 * -(-parked_gateway.settings.max_image_bytes // 3) + MIB
    # The refusal says it as people read the limit: a picture over 20 MiB (the default TUWEN_MAX_IMAGE_BYTES)
    assert parked_gateway.settings.max_image_bytes == 20 * MIB
    assert too_big.json()["error"]["message"].startswith("picture over 20 MiB, "), too_big.json()


def test_a_25_mb_picture_is_a_picture_over_20_mib(chat_gateway: Gateway, parked_gateway: Gateway,
                                                  new_key: Keys) -> None:
    """A 25 MB picture was refused in request-body bytes; whatever route it takes, it is "picture over 20 MiB"
    (the default TUWEN_MAX_IMAGE_BYTES)."""
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (25 * 1000 * 1000)
    # As a data: URL, past the chat body's default limit: refused while the body streams in (parked_gateway)
    with sdk(parked_gateway, new_key()) as client, pytest.raises(openai.APIStatusError) as past_the_body_limit:
        client.chat.completions.create(model="tuwen", messages=[turn(url=data_url(big))])
    # As a data: URL within a larger body limit (chat_gateway takes 40 MiB): refused for its own size
    with sdk(chat_gateway, new_key()) as client, pytest.raises(openai.BadRequestError) as within_it:
        client.chat.completions.create(model="tuwen", messages=[turn(url=data_url(big))])
    # And uploaded to POST /v1/jobs
    with chat_gateway.client(new_key()) as api:
        upload = api.post("/v1/jobs", files={"image": ("big.png", big, "image/png")}, data={"question": "图中有什么？"})
    assert chat_gateway.settings.max_image_bytes == parked_gateway.settings.max_image_bytes == 20 * MIB
    assert past_the_body_limit.value.status_code == 413 and past_the_body_limit.value.code == "request_too_large"
    assert within_it.value.code == "image_too_large"
    assert upload.status_code == 413 and upload.json()["error"]["code"] == "request_too_large"
    for message in (past_the_body_limit.value.message, within_it.value.message, upload.json()["error"]["message"]):
        assert "picture over 20 MiB" in message, message  # (the SDK's message starts "Error code: 413 - ")


def test_no_worker_is_a_503_that_says_what_to_start_and_the_sdk_shows_it_quickly(parked_gateway: Gateway,
                                                                                new_key: Keys) -> None:
    """With Retry-After: 5 the SDK's two retries (its default) took 10-12 s before the error showed."""
    client = openai.OpenAI(base_url=parked_gateway.url + "/v1", api_key=new_key(), timeout=30)  # default retries
    t0 = time.monotonic()
    with client, pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="tuwen", messages=[turn()])
    took = time.monotonic() - t0
    print(f"the SDK (2 retries) showed the no-worker error after {took:.1f}s")
    assert info.value.status_code == 503 and info.value.code == "model_not_served"
    assert info.value.response.headers["retry-after"] == "1"
    assert "`tuwen worker`" in info.value.message and "`tuwen serve`" in info.value.message, info.value.message
    assert took < 5, took


def test_pictures_past_the_served_familys_limit_are_refused_before_anything_is_stored(
        chat_gateway: Gateway, new_key: Keys) -> None:
    """The demo model is a LLaVA (4 pictures a job), under the gateway's own limit of 8: five pictures used to
    be stored and queued, then refused by the worker. The gateway knows the family's limit from the workers'
    announcements and refuses them first (issue 21)."""
    client = Client(chat_gateway.settings)
    before = stored(client)
    fresh = []
    for i in range(5):
        buf = io.BytesIO()
        Image.new("RGB", (48, 48), (uuid.uuid4().int % 256, i * 40, 160)).save(buf, format="PNG")
        fresh.append({"type": "image_url", "image_url": {"url": data_url(buf.getvalue())}})
    with sdk(chat_gateway, new_key()) as api, pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model="tuwen", messages=[{"role": "user", "content": [
            *fresh, {"type": "text", "text": "这几张图有什么不同？"}]}])
    assert info.value.code == "too_many_images" and "at most 4" in info.value.message
    assert chat_gateway.settings.max_images_per_job > 4
    assert stored(client) == before
    client.close()


# -- one error shape on every route ------------------------------------------------------------------------------
FIELDS = {"message", "type", "param", "code"}


def test_every_error_answer_has_openais_four_fields(parked_gateway: Gateway, new_key: Keys) -> None:
    token = new_key()
    png = SAMPLE.path.read_bytes()
    # Given requests each route family refuses: made-up paths, wrong methods, tuwen's own routes, no key
    with parked_gateway.client(token) as api, parked_gateway.client() as anonymous:
        answers = {
            "made-up path": api.get("/v1/nope"),
            "made-up path, no key": anonymous.post("/v1/nope/deeper?x=1", json={}),
            "wrong method, chat": api.delete("/v1/chat/completions"),
            "wrong method, jobs": api.put("/v1/jobs"),
            "no such job": api.get("/v1/jobs/" + "0" * 32),
            "malformed job id": api.get("/v1/jobs/nope"),
            "bad form field": api.post("/v1/jobs", files={"image": ("a.png", png, "image/png")},
                                       data={"question": "图中有几个圆形？", "max_new_tokens": "lots"}),
            "no key": anonymous.get("/v1/jobs/" + "0" * 32),
            "bad key, models": api.get("/v1/models", headers={"Authorization": "Bearer sk-tw-nope"}),
            "chat, bad body": api.post("/v1/chat/completions", content=b"{", headers={"Content-Type": "application/json"}),
        }
    # Then each is OpenAI's {"error": {"message", "type", "param", "code"}}, type following the status
    want = {"made-up path": (404, "not_found", "invalid_request_error"),
            "made-up path, no key": (404, "not_found", "invalid_request_error"),
            "wrong method, chat": (405, "method_not_allowed", "invalid_request_error"),
            "wrong method, jobs": (405, "method_not_allowed", "invalid_request_error"),
            "no such job": (404, "not_found", "invalid_request_error"),
            "malformed job id": (404, "not_found", "invalid_request_error"),
            "bad form field": (422, "invalid_params", "invalid_request_error"),
            "no key": (401, "unauthorized", "authentication_error"),
            "bad key, models": (401, "invalid_api_key", "authentication_error"),
            "chat, bad body": (400, "invalid_request", "invalid_request_error")}
    got = {name: (a.status_code, a.json()["error"]["code"], a.json()["error"]["type"]) for name, a in answers.items()}
    assert got == want, {name: answers[name].text for name in got if got[name] != want[name]}
    for name, answer in answers.items():
        assert set(answer.json()) == {"error"} and set(answer.json()["error"]) == FIELDS, (name, answer.text)
        assert answer.headers["content-type"] == "application/json", name
    # And the field is named where it is known, and null elsewhere
    assert answers["bad form field"].json()["error"]["param"] == "max_new_tokens"
    assert answers["made-up path"].json()["error"]["param"] is None
    # And a made-up path and a wrong method say which, the 405 with the methods the path takes
    assert answers["made-up path"].json()["error"]["message"] == "Invalid URL (GET /v1/nope): there is no such route"
    assert answers["wrong method, chat"].headers["allow"] == "POST"
    assert "DELETE /v1/chat/completions" in answers["wrong method, chat"].json()["error"]["message"]
    assert answers["wrong method, jobs"].headers["allow"] == "POST"
    # And a job that does not exist is still answered byte for byte as before for any id
    assert answers["no such job"].json() == {"error": {"message": f"no job {'0' * 32}", "type": "invalid_request_error",
                                                       "param": None, "code": "not_found"}}


def test_the_sdk_raises_its_own_classes_for_a_made_up_path_and_a_wrong_method(parked_gateway: Gateway,
                                                                             new_key: Keys) -> None:
    with sdk(parked_gateway, new_key()) as client:
        # When the SDK asks for a path tuwen does not serve
        with pytest.raises(openai.NotFoundError) as missing:
            client.get("/nope", cast_to=object)
        # And for a method a path does not take
        with pytest.raises(openai.APIStatusError) as wrong:
            client.delete("/chat/completions", cast_to=object)
    # Then it reads tuwen's code and OpenAI's type from the body, as for any OpenAI error
    assert (missing.value.status_code, missing.value.code, missing.value.type) == (404, "not_found",
                                                                                   "invalid_request_error")
    assert missing.value.param is None and "/v1/nope" in missing.value.message
    assert (wrong.value.status_code, wrong.value.code) == (405, "method_not_allowed")
    assert wrong.value.response.headers["allow"] == "POST"


def test_a_question_without_a_picture_is_answered_with_a_warning(chat_gateway: Gateway, new_key: Keys) -> None:
    """The demo model was trained on questions about pictures only: a text-only question is answered, and the
    answer says that it had no picture (docs/openai.md, "Pictures")."""
    with sdk(chat_gateway, new_key()) as client:
        text_only = client.chat.completions.with_raw_response.create(
            model="tuwen", messages=[{"role": "user", "content": "图中有几个圆形？"}], max_tokens=16)
        with_one = client.chat.completions.with_raw_response.create(model="tuwen", messages=[turn()], max_tokens=16)
        streamed = client.chat.completions.with_raw_response.create(
            model="tuwen", messages=[{"role": "user", "content": "你好"}], max_tokens=8, stream=True)
        list(streamed.parse())
    assert text_only.parse().choices[0].message.content is not None
    assert text_only.headers["tuwen-warning"].startswith("no_picture: "), text_only.headers
    assert streamed.headers["tuwen-warning"].startswith("no_picture: ")
    assert "tuwen-warning" not in with_one.headers
