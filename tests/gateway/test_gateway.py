"""The HTTP gateway end to end: a real uvicorn server, a real worker, real Redis and S3."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
import secrets
import socket
import struct
import subprocess
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from tuwen.pipeline.gateway.apikeys import KeyStore
from tuwen.pipeline.client import Client
from tuwen.pipeline.jobs import PREFIX
from tuwen.pipeline.keys import API_KEY
from tuwen.pipeline.settings import Settings
from tuwen.pipeline.gateway.webhooks import Dispatcher, WebhookStore, check_callback_url, sign, verify
from tests.gateway.conftest import REPO, SECRET, UPLOAD_LIMIT, Gateway, Receiver, gateway_settings, start_gateway
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

Keys = Callable[..., str]


def submit(api: httpx.Client, image: bytes, question: str, *, name: str = "picture.png",
           headers: dict[str, str] | None = None, **fields: object) -> httpx.Response:
    data = {"question": question, **{k: str(v) for k, v in fields.items()}}
    return api.post("/v1/jobs", files={"image": (name, image, "image/png")}, data=data, headers=headers)


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that only *declares* ``width``×``height`` (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def verify_like_a_receiver(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The verification snippet from docs/gateway.md, written out independently of tuwen.pipeline.gateway.webhooks."""
    timestamp, signature = headers["X-Tuwen-Timestamp"], headers["X-Tuwen-Signature"]
    expected = "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature) and abs(time.time() - int(timestamp)) < 300


# -- the happy path ---------------------------------------------------------------------------------------
def test_upload_then_long_poll_gives_the_answer(worker: WorkerProcess, gateway: Gateway, new_key: Keys) -> None:
    samples = load_samples()[:4]
    with gateway.client(new_key()) as api:
        # Given pictures uploaded with their questions
        accepted = [submit(api, s.path.read_bytes(), s.question) for s in samples]
        assert [r.status_code for r in accepted] == [202] * len(samples), [r.text for r in accepted]
        assert all(r.json()["status"] == "queued" and r.headers["Location"] == f"/v1/jobs/{r.json()['id']}"
                   for r in accepted)
        # When the backend long-polls each job
        done = [api.get(f"/v1/jobs/{r.json()['id']}", params={"wait": 60}).json() for r in accepted]
    # Then each answer carries the picture's facts, in readable Chinese
    assert [d["status"] for d in done] == ["succeeded"] * len(samples), done
    right = sum(all(f in d["answer"] for f in s.facts) for s, d in zip(samples, done))
    assert right >= len(samples) - 1, [(s.question, s.facts, d["answer"]) for s, d in zip(samples, done)]
    assert all(d["timings"]["total_ms"] > 0 and "owner" not in d and "image_key" not in d for d in done)


def test_the_documented_curl_runs_as_written(worker: WorkerProcess, gateway: Gateway, new_key: Keys) -> None:
    """docs/gateway.md's curl block, run by bash from the repository's folder (a bundled picture), with the
    address and key of this gateway: the long-poll prints the answer with the picture's fact."""
    doc = (REPO / "docs" / "gateway.md").read_text(encoding="utf-8")
    block = re.search(r"## curl\n\n```bash\n(.*?)```", doc, re.S)
    assert block is not None
    script = block.group(1).replace("http://localhost:8000", gateway.url).replace("sk-tw-3f9c…", new_key())
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=90)
    assert out.returncode == 0, out.stderr
    answered, _ = json.JSONDecoder().raw_decode(out.stdout)  # then the cancel's answer (the job had ended)
    assert answered["status"] == "succeeded" and "4个" in answered["answer"], out.stdout


