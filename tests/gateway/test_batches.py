"""The OpenAI Batch API over HTTP, driven by the official ``openai`` SDK: a real uvicorn gateway, the
session's real ``tuwen worker`` with the demo model, real Redis and a real S3 server (moto).

``files.create`` → ``batches.create`` → poll ``batches.retrieve`` → ``files.content``: worksheet pictures
with known facts, bad lines in the error file, cancel with partial output, a refused file, owners kept
apart, expiry, signed batch webhooks, one machinery with ``tuwen bulk``, and interactive chat latency
while a batch runs. The gateway restart and the 20,000-line upload are in ``test_batches_restart``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from openai import OpenAI
from typer.testing import CliRunner

from tuwen.pipeline.bulk.records import PREFIX as BULK_PREFIX
from tuwen.pipeline.client import Client
from tuwen.pipeline.jobs import connect
from tuwen.pipeline.settings import Settings
from tuwen.pipeline.gateway.webhooks import verify
from tests.bulk.conftest import cli
from tests.conftest import TIMING
from tests.bulk.test_fairness import percentile
from tests.gateway.conftest import SECRET, Gateway, Receiver, gateway_settings, start_gateway
from tuwen.workers.demo.scenes import KINDS, Example, draw_worksheet_example
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

Keys = Callable[..., str]
URL = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")


# -- helpers (test_batches_restart uses them too) -----------------------------------------------------------
def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def png(example: Example) -> bytes:
    buf = io.BytesIO()
    example.image.save(buf, format="PNG")
    return buf.getvalue()


def line(custom_id: str, messages: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": URL,
            "body": {"model": "tuwen", "messages": messages, "max_tokens": 48, **params}}


def ask(picture: bytes, question: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture)}},
                                        {"type": "text", "text": question}]}


def worksheets(n: int, seed: int, prefix: str = "ws") -> tuple[list[dict[str, Any]], dict[str, Example]]:
    """``n`` lines, each a worksheet picture (drawn with known facts) and its Chinese question."""
    rng = random.Random(seed)
    lines, examples = [], {}
    for i in range(n):
        ex = draw_worksheet_example(rng, KINDS[i % len(KINDS)])
        cid = f"{prefix}-{i:04d}"
        lines.append(line(cid, [ask(png(ex), ex.question)]))
        examples[cid] = ex
    return lines, examples


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode()


def sdk(gateway: Gateway, token: str, timeout: float = 120) -> OpenAI:
    """The official client as a backend builds it (no retries: each test sees the first answer)."""
    return OpenAI(base_url=gateway.url + "/v1", api_key=token, max_retries=0, timeout=timeout)


def upload(client: OpenAI, content: bytes, name: str = "worksheets.jsonl") -> str:
    return client.files.create(file=(name, content, "application/jsonl"), purpose="batch").id


def wait_for(client: OpenAI, batch_id: str, until: Callable[[Any], bool], timeout: float = 300) -> Any:
    """Poll ``batches.retrieve`` (as a backend does) until ``until(batch)`` or the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch) or time.monotonic() > deadline:
            return batch
        time.sleep(0.25)


def read_lines(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x]


def knows(answer: str, example: Example) -> bool:
    return all(fact in answer for fact in example.facts)


def signed_events(receiver: Receiver, batch_id: str) -> list[dict[str, Any]]:
    """The events delivered about ``batch_id`` whose signature checks out."""
    out = []
    for d in receiver.deliveries:
        headers = {k.lower(): v for k, v in d.headers.items()}
        if headers.get("x-tuwen-batch-id") == batch_id:
            assert verify(SECRET, d.body, headers["x-tuwen-timestamp"], headers["x-tuwen-signature"]), d
            out.append(d.json())
    return out


