"""What the gateway promises (issue 17): one 404 for "no such job" and "not yours", the SSRF guard on
IPv4 hidden in IPv6, a 4xx for every bad input, GET and webhook showing the same job, DELETE's answers,
free polls, metrics per route, and workers that are not invisible."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tuwen.pipeline.client import Client
from tuwen.pipeline.jobs import PREFIX
from tuwen.pipeline.schema import PRIVATE_FIELDS, JobResult, JobView
from tuwen.pipeline.registry import no_worker
from tuwen.pipeline.settings import Settings
from tuwen.pipeline.gateway.ssrf import address_allowed
from tuwen.pipeline.gateway.webhooks import check_callback_url
from tests.gateway.conftest import UPLOAD_LIMIT, Gateway, Receiver, gateway_settings, start_gateway
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

Keys = Callable[..., str]


def png() -> bytes:
    return load_samples()[0].path.read_bytes()


def submit(api: httpx.Client, question: str = "图中有几个圆形？", **fields: object) -> httpx.Response:
    data = {"question": question, **{k: str(v) for k, v in fields.items()}}
    return api.post("/v1/jobs", files={"image": ("picture.png", png(), "image/png")}, data=data)


def raw_multipart(api: httpx.Client, parts: list[tuple[bytes, bytes, bytes | None]]) -> httpx.Response:
    """POST parts given as (name bytes, value, filename or None), names sent exactly as given."""
    body = b""
    for name, value, filename in parts:
        disposition = b'form-data; name="' + name + b'"' + (b'; filename="' + filename + b'"' if filename else b"")
        body += b"--tuwenb\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + value + b"\r\n"
    body += b"--tuwenb--\r\n"
    return api.post("/v1/jobs", content=body, headers={"Content-Type": "multipart/form-data; boundary=tuwenb"})


# -- item 3: existence does not leak ------------------------------------------------------------------------
def test_another_owners_job_and_no_job_get_the_same_404_byte_for_byte(
        parked_gateway: Gateway, parked_settings: Settings, new_key: Keys) -> None:
    with parked_gateway.client(new_key()) as owner, parked_gateway.client(new_key()) as stranger:
        # Given a job of one owner, read and cancelled by another
        job = submit(owner).json()["id"]
        theirs = [stranger.get(f"/v1/jobs/{job}"), stranger.get(f"/v1/jobs/{job}", params={"wait": 1}),
                  stranger.delete(f"/v1/jobs/{job}")]
        # When the job is gone, and the same requests are made again
        client = Client(parked_settings)
        assert client.delete(job)
        client.close()
        gone = [stranger.get(f"/v1/jobs/{job}"), stranger.get(f"/v1/jobs/{job}", params={"wait": 1}),
                stranger.delete(f"/v1/jobs/{job}")]
    # Then each pair of answers is identical: status, content type and body, byte for byte
    for a, b in zip(theirs, gone):
        assert (a.status_code, a.headers["content-type"], a.content) == (b.status_code, b.headers["content-type"],
                                                                         b.content)
        assert a.status_code == 404 and a.json()["error"]["code"] == "not_found"


# -- item 4: the SSRF guard sees IPv4 inside IPv6 -------------------------------------------------------------
EMBEDDED_LOOPBACK = ["[::127.0.0.1]", "[64:ff9b::127.0.0.1]", "[2002:7f00:1::]", "[::ffff:0:127.0.0.1]",
                     "[::ffff:127.0.0.1]", "[64:ff9b::a9fe:a9fe]", "[2002:a00:1::1]", "[::ffff:0:10.0.0.1]",
                     "[64:ff9b:1::a00:1]", "[2001:0:4136:e378:8000:63bf:3fff:fdd2]", "[::0.0.0.1]", "192.88.99.1"]


def test_callbacks_to_ipv4_hidden_in_ipv6_are_refused(parked_settings: Settings, new_key: Keys) -> None:
    strict = gateway_settings(webhook_allowed_hosts=["*"], webhook_allow_private=False)
    # Every IPv4-embedding form of loopback, private or link-local, and the 6to4 relay range: refused
    for host in EMBEDDED_LOOPBACK:
        with pytest.raises(Exception) as refused:
            check_callback_url(f"http://{host}:8080/hook", strict)
        assert getattr(refused.value, "code") == "callback_not_allowed", host
    # The same forms around a public address stay allowed (IPv6-only networks reach IPv4 through NAT64)
    for address in ("::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2002:808:808::1", "8.8.8.8", "2606:4700::1111"):
        assert address_allowed(address, allow_private=False), address
    # Through the API of a gateway with that policy: 422 with the code
    guarded = start_gateway(parked_settings, strict)
    try:
        with guarded.client(new_key()) as api:
            answers = [submit(api, callback_url=f"http://{host}:9/hook") for host in EMBEDDED_LOOPBACK[:4]]
    finally:
        guarded.stop()
    assert [(r.status_code, r.json()["error"]["code"]) for r in answers] == [(422, "callback_not_allowed")] * 4


def test_allowing_private_callbacks_still_refuses_unspecified_addresses() -> None:
    assert address_allowed("::ffff:0:127.0.0.1", allow_private=True)
    assert not address_allowed("::ffff:0:0.0.0.0", allow_private=True)


# -- item 6 and input semantics: every bad input a 4xx, browser input accepted ----------------------------------
def test_bad_multipart_field_names_and_shapes_get_4xx(parked_gateway: Gateway, parked_settings: Settings,
                                                      new_key: Keys) -> None:
    client = Client(parked_settings)
    before = set(client.jobs.redis.scan_iter(PREFIX + "*"))
    image = (b"image", png(), b"a.png")
    question = (b"question", "图中有几个圆形？".encode(), None)
    with parked_gateway.client(new_key()) as api:
        # A field name that is not UTF-8 (the message quoted it as a lone surrogate: 500)
        bad_name = raw_multipart(api, [image, question, (b"\xff\xfename", b"1", None)])
        # Two pictures, a question sent twice
        two_images = raw_multipart(api, [image, image, question])
        two_questions = raw_multipart(api, [image, question, question])
    assert bad_name.status_code == 422 and bad_name.json()["error"]["code"] == "invalid_params", bad_name.text
    assert "\\xff\\xfename" in bad_name.json()["error"]["message"]
    assert two_images.status_code == 422 and two_images.json()["error"]["code"] == "invalid_params"
    assert "image" in two_images.json()["error"]["message"]
    assert two_questions.status_code == 422 and two_questions.json()["error"]["code"] == "invalid_params"
    assert set(client.jobs.redis.scan_iter(PREFIX + "*")) == before
    client.close()


def test_invisible_questions_are_empty_and_crlf_is_accepted(parked_gateway: Gateway, parked_settings: Settings,
                                                            new_key: Keys) -> None:
    client = Client(parked_settings)
    with parked_gateway.client(new_key()) as api:
        invisible = [submit(api, q) for q in ("\u200b\u200c\u200d", "\ufeff", " \u2060\ufeff\u200b\n")]
        crlf = submit(api, "图中有几个圆形？\r\n请数一数。\r\n")
    assert [(r.status_code, r.json()["error"]["code"]) for r in invisible] == [(422, "empty_question")] * 3
    assert crlf.status_code == 202, crlf.text
    request = client.jobs.request(crlf.json()["id"])
    assert request is not None and request.question == "图中有几个圆形？\n请数一数。"
    client.close()


# -- metrics --------------------------------------------------------------------------------------------------
def test_metrics_label_submits_with_their_route(parked_gateway: Gateway, new_key: Keys) -> None:
    def posts(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("tuwen_gateway_requests_total{")
                and 'method="POST"' in line]

    def unmatched(text: str) -> float:  # other tests of the session post to made-up paths too
        return sum(float(line.rsplit(" ", 1)[1]) for line in posts(text) if 'route="unmatched"' in line)

    with parked_gateway.client(new_key()) as api:
        before = api.get("/metrics").text
        assert submit(api).status_code == 202
        assert submit(api, "").status_code == 422
        too_big = api.post("/v1/jobs", files={"image": ("a.png", b"\0" * (UPLOAD_LIMIT + 1), "image/png")},
                           data={"question": "图中有几个圆形？"})
        assert too_big.status_code == 413  # answered before routing, from the declared length
        text = api.get("/metrics").text
    submits = posts(text)
    assert any('route="/v1/jobs"' in line and 'status="202"' in line for line in submits), submits
    assert any('route="/v1/jobs"' in line and 'status="422"' in line for line in submits), submits
    assert any('route="/v1/jobs"' in line and 'status="413"' in line for line in submits), submits
    assert unmatched(text) == unmatched(before), submits


# -- contract -------------------------------------------------------------------------------------------------
def test_get_shows_the_same_job_fields_as_the_webhook_and_delete_answers(
        worker: WorkerProcess, gateway: Gateway, new_key: Keys, receiver: Receiver) -> None:
    s = load_samples()[2]
    with gateway.client(new_key()) as api:
        # Given a job that succeeded and whose webhook was delivered
        job = api.post("/v1/jobs", files={"image": ("p.png", s.path.read_bytes(), "image/png")},
                       data={"question": s.question, "callback_url": receiver.url}).json()["id"]
        [delivery] = receiver.wait_for(lambda d: len(d) >= 1, timeout=90)
        shown = api.get(f"/v1/jobs/{job}").json()
        # Then GET shows exactly the webhook's fields and values, plus the delivery state
        assert shown.pop("webhook")["url"] == receiver.url
        assert shown == delivery.json()
        assert {"cached", "cancel_requested", "answer", "timings"} <= set(shown)
        # And cancelling it now is a conflict, said the same each time
        late = [api.delete(f"/v1/jobs/{job}") for _ in range(2)]
    assert [r.status_code for r in late] == [409, 409] and late[0].content == late[1].content
    assert late[0].json()["error"]["code"] == "already_finished"
    # And the documented job shape has every field the owner may see, and none of the private ones
    documented = set(JobView.model_json_schema()["properties"])
    assert documented == set(JobResult.model_fields) - set(PRIVATE_FIELDS) | {"webhook", "warning"}
    assert not set(PRIVATE_FIELDS) & set(JobView(id="x", status="queued", owner="o", image_key="k",
                                                 worker="w").model_dump())


def test_cancel_is_200_and_stays_200_when_repeated(parked_gateway: Gateway, new_key: Keys) -> None:
    with parked_gateway.client(new_key()) as api:
        job = submit(api).json()["id"]
        first, again = api.delete(f"/v1/jobs/{job}"), api.delete(f"/v1/jobs/{job}")
    assert (first.status_code, again.status_code) == (200, 200)
    assert first.json() == again.json() and again.json()["status"] == "cancelled"


def test_polls_of_ones_own_jobs_are_not_rate_limited(parked_gateway: Gateway, new_key: Keys) -> None:
    with parked_gateway.client(new_key(rate_limit=2)) as api:
        # Given a key that used its whole budget on two submits
        jobs = [submit(api) for _ in range(3)]
        assert [r.status_code for r in jobs] == [202, 202, 429]
        job = jobs[0].json()["id"]
        # When it keeps polling and long-polling its job, then every poll is answered
        polls = [api.get(f"/v1/jobs/{job}").status_code for _ in range(20)]
        polls.append(api.get(f"/v1/jobs/{job}", params={"wait": 0.5}).status_code)
        assert polls == [200] * 21
        # While guessing ids stays limited, and so do cancels
        assert api.get("/v1/jobs/" + "5" * 32).status_code == 429
        assert api.delete(f"/v1/jobs/{job}").status_code == 429


# -- no worker is invisible -----------------------------------------------------------------------------------
def test_health_counts_workers_and_readiness_needs_one(worker: WorkerProcess, gateway: Gateway,
                                                       parked_gateway: Gateway, new_key: Keys) -> None:
    served = gateway.settings.interactive_queue
    parked = parked_gateway.settings.interactive_queue
    with gateway.client() as api:
        health, ready = api.get("/healthz"), api.get("/readyz")
    assert health.status_code == 200 and health.json()["workers"][served] >= 1
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    with parked_gateway.client() as api:
        health, ready = api.get("/healthz"), api.get("/readyz")
    assert health.status_code == 200 and health.json()["workers"][parked] == 0
    assert ready.status_code == 503 and ready.json()["reason"] == no_worker(parked)
    assert int(ready.headers["Retry-After"]) > 0
    # A long-poll that times out with nobody to answer says why
    with parked_gateway.client(new_key()) as api:
        job = submit(api).json()["id"]
        polled = api.get(f"/v1/jobs/{job}", params={"wait": 0.5}).json()
        plain = api.get(f"/v1/jobs/{job}").json()
    assert polled["status"] == "queued" and polled["warning"] == no_worker(parked)
    assert "warning" not in plain


def test_a_job_on_a_served_queue_has_no_warning(worker: WorkerProcess, gateway: Gateway, new_key: Keys) -> None:
    with gateway.client(new_key()) as api:
        job = submit(api).json()["id"]
        done = api.get(f"/v1/jobs/{job}", params={"wait": 60}).json()
    assert done["status"] == "succeeded" and "warning" not in done


def test_unreachable_redis_shows_in_readiness(pipeline_settings: Settings) -> None:
    dead = pipeline_settings.model_copy(update={"redis_url": "redis://127.0.0.1:9/0"})
    server = start_gateway(dead, gateway_settings(webhook_secret=None))
    try:
        with server.client(timeout=60) as api:
            ready = api.get("/readyz")
    finally:
        server.stop()
    assert ready.status_code == 503 and "redis is unreachable" in ready.json()["reason"]
