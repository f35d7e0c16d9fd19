"""The kill drill, extended to the speech stage (issue 28, part 3): kill -9 the speech worker while it has a job
running; its jobs come back (the reaper), are transcribed again by its next process, and go on to the picture
stage under the same id. Nothing is lost; the victims' speech stage says it ran twice."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis
from tuwen.pipeline.schema import JobStatus, StageName
from tests.conftest import make_settings
from tests.drills import Lives
from tests.faults import report
from tests.ports import free_port
from tests.s3servers import S3Endpoint
from tests.workers.test_speech import spoken
from tuwen.workers.demo.samples import load_samples

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


@pytest.fixture
def drill_redis() -> Iterator[LocalRedis]:
    with LocalRedis(appendonly=True, port=free_port()) as server:
        yield server


def test_kill_9_the_speech_worker_with_jobs_in_flight_loses_nothing(
        drill_redis: LocalRedis, s3: S3Endpoint, tmp_path: Path, untrained_speech: Path, lives: list[Lives]) -> None:
    t_start = time.monotonic()
    settings = make_settings(drill_redis.url, s3, answer_cache=False, speech_model_path=untrained_speech,
                             speech_batch_size=4)
    client = Client(settings)
    pictures = Lives(settings, "picture@drill", tmp_path)
    speech = Lives(settings, "speech@drill", tmp_path, role="speech")
    lives += [pictures, speech]
    pictures.start()
    speech.start()
    # Given 24 spoken questions about pictures
    samples = load_samples()
    jobs = {client.submit(samples[i % len(samples)].path, audio=spoken(seed=i)).id: i
            for i in range(24)}
    ids = list(jobs)
    # When the speech worker is killed -9 while a job it claimed is being transcribed, then started again
    kill = speech.kill_when_running(client, ids, timeout=60)
    for _ in range(2):  # the batch may have been handed on in the instant before the kill: try again
        if kill["victims"]:
            break
        speech.start()
        kill = speech.kill_when_running(client, ids, timeout=60)
    assert kill["victims"], kill
    speech.start()
    # Then every job ends succeeded, through both stages, and the victims were transcribed again
    results = client.wait_many(ids, timeout=240)
    lost = [i for i, r in results.items() if r.status != JobStatus.succeeded]
    assert not lost, {i: (results[i].status, results[i].error) for i in lost}
    assert all([s.name for s in r.stages or []] == [StageName.speech, StageName.picture] for r in results.values())
    again = {i: results[i].stages[0].attempts for i in kill["victims"]}  # type: ignore[index]
    assert all(n >= 2 for n in again.values()), again
    report("kill -9 the speech worker with jobs in flight", jobs=len(ids), lost=len(lost),
           victims=len(kill["victims"]), speech_attempts_of_victims=sorted(again.values()),
           duration_s=round(time.monotonic() - t_start, 1))
    client.close()