@pytest.fixture(scope="module")
def batch_gateway(pipeline_settings: Settings, worker: WorkerProcess) -> Iterator[Gateway]:
    """On the session worker's queues; chat requests (and so batch lines) up to 8 MiB."""
    gw = start_gateway(pipeline_settings, gateway_settings(gateway_max_chat_bytes=8 * 1024 * 1024))
    yield gw
    gw.stop()


# -- the flow -------------------------------------------------------------------------------------------------
def test_a_200_line_worksheet_batch_answers_every_line_once_with_the_right_facts(
        batch_gateway: Gateway, new_key: Keys, receiver: Receiver) -> None:
    good, examples = worksheets(200, seed=20_261_130)
    picture = png(next(iter(examples.values())))
    bad = [  # Given four lines that parse but cannot be answered
        line("bad-corrupt", [ask(picture[: len(picture) // 3], "图中是什么形状？")]),
        line("bad-pictures", [{"role": "user", "content": [
            *[{"type": "image_url", "image_url": {"url": data_url(picture)}}] * 5,
            {"type": "text", "text": "一共有几个图形？"}]}]),
        line("bad-context", [ask(picture, "你好，请看这张图。"), {"role": "assistant", "content": "好" * 700},
                             {"role": "user", "content": "图中是什么形状？"}]),
        # The tests' TUWEN_MAX_NEW_TOKENS is 48: a line asking for more is refused, never lowered (issue 22)
        line("bad-budget", [ask(picture, "图中是什么形状？")], max_tokens=49),
    ]
    lines = good[:60] + bad[:1] + good[60:130] + bad[1:2] + good[130:] + bad[2:]
    with sdk(batch_gateway, new_key()) as client:
        # When a backend uploads the file, creates the batch and polls it
        started = time.monotonic()
        file_id = upload(client, jsonl(lines))
        created = client.batches.create(input_file_id=file_id, endpoint=URL, completion_window="24h",
                                        metadata={"class": "三年级二班"},
                                        extra_body={"callback_url": receiver.url})
        assert created.status == "validating" and created.input_file_id == file_id
        seen = {created.status}
        batch = wait_for(client, created.id, lambda b: seen.add(b.status) or b.status in TERMINAL)
        elapsed = time.monotonic() - started
        outputs, errors = read_lines(client, batch.output_file_id), read_lines(client, batch.error_file_id)
        listed = [b.id for b in client.batches.list(limit=5)]
    # Then it completed, with every line counted …
    assert batch.status == "completed", batch
    assert batch.request_counts.model_dump() == {"total": 204, "completed": 200, "failed": 4}
    assert batch.metadata == {"class": "三年级二班"} and created.id in listed
    assert {"validating", "completed"} <= seen and batch.in_progress_at and batch.finalizing_at
    # … every custom_id answered exactly once, the good ones in the output file, the bad ones in the error file
    assert sorted(x["custom_id"] for x in outputs + errors) == sorted(x["custom_id"] for x in lines)
    assert {x["custom_id"] for x in errors} == {"bad-corrupt", "bad-pictures", "bad-context", "bad-budget"}
    # … each body a chat.completion exactly as the chat endpoint answers, naming the picture's facts (≥ 90%)
    for x in outputs:
        body = x["response"]["body"]
        assert x["error"] is None and x["response"]["status_code"] == 200 and x["id"].startswith("batch_req_")
        assert body["object"] == "chat.completion" and body["id"] == f"chatcmpl-{x['response']['request_id']}"
        assert body["choices"][0]["message"]["role"] == "assistant" and body["usage"]["completion_tokens"] > 0
    right = sum(knows(x["response"]["body"]["choices"][0]["message"]["content"], examples[x["custom_id"]])
                for x in outputs)
    assert right >= 0.9 * 200, right
    # … and the bad lines carry their codes, as the chat endpoint would have answered them
    codes = {x["custom_id"]: (x["response"]["status_code"], x["response"]["body"]["error"]["code"]) for x in errors}
    assert codes == {"bad-corrupt": (400, "corrupt_image"), "bad-pictures": (400, "too_many_images"),
                     "bad-context": (400, "context_too_long"), "bad-budget": (400, "invalid_params")}, codes
    # And the signed batch.completed event arrived
    receiver.wait_for(lambda ds: len(ds) >= 1, timeout=30)
    assert [e["type"] for e in signed_events(receiver, created.id)] == ["batch.completed"]
    reader = Client(batch_gateway.settings)
    try:
        jobs = list(reader.jobs.get_many([x["response"]["request_id"] for x in outputs]).values())
    finally:
        reader.close()
    queued_s = max(j.created_at or 0.0 for j in jobs) - created.created_at
    answered_s = max(j.finished_at or 0.0 for j in jobs) - min(j.started_at or 0.0 for j in jobs)
    print(f"\nHTTP batch: 204 lines in {elapsed:.1f}s from upload to output ({204 / elapsed:.1f} lines/s through the "
          f"HTTP path); validated and queued within {queued_s:.1f}s of batches.create, answered in "
          f"{answered_s:.1f}s ({200 / answered_s:.1f} lines/s, the worker); {right}/200 right facts")


WORKSHEET_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "kind"], "properties": {
    "answer": {"type": "string", "maxLength": 10}, "kind": {"enum": ["形状", "颜色", "数量", "算式", "描述"]}}}


def test_a_200_line_batch_with_a_schema_gives_200_outputs_that_validate(batch_gateway: Gateway,
                                                                       new_key: Keys) -> None:
    """Issue 24's measure: 200 worksheet lines, each with a json_schema response_format, through the Batch API;
    every output checked against the schema with ``jsonschema``, independently of tuwen."""
    fmt = {"type": "json_schema", "json_schema": {"name": "worksheet", "strict": True, "schema": WORKSHEET_SCHEMA}}
    lines = [{**x, "body": {**x["body"], "response_format": fmt}} for x in worksheets(200, seed=20_261_207)[0]]
    with sdk(batch_gateway, new_key()) as client:
        started = time.monotonic()
        created = client.batches.create(input_file_id=upload(client, jsonl(lines)), endpoint=URL,
                                        completion_window="24h")
        batch = wait_for(client, created.id, lambda b: b.status in TERMINAL)
        elapsed = time.monotonic() - started
        outputs, errors = read_lines(client, batch.output_file_id), read_lines(client, batch.error_file_id)
    assert batch.status == "completed" and not errors, (batch, errors[:3])
    assert sorted(x["custom_id"] for x in outputs) == sorted(x["custom_id"] for x in lines)
    valid = 0
    for x in outputs:
        choice = x["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), WORKSHEET_SCHEMA)
        valid += 1
    assert valid == 200
    print(f"\n200 schema lines through the Batch API in {elapsed:.1f}s: {valid}/200 outputs validate")


def test_an_http_batch_is_a_bulk_to_the_cli_and_a_cli_bulk_a_batch_to_the_api(
        batch_gateway: Gateway, new_key: Keys, tmp_path: Path) -> None:
    owner = f"owner-{uuid.uuid4().hex[:8]}"
    lines, examples = worksheets(4, seed=5)
    env = batch_gateway.settings.to_env()
    runner = CliRunner()
    # Given a bulk submitted with the CLI for an owner …
    for i, ex in enumerate(examples.values()):
        ex.image.save(tmp_path / f"p{i}.png")
    (tmp_path / "cli.jsonl").write_text("".join(json.dumps({"custom_id": f"cli-{i}", "image": f"p{i}.png",
                                                            "question": ex.question}, ensure_ascii=False) + "\n"
                                                for i, ex in enumerate(examples.values())), encoding="utf-8")
    submitted = runner.invoke(cli(), ["bulk", "submit", str(tmp_path / "cli.jsonl"), "--owner", owner, "--json"],
                              env=env)
    assert submitted.exit_code == 0, submitted.output
    bulk_id = json.loads(submitted.stdout)["id"]
    with sdk(batch_gateway, new_key(owner)) as client:
        # … and a batch created over HTTP by the same owner
        batch = client.batches.create(input_file_id=upload(client, jsonl(lines)), endpoint=URL,
                                      completion_window="24h")
        batch = wait_for(client, batch.id, lambda b: b.status in TERMINAL)
        # Then the API lists and reads both
        listed = [b.id for b in client.batches.list()]
        from_cli = client.batches.retrieve(bulk_id)
    assert batch.status == "completed" and listed[:2] == [batch.id, bulk_id]
    assert from_cli.status == "completed" and from_cli.input_file_id is None
    assert from_cli.request_counts.model_dump() == {"total": 4, "completed": 4, "failed": 0}
    # And `tuwen bulk list / status / results / report` show the batch created over HTTP, as any bulk
    listed_cli = json.loads(runner.invoke(cli(), ["bulk", "list", "--json"], env=env).stdout)
    status = json.loads(runner.invoke(cli(), ["bulk", "status", batch.id, "--json"], env=env).stdout)
    results = runner.invoke(cli(), ["bulk", "results", batch.id], env=env).stdout.splitlines()
    report = runner.invoke(cli(), ["bulk", "report", batch.id, "--html", str(tmp_path / "r.html")], env=env)
    assert {batch.id, bulk_id} <= {b["id"] for b in listed_cli}
    assert status["state"] == "completed" and status["owner"] == owner
    assert status["openai"]["output_file_id"] == batch.output_file_id
    assert [json.loads(x)["custom_id"] for x in results] == [x["custom_id"] for x in lines]
    assert report.exit_code == 0 and all(x["custom_id"] in (tmp_path / "r.html").read_text() for x in lines)


def test_batches_page_newest_first_and_an_idempotency_key_makes_one_batch(
        batch_gateway: Gateway, new_key: Keys) -> None:
    refused = jsonl([line("same", []), line("same", [])])  # a file every batch refuses at once (no worker)
    with sdk(batch_gateway, new_key()) as client:
        file_id = upload(client, refused)
        ids = [client.batches.create(input_file_id=file_id, endpoint=URL, completion_window="24h").id
               for _ in range(3)]
        # When the same request is sent twice with one Idempotency-Key
        key = {"Idempotency-Key": uuid.uuid4().hex}
        once = client.batches.with_raw_response.create(input_file_id=file_id, endpoint=URL, completion_window="24h",
                                                       extra_headers=key)
        twice = client.batches.with_raw_response.create(input_file_id=file_id, endpoint=URL,
                                                        completion_window="24h", extra_headers=key)
        # Then it made one batch
        assert once.parse().id == twice.parse().id and twice.headers["idempotent-replayed"] == "true"
        ids.append(once.parse().id)
        # And the batches page newest first, each page after the last id of the one before
        first = client.batches.list(limit=3)
        assert [b.id for b in first.data] == ids[::-1][:3] and first.has_more
        rest = client.batches.list(limit=3, after=first.data[-1].id)
        assert [b.id for b in rest.data] == ids[:1] and not rest.has_more
        assert [b.id for b in client.batches.list(limit=1)] == ids[::-1]  # the SDK follows the pages


def test_cancel_mid_run_goes_through_cancelling_and_keeps_the_finished_lines(
        batch_gateway: Gateway, new_key: Keys, receiver: Receiver) -> None:
    lines, _ = worksheets(200, seed=77)
    with sdk(batch_gateway, new_key()) as client:
        batch = client.batches.create(input_file_id=upload(client, jsonl(lines)), endpoint=URL,
                                      completion_window="24h", extra_body={"callback_url": receiver.url})
        # Given a batch some of whose lines are answered
        running = wait_for(client, batch.id, lambda b: b.request_counts and b.request_counts.completed >= 8
                           or b.status in TERMINAL)
        assert running.status == "in_progress", running
        # When it is cancelled
        cancelling = client.batches.cancel(batch.id)
        again = client.batches.cancel(batch.id)
        done = wait_for(client, batch.id, lambda b: b.status in TERMINAL, timeout=120)
        outputs, errors = read_lines(client, done.output_file_id), read_lines(client, done.error_file_id)
    # Then it went through cancelling to cancelled (a repeated cancel answers the same)
    assert cancelling.status in ("cancelling", "cancelled") and again.status in ("cancelling", "cancelled")
    assert done.status == "cancelled" and done.cancelling_at and done.cancelled_at >= done.cancelling_at
    # And the finished lines are in the output file, the cancelled ones in the error file, none twice
    counts = done.request_counts
    assert 8 <= counts.completed < 200 and len(outputs) == counts.completed
    assert all(x["response"]["status_code"] == 200 for x in outputs)
    assert all(x["response"] is None and x["error"]["code"] == "cancelled" for x in errors)
    ids = [x["custom_id"] for x in outputs + errors]
    assert len(ids) == len(set(ids)) and len(errors) == counts.failed
    receiver.wait_for(lambda ds: len(ds) >= 1, timeout=30)
    assert [e["type"] for e in signed_events(receiver, batch.id)] == ["batch.cancelled"]


def test_a_file_with_duplicate_ids_fails_whole_with_per_line_errors(
        batch_gateway: Gateway, new_key: Keys, receiver: Receiver) -> None:
    lines, _ = worksheets(5, seed=11)
    lines[3]["custom_id"] = lines[1]["custom_id"]  # line 4 repeats line 2
    wrong_url = {**lines[4], "custom_id": "wrong-url", "url": "/v1/embeddings"}
    content = jsonl(lines) + b"not json\n" + jsonl([wrong_url])
    with sdk(batch_gateway, new_key()) as client:
        batch = client.batches.create(input_file_id=upload(client, content), endpoint=URL, completion_window="24h",
                                      extra_body={"callback_url": receiver.url})
        failed = wait_for(client, batch.id, lambda b: b.status in TERMINAL, timeout=60)
    # Then the whole file is refused, each problem with its line and code, and nothing was queued
    assert failed.status == "failed" and failed.failed_at and failed.output_file_id is None
    assert [(e.line, e.code) for e in failed.errors.data] == [
        (4, "duplicate_custom_id"), (6, "invalid_json_line"), (7, "invalid_url")], failed.errors
    assert failed.request_counts.completed == 0 and failed.request_counts.failed == 0
    receiver.wait_for(lambda ds: len(ds) >= 1, timeout=30)
    assert [e["type"] for e in signed_events(receiver, batch.id)] == ["batch.failed"]


def test_a_refused_lines_error_is_the_chat_endpoints_param_included(batch_gateway: Gateway, new_key: Keys) -> None:
    # Given lines that ask for what tuwen refuses (audio out), each with the field at fault, and one good line
    lines, _ = worksheets(1, seed=12)
    refused = {"modalities": {"modalities": ["text", "audio"]},
               "audio": {"audio": {"voice": "alloy", "format": "wav"}},
               "message-audio": {"messages": [{"role": "assistant", "audio": {"id": "audio_1"}},
                                              {"role": "user", "content": "图中有什么？"}]}}
    for name, fields in refused.items():
        body = {**lines[0]["body"], **fields}
        lines.append({"custom_id": f"bad-{name}", "method": "POST", "url": URL, "body": body})
    with sdk(batch_gateway, new_key()) as client:
        batch = client.batches.create(input_file_id=upload(client, jsonl(lines)), endpoint=URL,
                                      completion_window="24h")
        done = wait_for(client, batch.id, lambda b: b.status in TERMINAL, timeout=120)
        errors = {x["custom_id"]: x for x in read_lines(client, done.error_file_id)}
    assert done.status == "completed" and done.request_counts.failed == 3, done
    # When the chat endpoint gets the same bodies
    with batch_gateway.client(new_key()) as api:
        answers = {x["custom_id"]: api.post(URL, json=x["body"]) for x in lines[1:]}
    # Then each error line is the chat endpoint's answer: status and whole error body, param included
    for custom_id, answer in answers.items():
        line = errors[custom_id]
        assert line["error"] is None and line["response"]["status_code"] == answer.status_code == 400, line
        assert line["response"]["body"] == answer.json(), (line, answer.json())
    assert {c: errors[c]["response"]["body"]["error"]["param"] for c in answers} == {
        "bad-modalities": "modalities", "bad-audio": "audio", "bad-message-audio": "messages[0].audio"}


def test_another_owner_gets_not_found_for_the_file_the_batch_and_the_content(
        batch_gateway: Gateway, new_key: Keys) -> None:
    lines, examples = worksheets(3, seed=3)
    example = next(iter(examples.values()))
    with sdk(batch_gateway, new_key()) as owner, sdk(batch_gateway, new_key()) as stranger:
        # Given an owner's batch whose last line names a picture the owner stored before, by its key
        stored = owner.chat.completions.with_raw_response.create(
            model="tuwen", messages=[ask(png(example), example.question)], max_tokens=8)
        key = f"tuwen://images/{hashlib.sha256(png(example)).hexdigest()}"
        by_key = line("by-key", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": key}},
                                                               {"type": "text", "text": example.question}]}])
        assert stored.http_response.status_code == 200
        file_id = upload(owner, jsonl([*lines, by_key]))
        batch = owner.batches.create(input_file_id=file_id, endpoint=URL, completion_window="24h")
        done = wait_for(owner, batch.id, lambda b: b.status in TERMINAL)
        assert done.status == "completed" and done.output_file_id and done.request_counts.completed == 4
        answered = {x["custom_id"]: x for x in read_lines(owner, done.output_file_id)}
        assert knows(answered["by-key"]["response"]["body"]["choices"][0]["message"]["content"], example)
        # And another owner's batch naming the same key gets an error line, worded as for a missing picture
        theirs = stranger.batches.create(input_file_id=upload(stranger, jsonl([by_key])), endpoint=URL,
                                         completion_window="24h")
        theirs = wait_for(stranger, theirs.id, lambda b: b.status in TERMINAL)
        [refused_line] = read_lines(stranger, theirs.error_file_id)
        assert refused_line["response"]["body"]["error"]["code"] == "image_not_found"
        # When another owner reaches for them, by id
        attempts: list[Callable[[], object]] = [
            lambda: stranger.files.retrieve(file_id), lambda: stranger.files.content(file_id),
            lambda: stranger.files.content(done.output_file_id), lambda: stranger.files.delete(file_id),
            lambda: stranger.batches.retrieve(batch.id), lambda: stranger.batches.cancel(batch.id),
            lambda: stranger.batches.create(input_file_id=file_id, endpoint=URL, completion_window="24h")]
        for attempt in attempts:
            # Then each is a NotFoundError, worded as for an id that does not exist
            with pytest.raises(openai.NotFoundError) as refused:
                attempt()
            assert refused.value.code in ("unknown_file", "bulk_not_found")
        # (the same body as for ids that never existed, but for the id itself)
        nobody = "file-" + "0" * 24
        assert refusal(lambda: stranger.files.retrieve(file_id)).replace(file_id, "?") == refusal(
            lambda: stranger.files.retrieve(nobody)).replace(nobody, "?")
        assert refusal(lambda: stranger.batches.retrieve(batch.id)).replace(batch.id, "?") == refusal(
            lambda: stranger.batches.retrieve("batch_" + "0" * 32)).replace("batch_" + "0" * 32, "?")
        # And their lists do not show them; the owner's still do
        assert file_id not in [f.id for f in stranger.files.list()]
        assert batch.id not in [b.id for b in stranger.batches.list()]
        assert file_id in [f.id for f in owner.files.list(purpose="batch")]
        assert done.output_file_id in [f.id for f in owner.files.list(purpose="batch_output")]


