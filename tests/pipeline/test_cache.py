"""The answer cache: a repeated (image, question, params, model) is answered without the model."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest

from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import free_port
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


@pytest.fixture(scope="module")
def cache_settings(pipeline_settings: Settings) -> Settings:
    return pipeline_settings.model_copy(update={"interactive_queue": "cache-i", "bulk_queue": "cache-b",
                                                "answer_cache": True, "metrics_port": free_port()})


@pytest.fixture(scope="module")
def cache_worker(cache_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(cache_settings, "cache@tests", tmp_path_factory.mktemp("cache") / "w.log").start()
    proc.wait_ready(180)
    yield proc
    proc.stop()


def test_repeated_job_is_answered_from_the_cache(cache_worker: WorkerProcess, cache_settings: Settings) -> None:
    client = Client(cache_settings)
    sample = load_samples()[6]
    first = client.wait(client.submit(sample.path.read_bytes(), sample.question).id, timeout=60)
    assert first.status == JobStatus.succeeded and not first.cached
    port = cache_settings.metrics_port
    batches_before = metric(port, "tuwen_model_seconds_count")
    # The same picture (uploaded again) and question: answered without a model call.
    again = client.wait(client.submit(sample.path.read_bytes(), sample.question).id, timeout=60)
    assert again.status == JobStatus.succeeded and again.cached
    assert again.answer == first.answer and again.id != first.id
    assert "generate_ms" not in again.timings
    assert metric(port, "tuwen_model_seconds_count") == batches_before
    assert metric(port, "tuwen_answer_cache_hits_total") == 1
    # Other generation parameters are another question: the model runs.
    other = client.wait(client.submit(sample.path.read_bytes(), sample.question, max_new_tokens=5).id, timeout=60)
    assert not other.cached and metric(port, "tuwen_model_seconds_count") == batches_before + 1
    # Deleting the image's jobs also forgets the cached answers about it.
    for job_id in (first.id, again.id, other.id):
        client.delete(job_id)
    fresh = client.wait(client.submit(sample.path.read_bytes(), sample.question).id, timeout=60)
    assert not fresh.cached
    client.close()