def test_webhook_is_delivered_signed_and_shown_on_the_job(worker: WorkerProcess, gateway: Gateway,
                                                          new_key: Keys, receiver: Receiver) -> None:
    s = load_samples()[1]
    with gateway.client(new_key()) as api:
        # Given a job submitted with a callback URL on a local receiver
        job = submit(api, s.path.read_bytes(), s.question, callback_url=receiver.url).json()
        # When it ends
        [delivery] = receiver.wait_for(lambda d: len(d) >= 1, timeout=90)
        # Then the receiver got the result, signed with the shared secret
        assert verify_like_a_receiver(SECRET, delivery.headers, delivery.body)
        assert verify(SECRET, delivery.body, delivery.headers["X-Tuwen-Timestamp"],
                      delivery.headers["X-Tuwen-Signature"])
        assert not verify("another-secret", delivery.body, delivery.headers["X-Tuwen-Timestamp"],
                          delivery.headers["X-Tuwen-Signature"])
        body = delivery.json()
        assert body["id"] == job["id"] and body["status"] == "succeeded" and body["answer"]
        assert "\\u" not in delivery.body.decode("utf-8")
        assert delivery.headers["X-Tuwen-Job-Id"] == job["id"]
        # And the job shows the delivery
        deadline = time.monotonic() + 10
        while (hook := api.get(f"/v1/jobs/{job['id']}").json()["webhook"])["state"] != "delivered":
            assert time.monotonic() < deadline, hook
            time.sleep(0.1)
        assert hook["attempts"] == 1 and hook["last_status"] == 204 and hook["url"] == receiver.url
        assert api.get(f"/v1/jobs/{job['id']}").json()["answer"] == body["answer"]