def refusal(call: Callable[[], object]) -> str:
    """The 404's body, as JSON text."""
    try:
        call()
    except openai.NotFoundError as exc:
        return json.dumps(exc.body, sort_keys=True)
    raise AssertionError("no NotFoundError")


# -- files and refusals ------------------------------------------------------------------------------------
def test_files_upload_list_page_download_and_delete(batch_gateway: Gateway, new_key: Keys,
                                                     pipeline_settings: Settings) -> None:
    small = start_gateway(pipeline_settings, gateway_settings(max_batch_file_bytes=64 * 1024))
    try:
        with sdk(batch_gateway, new_key()) as client, sdk(small, new_key()) as limited:
            # Given files uploaded one after another, one of several parts in storage
            big = b"".join(b'{"custom_id": "%d", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n' % i
                           for i in range(120_000))
            ids = [upload(client, b'{"a": 1}\n', f"f{i}.jsonl") for i in range(3)] + [upload(client, big, "big.jsonl")]
            # Then they page newest first, and read back byte for byte
            first = client.files.list(limit=2)
            assert [f.id for f in first.data] == ids[:1:-1] and first.has_more
            assert [f.id for f in client.files.list(limit=2, after=first.data[-1].id).data] == ids[1::-1]
            assert [f.id for f in client.files.list(order="asc")] == ids
            meta = client.files.retrieve(ids[3])
            assert (meta.bytes, meta.filename, meta.purpose, meta.status) == (len(big), "big.jsonl", "batch",
                                                                             "processed")
            assert hashlib.sha256(client.files.content(ids[3]).content).hexdigest() == hashlib.sha256(big).hexdigest()
            # And a file no batch reads is deleted, then gone
            assert client.files.delete(ids[0]).deleted
            with pytest.raises(openai.NotFoundError):
                client.files.retrieve(ids[0])
            # A file over TUWEN_MAX_BATCH_FILE_BYTES is 413, and nothing of it is kept
            with pytest.raises(openai.APIStatusError) as too_big:
                upload(limited, b"x" * (64 * 1024 + 1))
            assert too_big.value.status_code == 413 and too_big.value.code == "file_too_large"
            assert list(limited.files.list()) == []
            # Another purpose, another endpoint or window: 400 with the parameter named
            with pytest.raises(openai.BadRequestError) as purpose:
                client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
            assert purpose.value.code == "unsupported_purpose" and purpose.value.param == "purpose"
            for params, code in (({"endpoint": "/v1/embeddings"}, "invalid_endpoint"),
                                 ({"completion_window": "1h"}, "invalid_completion_window")):
                with pytest.raises(openai.BadRequestError) as refused:
                    client.batches.create(**{"input_file_id": ids[1], "endpoint": URL, "completion_window": "24h",
                                             **params})
                assert refused.value.code == code
    finally:
        small.stop()


