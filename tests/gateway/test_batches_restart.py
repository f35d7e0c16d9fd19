"""The Batch API's gateways as real processes (``tuwen gateway serve``): one killed with SIGKILL while it submits a
batch's lines, the other completes the batch with every line once; and a 20,000-line input file
uploads and validates with the gateway's memory bounded (its peak RSS, from /proc)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tuwen.pipeline.bulk.records import PREFIX as BULK_PREFIX
from tuwen.pipeline.bulk.submission import CHUNK
from tuwen.pipeline.client import Client
from tuwen.pipeline.jobs import connect
from tuwen.pipeline.settings import Settings
from tests.gateway.test_batches import (
    TERMINAL, URL, ask, jsonl, line, png, read_lines, sdk, upload, wait_for, worksheets)
from tuwen.workers.bench.process import WorkerProcess
from tests.drills import GatewayProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MB = 1024 * 1024
#: Lines of the killed batch: more than one placement (``CHUNK`` lines recorded and published together), so
#: that the kill lands between two.
LINES = CHUNK + 144


@pytest.fixture
def own_queues(pipeline_settings: Settings) -> Settings:
    """Queues of this test alone: no other gateway of the session tends its batches."""
    tag = uuid.uuid4().hex[:8]
    return pipeline_settings.model_copy(update={"interactive_queue": f"rs-i-{tag}", "bulk_queue": f"rs-b-{tag}"})


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for gw in started:
        gw.kill()


def test_a_gateway_killed_mid_submission_leaves_the_batch_to_the_other_with_every_line_once(
        own_queues: Settings, keys, tmp_path: Path, gateways: list[GatewayProcess]) -> None:
    worker = WorkerProcess(own_queues, "restart@tests", tmp_path / "worker.log").start()
    token = keys.create(f"owner-{uuid.uuid4().hex[:8]}", "restart", 0)[1]
    redis = connect(own_queues.redis_url)
    try:
        # Two gateways on the same Redis and storage, sharing nothing else
        first = GatewayProcess(own_queues, tmp_path / "gateway-1.log")
        gateways.append(first.start())
        again = GatewayProcess(own_queues, tmp_path / "gateway-2.log")
        gateways.append(again.start())
        lines, _ = worksheets(LINES, seed=1_234, prefix="rs")
        with sdk(first, token) as client:
            # Given a batch of two placements (CHUNK lines each) whose lines the gateway is submitting
            batch = client.batches.create(input_file_id=upload(client, jsonl(lines)), endpoint=URL,
                                          completion_window="24h")
            deadline = time.monotonic() + 60
            while int(redis.hget(BULK_PREFIX + batch.id, "queued") or 0) < CHUNK and time.monotonic() < deadline:
                time.sleep(0.01)
            # When the gateway is killed (SIGKILL) in the middle of it
            first.kill()
        killed = time.monotonic()
        submitted = int(redis.hget(BULK_PREFIX + batch.id, "queued") or 0)
        assert CHUNK <= submitted < LINES, f"the kill came at {submitted} of {LINES} lines submitted"
        # ... and it was the one submitting: nothing more is queued until its lock lapses
        time.sleep(1.0)
        assert int(redis.hget(BULK_PREFIX + batch.id, "queued") or 0) == submitted
        # Then the other gateway, running all along, takes the batch over
        worker.wait_ready(timeout=180)
        with sdk(again, token) as client:
            # (its input file cannot be deleted while lines of it are still to submit)
            with pytest.raises(openai.ConflictError) as in_use:
                client.files.delete(batch.input_file_id)
            assert in_use.value.code == "file_in_use"
            done = wait_for(client, batch.id, lambda b: b.status in TERMINAL, timeout=300)
            outputs, errors = read_lines(client, done.output_file_id), read_lines(client, done.error_file_id)
            assert client.files.delete(batch.input_file_id).deleted
        # And the batch completes, every line answered exactly once
        assert done.status == "completed", done
        assert done.request_counts.model_dump() == {"total": LINES, "completed": LINES, "failed": 0}
        assert not errors and sorted(x["custom_id"] for x in outputs) == sorted(x["custom_id"] for x in lines)
        # … each line recorded once, as one job that ran once
        entries = redis.lrange(BULK_PREFIX + batch.id + ":lines", 0, -1)
        assert len(entries) == LINES
        reader = Client(own_queues)
        try:
            jobs = reader.jobs.get_many([x["response"]["request_id"] for x in outputs])
        finally:
            reader.close()
        assert len(jobs) == LINES and {j.attempts for j in jobs.values()} == {1}
        print(f"\nkilled at {submitted}/{LINES} lines submitted; the other gateway completed the batch "
              f"{time.monotonic() - killed:.1f}s after the kill")
    finally:
        redis.close()
        worker.stop()


def test_a_20000_line_file_uploads_and_validates_with_bounded_gateway_memory(
        own_queues: Settings, keys, tmp_path: Path, gateways: list[GatewayProcess]) -> None:
    # Given a 20,000-line input file of about 42 MiB (pictures as data: URLs)
    pictures = [png(ex) for ex in worksheets(40, seed=99)[1].values()]
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        for i in range(20_000):
            f.write(jsonl([line(f"big-{i:05d}", [ask(pictures[i % 40], "图中是什么形状？")])]))
    size_mb = path.stat().st_size / MB
    token = keys.create(f"owner-{uuid.uuid4().hex[:8]}", "big", 0)[1]
    gateway = GatewayProcess(own_queues, tmp_path / "gateway.log")
    gateways.append(gateway.start())
    with sdk(gateway, token, timeout=300) as client:
        # (warmed by a one-line batch: routes, storage clients and the submission's threads are up)
        warm_file = upload(client, jsonl([line("warm", [ask(pictures[0], "图中是什么形状？")])]))
        warm = client.batches.create(input_file_id=warm_file, endpoint=URL, completion_window="24h")
        wait_for(client, warm.id, lambda b: b.status == "in_progress", timeout=60)
        client.batches.cancel(warm.id)
        baseline = gateway.status_mb("VmRSS")
        # When it is uploaded, and a batch of it validated
        t0 = time.monotonic()
        with path.open("rb") as f:
            file_id = client.files.create(file=("big.jsonl", f), purpose="batch").id
        uploaded_s = time.monotonic() - t0
        after_upload = gateway.status_mb("VmHWM")
        batch = client.batches.create(input_file_id=file_id, endpoint=URL, completion_window="24h")
        t1 = time.monotonic()
        validated = wait_for(client, batch.id, lambda b: b.status != "validating", timeout=120)
        validated_s = time.monotonic() - t1
        after_validation = gateway.status_mb("VmHWM")
        client.batches.cancel(batch.id)
        stopped = wait_for(client, batch.id, lambda b: b.status in TERMINAL, timeout=120)
    # Then every line was counted and accepted …
    assert validated.status == "in_progress" and validated.request_counts.total == 20_000
    assert stopped.status == "cancelled"
    print(f"\n20,000-line file ({size_mb:.1f} MiB): upload {uploaded_s:.1f}s, validation {validated_s:.1f}s; gateway "
          f"RSS {baseline:.0f} MiB before, peak {after_upload:.0f} MiB after the upload, {after_validation:.0f} MiB "
          f"after the validation (+{after_validation - baseline:.0f} MiB for a {size_mb:.0f} MiB file)")
    # … and the gateway's peak memory grew by far less than the file: it was never held whole
    assert size_mb > 40
    assert after_validation - baseline < min(20, size_mb / 2), (baseline, after_upload, after_validation)
