"""The answer cache: a repeated (image, question, params, model) is answered without the model."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from tuwen.pipeline.client import Client
from tests.ports import free_port
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tuwen.pipeline.tool_format import split
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.bench.process import WorkerProcess

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
    # An owner of its own: another module's jobs of the session's Redis on this picture would keep its answers
    owner = f"cache-{uuid.uuid4().hex[:8]}"
    first = client.wait(client.submit(sample.path.read_bytes(), sample.question, owner=owner).id, timeout=60)
    assert first.status == JobStatus.succeeded and not first.cached
    port = cache_settings.metrics_port
    batches_before = metric(port, "tuwen_model_seconds_count")
    # The same picture (uploaded again) and question: answered without a model call.
    again = client.wait(client.submit(sample.path.read_bytes(), sample.question, owner=owner).id, timeout=60)
    assert again.status == JobStatus.succeeded and again.cached
    assert again.answer == first.answer and again.id != first.id
    assert "generate_ms" not in again.timings
    assert metric(port, "tuwen_model_seconds_count") == batches_before
    assert metric(port, "tuwen_answer_cache_hits_total") == 1
    # Other generation parameters are another question: the model runs.
    other = client.wait(client.submit(sample.path.read_bytes(), sample.question, max_new_tokens=5,
                                      owner=owner).id, timeout=60)
    assert not other.cached and metric(port, "tuwen_model_seconds_count") == batches_before + 1
    # Deleting the image's jobs also forgets the cached answers about it.
    for job_id in (first.id, again.id, other.id):
        client.delete(job_id)
    fresh = client.wait(client.submit(sample.path.read_bytes(), sample.question, owner=owner).id, timeout=60)
    assert not fresh.cached
    client.close()


def test_the_cache_is_per_owner(cache_worker: WorkerProcess, cache_settings: Settings) -> None:
    client = Client(cache_settings)
    sample = load_samples()[4]
    png = sample.path.read_bytes()
    # Given school-a's answered question
    first = client.wait(client.submit(png, sample.question, owner="school-a").id, timeout=60)
    assert first.status == JobStatus.succeeded and not first.cached and first.batch_size
    # When school-b asks the same about the same picture
    other = client.wait(client.submit(png, sample.question, owner="school-b").id, timeout=60)
    # Then the model answers it: nothing tells school-b that someone asked before
    assert other.status == JobStatus.succeeded and not other.cached and other.batch_size
    assert set(other.timings) == set(first.timings) and "generate_ms" in other.timings
    # While school-a's repeat comes from the cache, and the command line says so (not "batch of None")
    again = client.wait(client.submit(png, sample.question, owner="school-a").id, timeout=60)
    assert again.cached and again.answer == first.answer
    env = {"PATH": "/usr/bin:/bin", **cache_settings.to_env()}
    shown = subprocess.run([sys.executable, "-m", "tuwen.pipeline.cli", "result", again.id], env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "from the answer cache" in shown.stdout and "None" not in shown.stdout
    # And when school-a deletes its jobs, its cached answers go, though school-b's job keeps the picture
    for job_id in (first.id, again.id):
        assert client.delete(job_id, owner="school-a")
    assert client.images.exists(first.image_key or "")
    assert not client.wait(client.submit(png, sample.question, owner="school-a").id, timeout=60).cached
    assert client.wait(client.submit(png, sample.question, owner="school-b").id, timeout=60).cached
    client.close()


def test_a_cached_answer_streams_as_fast_as_it_comes_whole(cache_worker: WorkerProcess,
                                                           cache_settings: Settings) -> None:
    """A streamed answer from the cache has no tokens to stream: its readers used to sit out their whole
    blocking read of the stream (1 s) before they looked at the job again (1.02-1.10 s, where the same answer
    unstreamed took 65 ms). Measured side by side, through the gateway with the SDK and with ``Client``; the
    bounds are generous (not in the timing group: this module's worker is its own, on its own queues)."""
    from openai import OpenAI

    from tuwen.pipeline.gateway.apikeys import KeyStore
    from tuwen.pipeline.jobs import connect
    from tests.gateway.conftest import gateway_settings, start_gateway
    from tests.gateway.test_openai import ask

    sample = load_samples()[3]
    redis = connect(cache_settings.redis_url)
    gateway = start_gateway(cache_settings, gateway_settings())
    client = Client(cache_settings)
    try:
        token = KeyStore(redis).create(f"stream-{uuid.uuid4().hex[:8]}")[1]
        with OpenAI(base_url=gateway.url + "/v1", api_key=token, max_retries=0, timeout=60) as sdk:
            def whole() -> str:
                answer = sdk.chat.completions.create(model="tuwen", messages=[ask(sample)], max_tokens=32)
                return answer.choices[0].message.content or ""

            def streamed() -> str:
                chunks = sdk.chat.completions.create(model="tuwen", messages=[ask(sample)], max_tokens=32, stream=True)
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

            # Given an answer in the cache (for both forms of the request)
            first = whole()
            assert sample.facts[0] in first and streamed() == first
            # When the same question is asked again, whole and streamed, in turns
            times: dict[str, list[float]] = {"whole": [], "streamed": []}
            for _ in range(5):
                for name, call in (("whole", whole), ("streamed", streamed)):
                    t0 = time.perf_counter()
                    assert call() == first
                    times[name].append(time.perf_counter() - t0)
        # And with the Python client's reader (its first job fills the cache)
        for _ in range(2):
            job = client.submit(sample.path.read_bytes(), sample.question, stream=True, max_new_tokens=32)
            t0 = time.perf_counter()
            deltas = list(client.stream(job.id, timeout=30))
            by_client = time.perf_counter() - t0
    finally:
        client.close()
        gateway.stop()
        redis.close()
    # Then the streamed answer comes about as fast as the whole one, far under the old second
    whole_s, streamed_s = statistics.median(times["whole"]), statistics.median(times["streamed"])
    print(f"cached answer: whole {whole_s * 1000:.0f} ms, streamed {streamed_s * 1000:.0f} ms (medians of 5); "
          f"Client.stream {by_client * 1000:.0f} ms")
    assert deltas[-1].result is not None and deltas[-1].result.cached, deltas
    assert "".join(d.text for d in deltas) == deltas[-1].result.answer
    assert streamed_s < 3 * whole_s + 0.1 and streamed_s < 0.5, times
    assert by_client < 0.5, by_client


def test_a_cached_answer_keeps_every_choice(cache_worker: WorkerProcess, cache_settings: Settings) -> None:
    """A seeded ``n`` > 1 job with ``logprobs`` repeats: the cached result has the same choices, log probabilities
    included; the same with another ``n`` is another question."""
    client = Client(cache_settings)
    sample = load_samples()[9]
    params = {"n": 2, "temperature": 1.5, "seed": 21, "max_new_tokens": 16, "logprobs": True, "top_logprobs": 2}
    first = client.wait(client.submit(sample.path.read_bytes(), sample.question, params=params).id, timeout=60)
    again = client.wait(client.submit(sample.path.read_bytes(), sample.question, params=params).id, timeout=60)
    assert not first.cached and again.cached and first.choices is not None and len(first.choices) == 2
    assert again.choices == first.choices and again.generated_tokens == first.generated_tokens
    other = client.wait(client.submit(sample.path.read_bytes(), sample.question, params={**params, "n": 3}).id,
                        timeout=60)
    assert not other.cached and other.choices is not None and len(other.choices) == 3
    assert [c.answer for c in other.choices[:2]] == [c.answer for c in first.choices], "choice i is seeded seed + i"
    client.close()


def test_the_cache_keys_on_a_forced_tool_call(cache_worker: WorkerProcess, cache_settings: Settings) -> None:
    """A tool call is another question than the plain one (issue 24: the cache key includes the constraint),
    and a repeated call comes back from the cache still a call."""
    client = Client(cache_settings)
    sample = load_samples()[5]
    png = sample.path.read_bytes()
    digit = {"type": "integer", "minimum": 0, "maximum": 9}  # a number closes in one token
    count = {"name": "count", "parameters": {"type": "object", "properties": {"n": digit}, "required": ["n"],
                                             "additionalProperties": False}}
    call = {"tool_call": {"functions": [count]}, "max_new_tokens": 48}
    plain = client.wait(client.submit(png, sample.question, params={"max_new_tokens": 48}).id, timeout=60)
    first = client.wait(client.submit(png, sample.question, params=call).id, timeout=60)
    again = client.wait(client.submit(png, sample.question, params=call).id, timeout=60)
    assert not plain.cached and plain.finish_reason == "stop"
    assert not first.cached and first.finish_reason == "tool_calls" and split(first.answer or "") is not None
    assert again.cached and again.finish_reason == "tool_calls" and again.answer == first.answer
    client.close()


def test_a_page_is_seen_once_per_owner(cache_worker: WorkerProcess, cache_settings: Settings) -> None:
    """Reuse in a real worker (``engine.reuse``): a second question on a page finds the page's prefix and
    prefills only the question, and the worker's metrics say so; another owner's identical picture finds
    nothing (the caches are per owner, docs/performance.md)."""
    client = Client(cache_settings)
    port = cache_settings.metrics_port
    sample = load_samples()[8]
    png, owner = sample.path.read_bytes(), f"page-{uuid.uuid4().hex[:8]}"
    names = ("tuwen_prefix_cache_hits_total", "tuwen_prefix_cache_misses_total", "tuwen_encoder_cache_misses_total")
    before = [metric(port, name) for name in names]
    # Given a first question on a page
    first = client.wait(client.submit(png, sample.question, owner=owner).id, timeout=60)
    assert first.status == JobStatus.succeeded and sample.facts[0] in (first.answer or "")
    assert [metric(port, name) for name in names] == [before[0], before[1] + 1, before[2] + 1]
    # When a second question comes about it (other knobs: not the answer cache's)
    second = client.wait(client.submit(png, sample.question, owner=owner, max_new_tokens=6).id, timeout=60)
    # Then the page's prefix was found, the picture not encoded again, and the answer is the same one
    assert second.status == JobStatus.succeeded and not second.cached
    assert (first.answer or "").startswith(second.answer or "-") and second.generated_tokens == 6
    assert [metric(port, name) for name in names] == [before[0] + 1, before[1] + 1, before[2] + 1]
    # And another owner's identical page finds nothing of it
    stranger = client.wait(client.submit(png, sample.question, owner=f"{owner}-b", max_new_tokens=7).id, timeout=60)
    assert stranger.status == JobStatus.succeeded and not stranger.cached
    assert [metric(port, name) for name in names] == [before[0] + 1, before[1] + 2, before[2] + 2]
    assert metric(port, "tuwen_prefix_cache_bytes") > 0
    client.close()