class Arrivals(list):  # type: ignore[type-arg]
    """A receiver's delivery list that also notes when each delivery arrived (monotonic seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.at: list[float] = []

    def append(self, item: object) -> None:
        self.at.append(time.monotonic())
        super().append(item)


def test_webhook_retries_with_backoff_until_the_receiver_answers(parked_gateway: Gateway, new_key: Keys,
                                                                 receiver: Receiver) -> None:
    receiver.fail_first = 2
    receiver.deliveries = arrivals = Arrivals()
    base = parked_gateway.gw.webhook_backoff_s
    png = load_samples()[0].path.read_bytes()
    with parked_gateway.client(new_key()) as api:
        # Given a receiver that fails twice, and a job with a callback (by name) that is then cancelled
        by_name = receiver.url.replace("127.0.0.1", "localhost")
        job = submit(api, png, "图中有几个圆形？", callback_url=by_name).json()
        assert api.get(f"/v1/jobs/{job['id']}").json()["webhook"]["state"] == "pending"
        assert api.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
        # When the deliveries come in
        deliveries = receiver.wait_for(lambda d: len(d) >= 3, timeout=30)
        # Then the third attempt succeeded, each one signed and numbered
        assert [d.headers["X-Tuwen-Delivery-Attempt"] for d in deliveries] == ["1", "2", "3"]
        assert all(verify_like_a_receiver(SECRET, d.headers, d.body) for d in deliveries)
        assert deliveries[0].json()["status"] == "cancelled"
        assert deliveries[0].headers["Host"] == urlsplit(by_name).netloc  # sent to the checked IP, Host kept
        # And spaced by a growing backoff: at least the base after the first failure, at least twice the
        # base after the second (a fixed or missing backoff fails the second bound)
        gaps = [b - a for a, b in zip(arrivals.at, arrivals.at[1:])]
        assert gaps[0] >= base and gaps[1] >= 2 * base, (base, gaps)
        assert gaps[1] < 2 * base + parked_gateway.gw.webhook_sweep_s + 5, gaps  # and retried when due
        deadline = time.monotonic() + 10
        while (hook := api.get(f"/v1/jobs/{job['id']}").json()["webhook"])["state"] != "delivered":
            assert time.monotonic() < deadline, hook
            time.sleep(0.1)
        assert hook["attempts"] == 3


def test_delivery_state_machine_sweep_refuse_and_give_up(parked_settings: Settings, receiver: Receiver) -> None:
    """The dispatcher without its threads: a job that ended unheard is found by the sweep; a host that
    became disallowed is refused at delivery time; a receiver that keeps failing is given up on."""
    # A Redis database of its own, so the running gateways' dispatchers do not deliver these first
    client = Client(parked_settings.model_copy(update={"redis_url": parked_settings.redis_url.rsplit("/", 1)[0]
                                                       + "/7"}))
    hooks = WebhookStore(client.jobs.redis, parked_settings.result_ttl_s)
    png = load_samples()[0].path.read_bytes()

    def ended_job(url: str) -> str:
        request = client.prepare(png, "图中有几个圆形？", owner="dispatcher-test")
        hooks.register(request.id, url)
        client.enqueue(request)
        client.cancel(request.id)
        return request.id

    once = gateway_settings(webhook_max_attempts=1)
    dispatcher = Dispatcher(once, client.jobs, hooks)
    try:
        heard_nothing = ended_job(receiver.url)
        dispatcher.sweep()
        assert heard_nothing in hooks.due(time.time() + 1)
        assert dispatcher.deliver(heard_nothing) == "delivered" and len(receiver.deliveries) == 1
        refused = ended_job(receiver.url)
        strict = Dispatcher(gateway_settings(webhook_allow_private=False), client.jobs, hooks)
        assert strict.deliver(refused) == "refused" and len(receiver.deliveries) == 1
        assert hooks.state(refused).last_error.startswith("callback_not_allowed")  # type: ignore[union-attr]
        strict.stop()
        receiver.fail_first = 2
        given_up = ended_job(receiver.url)
        assert dispatcher.deliver(given_up) == "failed"
        assert hooks.state(given_up).last_status == 500  # type: ignore[union-attr]
        assert given_up not in hooks.due(time.time() + 3600)
    finally:
        dispatcher.stop()
        client.close()


def test_callback_urls_are_checked_against_the_allow_list_and_private_addresses(
        parked_gateway: Gateway, new_key: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    strict = gateway_settings(webhook_allowed_hosts=["hooks.example.com", "*.tuwen.test", "127.0.0.1",
                                                     "localhost", "169.254.169.254", "10.0.0.7", "[::1]", "::1"],
                              webhook_allow_private=False)

    def code(url: str) -> str:
        with pytest.raises(Exception) as info:
            check_callback_url(url, strict)
        return str(getattr(info.value, "code"))

    # Loopback, private, link-local (cloud metadata) and mapped addresses are refused, names resolved first
    assert code("http://127.0.0.1:9/hook") == "callback_not_allowed"
    assert code("http://localhost/hook") == "callback_not_allowed"
    assert code("http://169.254.169.254/latest/meta-data") == "callback_not_allowed"
    assert code("http://10.0.0.7/") == "callback_not_allowed"
    assert code("http://[::1]/") == "callback_not_allowed"
    # Hosts outside the allow-list are refused before any lookup; so are other schemes and credentials
    assert code("https://evil.example.org/") == "callback_not_allowed"
    assert code("https://tuwen.test.evil.org/") == "callback_not_allowed"
    assert code("ftp://hooks.example.com/") == "invalid_callback_url"
    assert code("http://user:pw@hooks.example.com/") == "invalid_callback_url"
    assert code("not a url") == "invalid_callback_url"
    # Every address of a name is checked; a public one is pinned: the attempt goes to the checked IP,
    # while Host and TLS SNI keep the name (so a DNS answer that changes later cannot redirect it)
    answers = {"api.tuwen.test": ["93.184.215.14"], "mixed.tuwen.test": ["93.184.215.14", "192.168.1.5"]}
    real_lookup = socket.getaddrinfo

    def fake_lookup(host: str, port: object, *args: object, **kw: object) -> list[tuple[object, ...]]:
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers[host]]
        return real_lookup(host, port, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", fake_lookup)
    target = check_callback_url("https://api.tuwen.test:8443/cb?x=1", strict)
    assert target.url == "https://93.184.215.14:8443/cb?x=1"
    assert target.host_header == "api.tuwen.test:8443" and target.sni_hostname == "api.tuwen.test"
    assert code("https://mixed.tuwen.test/cb") == "callback_not_allowed"
    monkeypatch.undo()
    with pytest.raises(Exception) as off:
        check_callback_url("https://hooks.example.com/", strict.model_copy(update={"webhook_secret": None}))
    assert getattr(off.value, "code") == "webhooks_disabled"
    # Through the API: a 422 with the code, nothing queued
    with parked_gateway.client(new_key()) as api:
        refused = submit(api, load_samples()[0].path.read_bytes(), "图中有什么？",
                         callback_url="http://metadata.google.internal/computeMetadata/v1/")
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "callback_not_allowed"


def test_signature_helpers_refuse_old_timestamps() -> None:
    body = json.dumps({"id": "x", "answer": "图中有3个圆形。"}, ensure_ascii=False).encode()
    sig = sign("s3cret", 1_700_000_000, body)
    assert verify("s3cret", body, "1700000000", sig, now=1_700_000_100)
    assert not verify("s3cret", body, "1700000000", sig, now=1_700_001_000)
    assert not verify("s3cret", body + b" ", "1700000000", sig, now=1_700_000_100)
    assert not verify("s3cret", body, "not-a-number", sig)


# -- idempotency, cancel, owners, auth, limits ------------------------------------------------------------
def test_idempotency_key_returns_the_same_job(parked_gateway: Gateway, new_key: Keys) -> None:
    png = load_samples()[0].path.read_bytes()
    token = new_key()
    with parked_gateway.client(token) as api, parked_gateway.client(new_key()) as other:
        first = submit(api, png, "图中有几个圆形？", headers={"Idempotency-Key": "order-42"})
        again = submit(api, png, "图中有几个圆形？", headers={"Idempotency-Key": "order-42"})
        assert first.status_code == again.status_code == 202
        assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
        # The key is scoped per owner, and reusing it for a different request is refused
        theirs = submit(other, png, "图中有几个圆形？", headers={"Idempotency-Key": "order-42"})
        assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]
        changed = submit(api, png, "图中有几个三角形？", headers={"Idempotency-Key": "order-42"})
        assert changed.status_code == 422 and changed.json()["error"]["code"] == "idempotency_key_reused"
        # A refused request does not burn its key
        bad = submit(api, b"", "图中有几个圆形？", headers={"Idempotency-Key": "order-43"})
        good = submit(api, png, "图中有几个圆形？", headers={"Idempotency-Key": "order-43"})
        assert (bad.status_code, good.status_code) == (422, 202)


def test_cancel_before_the_worker_starts_it(parked_gateway: Gateway, parked_settings: Settings,
                                            new_key: Keys) -> None:
    png = load_samples()[0].path.read_bytes()
    with parked_gateway.client(new_key()) as api:
        # Given a job queued where no worker reads yet
        job = submit(api, png, "图中是什么颜色？").json()
        assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
        started = time.monotonic()
        assert api.get(f"/v1/jobs/{job['id']}", params={"wait": 600}).json()["status"] == "queued"
        assert time.monotonic() - started < parked_gateway.gw.gateway_max_wait_s + 2  # the long-poll is capped
        # When it is cancelled
        cancelled = api.delete(f"/v1/jobs/{job['id']}")
        # Then it says so, stays so, and a worker would skip it (its record is terminal)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["error"]["code"] == "cancelled"
        assert api.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
        assert api.get(f"/v1/jobs/{job['id']}", params={"wait": 1}).json()["status"] == "cancelled"
    client = Client(parked_settings)
    assert client.jobs.claim([job["id"]], "probe@tests")[job["id"]][0] == "cancelled"
    client.close()


def test_long_polls_do_not_tie_up_the_server(parked_gateway: Gateway, new_key: Keys) -> None:
    token = new_key()
    with parked_gateway.client(token) as api:
        job = submit(api, load_samples()[0].path.read_bytes(), "图中有几个圆形？").json()
    waiters = parked_gateway.server.config.app.state.gateway.waiters  # the app's long-poll parking lot
    wait_s = parked_gateway.gw.gateway_max_wait_s
    # Given more long-polls than the server has worker threads (anyio's default is 40)
    polls: list[tuple[int, float]] = []

    def poll() -> None:
        with parked_gateway.client(token) as api:
            started = time.monotonic()
            status = api.get(f"/v1/jobs/{job['id']}", params={"wait": wait_s}).status_code
            polls.append((status, time.monotonic() - started))

    threads = [threading.Thread(target=poll) for _ in range(60)]
    for t in threads:
        t.start()
    # When more than 40 of them are parked at once (waiting on the job, holding no thread)
    parked, deadline = 0, time.monotonic() + wait_s
    while parked <= 40:
        assert time.monotonic() < deadline, f"at most {parked} long-polls were ever parked at once"
        parked = max(parked, len(waiters._parked.get(job["id"], ())))
        time.sleep(0.005)
    # Then other requests are still answered at once
    with parked_gateway.client(token) as api:
        started = time.monotonic()
        assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
        assert time.monotonic() - started < 1.0
    for t in threads:
        t.join(30)
    # And every long-poll waited out its full time (it was parked, not answered at once) and got its 200
    assert [status for status, _ in polls] == [200] * 60
    assert min(took for _, took in polls) >= wait_s, sorted(took for _, took in polls)[:5]


def test_other_owners_get_404_and_bad_keys_401(parked_gateway: Gateway, new_key: Keys, keys: KeyStore) -> None:
    png = load_samples()[0].path.read_bytes()
    owner_token, other_token = new_key(), new_key()
    with parked_gateway.client(owner_token) as api:
        job = submit(api, png, "图中有几个圆形？").json()
    with parked_gateway.client(other_token) as other:
        for response in (other.get(f"/v1/jobs/{job['id']}"), other.delete(f"/v1/jobs/{job['id']}")):
            assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
        assert other.get("/v1/jobs/" + "0" * 32).status_code == 404
    with parked_gateway.client() as anonymous:
        missing = anonymous.get(f"/v1/jobs/{job['id']}")
        wrong = anonymous.get(f"/v1/jobs/{job['id']}", headers={"Authorization": owner_token[:-4] + "AAAA"})
        forged = anonymous.get(f"/v1/jobs/{job['id']}", headers={"Authorization": "Bearer " + owner_token[:-4]
                                                                  + "AAAA"})
        basic = anonymous.get(f"/v1/jobs/{job['id']}", headers={"Authorization": "Basic dXNlcjpwdw=="})
        upload = submit(anonymous, png, "图中有几个圆形？")
    assert {r.status_code for r in (missing, wrong, forged, basic, upload)} == {401}
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert forged.json()["error"]["code"] == "invalid_api_key"
    # A revoked key stops working at once; tokens are stored only as hashes
    key_id = owner_token.removeprefix("sk-tw-")[:12]
    keys.revoke(key_id)
    with parked_gateway.client(owner_token) as api:
        assert api.get(f"/v1/jobs/{job['id']}").status_code == 401
    stored = keys.redis.hgetall(f"tuwen:apikey:id:{key_id}")
    assert owner_token not in json.dumps(stored) and stored["hash"] == hashlib.sha256(owner_token.encode()).hexdigest()


def test_rate_limit_answers_429_with_retry_after(parked_gateway: Gateway, new_key: Keys) -> None:
    with parked_gateway.client(new_key(rate_limit=3)) as api:
        codes = [api.get("/v1/jobs/" + "1" * 32).status_code for _ in range(5)]
        limited = api.get("/v1/jobs/" + "1" * 32)
    assert codes[:3] == [404] * 3 and codes[3:] == [429, 429], codes
    assert limited.json()["error"]["code"] == "rate_limited" and 1 <= int(limited.headers["Retry-After"]) <= 60


def test_oversized_uploads_get_413_while_streaming(parked_gateway: Gateway, new_key: Keys) -> None:
    token = new_key()
    too_big = b"\x89PNG\r\n\x1a\n" + b"\0" * (UPLOAD_LIMIT + 100_000)
    with parked_gateway.client(token) as api:
        # A declared Content-Length over the limit: refused before the body is read
        declared = submit(api, too_big, "图中有几个圆形？")
        assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

        # A chunked body (no length) is counted as it arrives
        def chunks():  # type: ignore[no-untyped-def]
            boundary = b"tuwenboundary"
            yield (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="question"\r\n\r\nq\r\n--' + boundary
                   + b'\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n')
            for _ in range(UPLOAD_LIMIT // 65536 + 4):
                yield b"\0" * 65536
            yield b"\r\n--" + boundary + b"--\r\n"

        streamed = api.post("/v1/jobs", content=chunks(),
                            headers={"Content-Type": "multipart/form-data; boundary=tuwenboundary"})
        assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "request_too_large"
    # And a client that declares a huge body gets its 413 without sending a byte of it
    host, port = urlsplit(parked_gateway.url).hostname, urlsplit(parked_gateway.url).port
    with socket.create_connection((host, port), timeout=10) as raw:
        raw.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: "
                    f"multipart/form-data; boundary=b\r\nContent-Length: {10**12}\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 413")


# -- bad input: every case gets a 4xx with its code, never a 5xx, and nothing is stored --------------------
def _corpus() -> list[tuple[str, dict[str, object], str]]:
    png = load_samples()[0].path.read_bytes()
    jpeg = encode(Image.open(io.BytesIO(png)).convert("RGB"), "JPEG", quality=90)
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("photo.jpg", b"not really")
    return [
        ("zero bytes", {"image": b""}, "empty_image"),
        ("truncated png", {"image": png[: len(png) // 3]}, "corrupt_image"),
        ("truncated jpeg", {"image": jpeg[: len(jpeg) // 2]}, "corrupt_image"),
        ("html", {"image": b"<!doctype html><html><body>hi</body></html>"}, "unsupported_image_format"),
        ("pdf", {"image": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"}, "unsupported_image_format"),
        ("svg", {"image": b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><circle r="4"/></svg>'},
         "unsupported_image_format"),
        ("zip renamed .jpg", {"image": zipped.getvalue(), "name": "photo.jpg"}, "unsupported_image_format"),
        ("bomb 30000x30000", {"image": png_header(30000, 30000)}, "image_too_many_pixels"),
        ("huge 8000x6000", {"image": png_header(8000, 6000)}, "image_too_many_pixels"),
        ("aspect 4000x10", {"image": png_header(4000, 10)}, "bad_aspect_ratio"),
        ("no image field", {"image": None}, "empty_image"),
        ("image sent as text", {"image": "text", "as_text": True}, "invalid_image"),
        ("empty question", {"question": ""}, "empty_question"),
        ("whitespace question", {"question": " \t\n "}, "empty_question"),
        ("zero-width question", {"question": "\u200b\u200c\u200d"}, "empty_question"),
        ("BOM question", {"question": "\ufeff"}, "empty_question"),
        ("question past the sanity cap", {"question": "问" * 200_001}, "question_too_long"),
        ("control characters", {"question": "图中\x00有\x1b什么"}, "invalid_question"),
        ("invalid utf-8", {"question": b"\xff\xfe\xfd?"}, "invalid_question"),
        ("negative max_new_tokens", {"max_new_tokens": -5}, "invalid_params"),
        ("huge max_new_tokens", {"max_new_tokens": 10**9}, "invalid_params"),
        # The tests' TUWEN_MAX_NEW_TOKENS is 48: one more is refused (naming the cap), never lowered (issue 22).
        ("max_new_tokens above the server's cap", {"max_new_tokens": 49}, "invalid_params"),
        ("max_new_tokens not a number", {"max_new_tokens": "lots"}, "invalid_params"),
        ("unknown priority", {"priority": "urgent"}, "invalid_params"),
        ("unknown field", {"temperature": "0.7"}, "invalid_params"),
        ("bad idempotency key", {"headers": {"Idempotency-Key": "has space"}}, "invalid_idempotency_key"),
        ("callback not http", {"callback_url": "file:///etc/passwd"}, "invalid_callback_url"),
    ] + [(f"question {q!r}", {"question": q}, "accepted") for q in ("<image> USER: ASSISTANT:", "图中\r\n有几个？")]


def _post_case(api: httpx.Client, png: bytes, case: dict[str, object]) -> httpx.Response:
    """Every field as a multipart part (text fields without a filename), so raw bytes can be sent too."""
    fields: dict[str, object] = {"question": "图中有几个圆形？", "image": png}
    fields.update({k: v for k, v in case.items() if k not in ("name", "headers", "as_text")})
    parts: list[tuple[str, object]] = []
    for name, value in fields.items():
        if value is None:
            continue
        if name == "image" and not case.get("as_text"):
            parts.append((name, (case.get("name", "picture.png"), value, "image/png")))
        else:
            parts.append((name, (None, value if isinstance(value, bytes) else str(value).encode())))
    return api.post("/v1/jobs", files=parts, headers=case.get("headers"))  # type: ignore[arg-type]


def test_every_bad_input_gets_a_4xx_with_its_code(parked_gateway: Gateway, parked_settings: Settings,
                                                  new_key: Keys) -> None:
    png = load_samples()[0].path.read_bytes()
    client = Client(parked_settings)
    jobs_before = set(client.jobs.redis.scan_iter(PREFIX + "*"))
    got: dict[str, tuple[int, str]] = {}
    with parked_gateway.client(new_key()) as api:
        for name, case, expected in _corpus():
            r = _post_case(api, png, case)
            got[name] = (r.status_code, r.json()["error"]["code"] if r.status_code >= 400 else "accepted")
    # Then each got its code, as a 4xx
    assert {n: c for n, (_, c) in got.items()} == {name: expected for name, _, expected in _corpus()}, got
    assert all(400 <= s < 500 for s, c in got.values() if c != "accepted"), got
    # And nothing was stored or recorded for the refused ones (each accepted one added one job)
    accepted = sum(1 for _, _, expected in _corpus() if expected == "accepted")
    assert len(set(client.jobs.redis.scan_iter(PREFIX + "*")) - jobs_before) == accepted
    for name, case, expected in _corpus():
        image = case.get("image")
        if expected != "accepted" and isinstance(image, bytes) and image:
            assert not client.images.exists(client.images.key_for(image)), name
    client.close()


def test_pictures_that_must_work_are_accepted(parked_gateway: Gateway, new_key: Keys) -> None:
    pal = Image.new("P", (32, 32), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    frames = [Image.new("P", (24, 24), i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    good = {"cmyk jpeg": encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"),
            "16-bit png": encode(Image.new("I;16", (16, 16), 40000), "PNG"),
            "palette png with transparency": encode(pal, "PNG", transparency=1),
            "grayscale": encode(Image.new("L", (32, 32), 128), "PNG"),
            "webp": encode(Image.new("RGB", (40, 20), "green"), "WEBP"),
            "animated gif": gif.getvalue()}
    with parked_gateway.client(new_key()) as api:
        codes = {name: submit(api, data, "图中是什么颜色？", name="upload.bin").status_code for name, data in good.items()}
    assert codes == {name: 202 for name in good}, codes


# -- ops ----------------------------------------------------------------------------------------------------
def test_health_metrics_and_openapi(parked_gateway: Gateway) -> None:
    with parked_gateway.client() as anonymous:
        health = anonymous.get("/healthz")
        metrics = anonymous.get("/metrics")
        spec = anonymous.get("/openapi.json")
    queues = [parked_gateway.settings.interactive_queue, parked_gateway.settings.bulk_queue,
              parked_gateway.settings.speech_queue]  # (no speech worker is no reason not to be ready)
    assert health.status_code == 200 and health.json() == {"status": "ok", "redis": "ok", "storage": "ok",
                                                           "workers": {q: 0 for q in queues}}
    assert "tuwen_gateway_requests_total" in metrics.text and 'route="/healthz"' in metrics.text
    assert "图中有几个圆形？" in spec.text and "图中有3个圆形。" in spec.text
    paths = spec.json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/healthz", "/readyz", "/metrics"} <= set(paths)
    upload = paths["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(upload["properties"]) == {"image", "audio", "question", "priority", "max_new_tokens", "callback_url"}
    assert upload["required"] == ["image"]  # the question may be spoken instead (`audio`)
    assert set(paths["/v1/jobs/{job_id}"]) == {"get", "delete"}


def test_unreachable_redis_gives_503_with_retry_after(pipeline_settings: Settings) -> None:
    dead = pipeline_settings.model_copy(update={"redis_url": "redis://127.0.0.1:9/0"})
    server = start_gateway(dead, gateway_settings(webhook_secret=None))
    try:
        with server.client("tw_0123456789ab_" + "x" * 43, timeout=60) as api:
            health = api.get("/healthz")
            job = api.get("/v1/jobs/" + "2" * 32)
    finally:
        server.stop()
    assert health.status_code == 503 and health.json()["redis"] == "unreachable"
    assert job.status_code == 503 and job.json()["error"]["code"] == "service_unavailable"
    assert int(job.headers["Retry-After"]) > 0


def test_keys_cli_creates_lists_and_revokes(pipeline_settings: Settings, parked_gateway: Gateway) -> None:
    from typer.testing import CliRunner

    from tuwen.pipeline.gateway.cli import keys_app

    env = {"TUWEN_REDIS_URL": pipeline_settings.redis_url}
    runner = CliRunner()
    created = runner.invoke(keys_app, ["create", "--owner", "school-a", "--name", "网站",
                                       "--json"], env=env)
    assert created.exit_code == 0, created.output
    key = json.loads(created.output)
    assert key["token"].startswith(f"sk-tw-{key['id']}-") and key["owner"] == "school-a" and key["name"] == "网站"
    with parked_gateway.client(key["token"]) as api:
        assert api.get("/v1/jobs/" + "3" * 32).status_code == 404  # authenticated; no such job
    listed = runner.invoke(keys_app, ["list", "--json"], env=env)
    mine = [k for k in json.loads(listed.output) if k["id"] == key["id"]]
    assert mine and mine[0]["active"] and "token" not in mine[0] and mine[0]["last_used_at"]
    assert runner.invoke(keys_app, ["revoke", key["id"]], env=env).exit_code == 0
    with parked_gateway.client(key["token"]) as api:
        assert api.get("/v1/jobs/" + "3" * 32).status_code == 401
    assert runner.invoke(keys_app, ["revoke", "000000000000"], env=env).exit_code == 2
    assert runner.invoke(keys_app, ["create", "--owner", "bad owner!"], env=env).exit_code == 2


def test_keys_made_before_the_sk_prefix_keep_working(parked_gateway: Gateway, keys: KeyStore) -> None:
    # Given a key stored as tuwen stored them before tokens began with sk- (tw_<key id>_<secret>)
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    old = f"tw_{key_id}_{secret}"
    keys.redis.hset(f"{API_KEY}id:{key_id}", mapping={"hash": hashlib.sha256(old.encode()).hexdigest(),
                                                      "owner": "school-old", "name": "old", "created_at": "1.0"})
    keys.redis.sadd(f"{API_KEY}ids", key_id)
    # And a key made now
    new_key, new_token = keys.create("school-new", "new")
    assert new_token.startswith(f"sk-tw-{new_key.id}-") and old.startswith("tw_")
    # When each is used
    with parked_gateway.client(old) as api, parked_gateway.client(new_token) as new:
        by_old, by_new = api.get("/v1/jobs/" + "3" * 32), new.get("/v1/jobs/" + "3" * 32)
    # Then both authenticate (404: no such job, not 401) as their owners
    assert by_old.status_code == 404 and by_new.status_code == 404, (by_old.text, by_new.text)
    owners = [getattr(keys.authenticate(token), "owner", None) for token in (old, new_token)]
    assert owners == ["school-old", "school-new"]
    # And neither form's secret works under the other form, nor a changed secret, nor a bare prefix
    for forged in (f"sk-tw-{key_id}-{secret}", f"tw_{new_key.id}_{new_token[-43:]}", old[:-4] + "AAAA",
                   new_token[:-4] + "AAAA", f"sk-{old}", "sk-tw-", "sk-" + "x" * 48):
        assert keys.authenticate(forged) is None, forged
    # And revoking the old key works as for any other
    keys.revoke(key_id)
    with parked_gateway.client(old) as api:
        assert api.get("/v1/jobs/" + "3" * 32).status_code == 401