def test_an_expired_batch_keeps_what_finished_and_says_so(
        parked_gateway: Gateway, parked_settings: Settings, new_key: Keys, receiver: Receiver) -> None:
    lines, _ = worksheets(5, seed=8)
    with sdk(parked_gateway, new_key()) as client:
        # Given a batch whose lines wait in a queue no worker reads, while its input file is being read
        file_id = upload(client, jsonl(lines))
        batch = client.batches.create(input_file_id=file_id, endpoint=URL, completion_window="24h",
                                      extra_body={"callback_url": receiver.url})
        running = wait_for(client, batch.id, lambda b: b.status == "in_progress" and b.request_counts.total == 5,
                           timeout=60)
        assert running.status == "in_progress"
        # When its completion window has passed (moved, not waited for)
        redis = connect(parked_settings.redis_url)
        redis.hset(BULK_PREFIX + batch.id, "expires_at", repr(time.time() - 1))
        redis.close()
        expired = wait_for(client, batch.id, lambda b: b.status in TERMINAL, timeout=60)
        errors = read_lines(client, expired.error_file_id)
        # And the input file, no longer read, can be deleted
        assert client.files.delete(file_id).deleted
    # Then it expired, each unanswered line in the error file with the batch's own error
    assert expired.status == "expired" and expired.expired_at and expired.output_file_id is None
    assert sorted(x["custom_id"] for x in errors) == sorted(x["custom_id"] for x in lines)
    assert all(x["response"] is None and x["error"]["code"] == "bulk_expired" for x in errors)
    receiver.wait_for(lambda ds: len(ds) >= 1, timeout=30)
    assert [e["type"] for e in signed_events(receiver, batch.id)] == ["batch.expired"]


