"""End to end: client → Redis/Celery → a real worker process (demo model) → S3 → results."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import InvalidImage, InvalidQuestion
from tuwen.pipeline.jobs import PREFIX
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def job_keys(client: Client) -> set[str]:
    return set(client.jobs.redis.scan_iter(PREFIX + "*"))


def stored_images(client: Client) -> list[str]:
    return list(client.images.objects.list("images/"))


def test_burst_of_40_jobs_is_batched_and_matches_one_at_a_time(worker: WorkerProcess, client: Client) -> None:
    samples = load_samples()
    # Given 40 jobs with mixed pictures and questions, submitted in a burst
    picks = [samples[i % len(samples)] for i in range(40)]
    jobs = [client.submit(s.path.read_bytes(), s.question) for s in picks]
    # When the worker has answered them
    results = client.wait_many([j.id for j in jobs], timeout=240)
    # Then all 40 succeeded with the right facts, in batches larger than one
    assert all(r.status == JobStatus.succeeded for r in results.values()), [r.error for r in results.values()]
    answers = [results[j.id].answer or "" for j in jobs]
    right = sum(all(f in a for f in s.facts) for s, a in zip(picks, answers))
    assert right == 40, list(zip([s.question for s in picks], answers))  # the demo model knows all 10 samples
    sizes = [results[j.id].batch_size or 0 for j in jobs]
    assert max(sizes) > 1
    assert all(results[j.id].model_id and results[j.id].timings["total_ms"] > 0 for j in jobs)
    # And the same questions sent one at a time get the same answers
    for s, batched in list(zip(picks, answers))[:10]:
        one = client.submit(s.path.read_bytes(), s.question)
        alone = client.wait(one.id, timeout=60)
        assert alone.status == JobStatus.succeeded and alone.batch_size == 1, alone
        assert alone.answer == batched


def test_get_does_not_block_and_unknown_ids_are_unknown(worker: WorkerProcess, client: Client) -> None:
    assert client.get("0" * 32).status == JobStatus.unknown
    assert client.wait("1" * 32, timeout=1).status == JobStatus.unknown
    s = load_samples()[0]
    job = client.submit(s.path.read_bytes(), s.question)
    assert client.get(job.id).status in (JobStatus.queued, JobStatus.running, JobStatus.succeeded)
    assert client.wait(job.id, timeout=60).status == JobStatus.succeeded


def test_bad_input_is_refused_before_anything_is_stored_or_queued(pipeline_settings: Settings) -> None:
    client = Client(pipeline_settings.model_copy(update={"interactive_queue": "refusal-probe"}))
    queue_len = client.jobs.redis.llen("refusal-probe")
    keys, images = job_keys(client), stored_images(client)
    png = load_samples()[0].path.read_bytes()
    with pytest.raises(InvalidImage) as bad_image:
        client.submit(png[: len(png) // 3], "图中是什么形状？")
    with pytest.raises(InvalidQuestion) as bad_question:
        client.submit(png, "  ")
    assert (bad_image.value.code, bad_question.value.code) == ("corrupt_image", "empty_question")
    assert client.jobs.redis.llen("refusal-probe") == queue_len
    assert job_keys(client) == keys
    assert stored_images(client) == images
    client.close()


def test_bucket_is_private_and_images_are_stored_once(client: Client, pipeline_settings: Settings) -> None:
    png = load_samples()[2].path.read_bytes()
    first = client.submit(png, "图形是什么颜色的？")
    second = client.submit(png, "这是什么颜色？")
    assert first.image_key == second.image_key
    assert stored_images(client).count(first.image_key) == 1
    url = f"http://{pipeline_settings.minio_endpoint}/{pipeline_settings.minio_bucket}/{first.image_key}"
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(url, timeout=10)
    assert denied.value.code == 403
    assert client.images.get(first.image_key) == png


def test_cli_submit_wait_json_keeps_chinese_readable(worker: WorkerProcess, pipeline_settings: Settings) -> None:
    s = load_samples()[0]
    env = {"PATH": "/usr/bin:/bin", **pipeline_settings.to_env()}
    out = subprocess.run([sys.executable, "-m", "tuwen.pipeline.cli", "submit", str(s.path), s.question, "--wait", "--json"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "\\u" not in out.stdout
    result = json.loads(out.stdout)
    assert result["status"] == "succeeded" and all(f in result["answer"] for f in s.facts)
    again = subprocess.run([sys.executable, "-m", "tuwen.pipeline.cli", "result", result["id"], "--json"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(again.stdout)["answer"] == result["answer"]
    refused = subprocess.run([sys.executable, "-m", "tuwen.pipeline.cli", "submit", str(s.path), " ", "--json"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and json.loads(refused.stdout)["error"]["code"] == "empty_question"
