"""Security: JSON only, private bucket, owners, no secrets or image bytes in logs or task arguments,
retention and deletion."""

from __future__ import annotations

import os
import secrets
import time
import urllib.error
import urllib.request
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from tuwen.pipeline.app import TASK_NAME, make_celery
from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import Forbidden
from tuwen.pipeline.jobs import IMAGE_REFS, PREFIX
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def unique_png() -> bytes:
    """A picture no other test uses (its storage key is its content hash)."""
    buf = BytesIO()
    Image.frombytes("RGB", (24, 24), secrets.token_bytes(24 * 24 * 3)).save(buf, format="PNG")
    return buf.getvalue()


class Exploit:
    """Unpickling this runs a shell command: a worker that accepted pickle would create the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_worker_refuses_pickled_messages(worker: WorkerProcess, client: Client, pipeline_settings: Settings,
                                         tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    app = make_celery(pipeline_settings)
    app.conf.accept_content = ["json", "pickle"]  # the attacker's producer, not ours
    app.send_task(TASK_NAME, kwargs={"job": Exploit(marker)}, serializer="pickle",
                  queue=pipeline_settings.interactive_queue)
    # The worker keeps working and never ran the payload.
    sample = load_samples()[0]
    after = client.submit(sample.path.read_bytes(), sample.question)
    assert client.wait(after.id, timeout=60).status == JobStatus.succeeded
    time.sleep(1)
    assert not marker.exists()
    assert worker.alive
    tail = worker.log_tail(4000)  # the transport's screen refuses it before Celery would deserialize it
    assert "refused a message" in tail and "application/x-python-serialize" in tail


def test_bucket_is_private_and_presigned_urls_work(client: Client, pipeline_settings: Settings) -> None:
    job = client.submit(load_samples()[1].path.read_bytes(), "这是什么颜色？")
    url = f"http://{pipeline_settings.minio_endpoint}/{pipeline_settings.minio_bucket}/{job.image_key}"
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(url, timeout=10)
    assert denied.value.code == 403
    assert job.image_key is not None
    signed = client.images.presigned_url(job.image_key, 60)
    assert urllib.request.urlopen(signed, timeout=10).read() == load_samples()[1].path.read_bytes()


def test_owners_cannot_see_or_cancel_each_others_jobs(client: Client) -> None:
    sample = load_samples()[2]
    job = client.submit(sample.path.read_bytes(), sample.question, owner="school-a")
    assert client.get(job.id, owner="school-a").status != JobStatus.unknown
    for action in (client.get, client.cancel, client.delete):
        with pytest.raises(Forbidden) as info:
            action(job.id, owner="school-b")
        assert info.value.code == "not_found"


def test_secrets_and_image_bytes_stay_out_of_logs_and_messages(worker: WorkerProcess, client: Client,
                                                               pipeline_settings: Settings) -> None:
    sample = load_samples()[3]
    job = client.submit(sample.path.read_bytes(), sample.question)
    client.wait(job.id, timeout=60)
    log = worker.log_path.read_text(errors="replace")
    secret = pipeline_settings.minio_secret_key.get_secret_value()
    assert secret not in log
    assert "iVBOR" not in log and "\\x89PNG" not in log
    # What Flower would show as the task's arguments: ids, keys, params — no question, no bytes.
    request = client.jobs.request(job.id)
    assert request is not None and request.image_key.startswith("images/")


def test_delete_removes_result_and_unshared_image(worker: WorkerProcess, client: Client) -> None:
    shared = unique_png()
    first = client.submit(shared, "图中有几个圆形？")
    second = client.submit(shared, "描述这张图片。")
    client.wait_many([first.id, second.id], timeout=60)
    assert first.image_key == second.image_key and first.image_key is not None
    assert client.delete(first.id)
    assert client.get(first.id).status == JobStatus.unknown
    assert client.images.exists(first.image_key)  # still used by the second job
    assert client.delete(second.id)
    assert not client.images.exists(first.image_key)
    assert not client.jobs.redis.exists(IMAGE_REFS + first.image_key)
    assert not list(client.jobs.redis.scan_iter(f"{PREFIX}{second.id}"))
    assert not client.delete(second.id)


def test_records_and_images_expire(client: Client, pipeline_settings: Settings) -> None:
    job = client.submit(load_samples()[5].path.read_bytes(), "这是什么颜色？")
    ttl = client.jobs.redis.ttl(PREFIX + job.id)
    assert 0 < ttl <= pipeline_settings.result_ttl_s
    objects = client.images.objects
    rules = objects._client.get_bucket_lifecycle(objects.bucket).rules
    assert any(r.rule_filter.prefix == "images/" and r.expiration.days == pipeline_settings.image_ttl_days
               for r in rules)