# -- fairness -----------------------------------------------------------------------------------------------
@pytest.mark.xdist_group(TIMING)
def test_interactive_chat_stays_fast_during_a_300_line_http_batch(
        batch_gateway: Gateway, pipeline_settings: Settings, new_key: Keys) -> None:
    lines, _ = worksheets(300, seed=31_337, prefix="fair")
    questions = [(png(ex), ex.question) for ex in worksheets(60, seed=4_711, prefix="i")[1].values()]
    with sdk(batch_gateway, new_key()) as client:
        # Given a 300-line batch running over HTTP
        batch = client.batches.create(input_file_id=upload(client, jsonl(lines)), endpoint=URL,
                                      completion_window="24h")
        wait_for(client, batch.id, lambda b: b.status != "validating", timeout=60)
        # When interactive users (three, one request after another each) ask through the chat API meanwhile
        latencies: list[float] = []
        backlog: list[int] = []
        lock = threading.Lock()
        pending = iter(questions)

        def user() -> None:
            with sdk(batch_gateway, new_key()) as mine:
                while True:
                    with lock:
                        current = client.batches.retrieve(batch.id)
                        nxt = next(pending, None)
                    if current.status in TERMINAL or nxt is None:
                        return
                    counts = current.request_counts
                    t0 = time.monotonic()
                    answer = mine.chat.completions.create(model="tuwen", messages=[ask(*nxt)], max_tokens=48)
                    with lock:
                        assert answer.choices[0].message.content
                        latencies.append(time.monotonic() - t0)
                        backlog.append(counts.total - counts.completed - counts.failed)

        users = [threading.Thread(target=user) for _ in range(3)]
        for t in users:
            t.start()
        for t in users:
            t.join(300)
        done = wait_for(client, batch.id, lambda b: b.status in TERMINAL)
        outputs = read_lines(client, done.output_file_id)
    assert done.status == "completed" and done.request_counts.completed == 300
    # A batch time: how long the worker takes for one full batch (max_batch_size) at its rate on the batch
    reader = Client(pipeline_settings)
    try:
        jobs = reader.jobs.get_many([x["response"]["request_id"] for x in outputs]).values()
    finally:
        reader.close()
    first = min(j.started_at or 0.0 for j in jobs)
    last = max(j.finished_at or 0.0 for j in jobs)
    rate = 300 / (last - first)
    batch_time = pipeline_settings.max_batch_size / rate
    p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
    print(f"\nHTTP batch fairness: 300 lines in {last - first:.1f}s ({rate:.1f} lines/s; one batch time = "
          f"{batch_time:.2f}s). {len(latencies)} interactive chat completions meanwhile: p50 {p50:.2f}s, p95 "
          f"{p95:.2f}s = {p50 / batch_time:.1f} / {p95 / batch_time:.1f} batch times; median backlog "
          f"{statistics.median(backlog):.0f} lines (~{statistics.median(backlog) / rate:.0f}s behind it)")
    # Then they did not queue behind the batch: within about two batch times, not behind the backlog
    assert len(latencies) >= 10 and statistics.median(backlog) >= 50
    assert p50 <= 2.5 * batch_time
    assert p95 <= 4 * batch_time
