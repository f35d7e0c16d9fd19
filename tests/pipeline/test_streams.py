"""Streamed answers over a real Redis: late readers miss nothing, and the job store has the last word."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from tuwen.pipeline.jobs import JobStore, connect
from tuwen.pipeline.localredis import LocalRedis
from tuwen.pipeline.schema import JobRequest, JobResult, JobStatus
from tuwen.pipeline.streams import StreamWriter, read, stream_key


@pytest.fixture
def jobs(redis_server: LocalRedis) -> JobStore:
    return JobStore(connect(redis_server.url), ttl_s=600)


def new_job(jobs: JobStore) -> JobRequest:
    request = JobRequest(id=uuid.uuid4().hex, image_key="images/x", question="图中有什么？", stream=True)
    jobs.create(request)
    jobs.claim([request.id], "w")
    return request


def finish(jobs: JobStore, request: JobRequest, answer: str, reason: str = "stop") -> None:
    jobs.finish([JobResult(id=request.id, status=JobStatus.succeeded, answer=answer, finish_reason=reason,
                           owner=request.owner)])


def test_a_reader_gets_every_piece_live_then_the_result(jobs: JobStore) -> None:
    request = new_job(jobs)
    writer = StreamWriter(jobs.redis)
    pieces = ["图中", "有3个", "圆形", "。"]
    got: list[str] = []
    first = threading.Event()

    def produce() -> None:
        for piece in pieces:
            writer.text(request.id, piece)
            writer.flush()
            first.wait(5)
        writer.end(request.id, "stop")
        writer.flush()
        finish(jobs, request, "".join(pieces))

    thread = threading.Thread(target=produce)
    thread.start()
    events = []
    for delta in read(jobs, request.id, timeout=10):
        events.append(delta)
        if delta.text:
            got.append(delta.text)
            first.set()
    thread.join()
    assert got == pieces
    assert events[-1].finish_reason == "stop" and events[-1].result is not None
    assert events[-1].result.answer == "".join(pieces)
    assert 0 < jobs.redis.ttl(stream_key(request.id)) <= 600


def test_a_late_reader_misses_nothing(jobs: JobStore) -> None:
    request = new_job(jobs)
    writer = StreamWriter(jobs.redis)
    for piece in ["一", "二", "三"]:
        writer.text(request.id, piece)
    writer.end(request.id, "length")
    writer.flush()
    finish(jobs, request, "一二三", "length")
    deltas = list(read(jobs, request.id, timeout=5))
    assert "".join(d.text for d in deltas) == "一二三" and deltas[-1].finish_reason == "length"


def test_an_answer_that_never_streamed_arrives_whole(jobs: JobStore) -> None:
    """A cached answer, or a worker that died after streaming half: the final answer fills the rest."""
    request = new_job(jobs)
    writer = StreamWriter(jobs.redis)
    writer.text(request.id, "图中")
    writer.flush()
    finish(jobs, request, "图中是长方形。")
    deltas = list(read(jobs, request.id, timeout=5))
    assert [d.text for d in deltas if d.text] == ["图中", "是长方形。"]
    assert deltas[-1].result is not None and deltas[-1].result.status == JobStatus.succeeded


def test_a_reader_gives_up_at_its_timeout(jobs: JobStore) -> None:
    request = new_job(jobs)
    t0 = time.monotonic()
    deltas = list(read(jobs, request.id, timeout=1.5, poll_s=0.5))
    assert 1.4 < time.monotonic() - t0 < 4
    assert deltas == [deltas[-1]] and deltas[-1].result is None and deltas[-1].finish_reason is None


@pytest.mark.parametrize("ending", ["an answer from the cache", "a cancel"])
def test_a_waiting_reader_wakes_when_a_job_ends_without_streaming(jobs: JobStore, ending: str) -> None:
    """A reader blocks on the stream for up to a second between looks at the job; a job that ends with nothing
    streamed (an answer from the cache, a failure before the first token, a cancel) used to keep it there for
    that whole second. The script that ends the job appends an ``ended`` entry, which wakes it at once."""
    request = JobRequest(id=uuid.uuid4().hex, image_key="images/x", question="图中有什么？", stream=True)
    jobs.create(request)
    if ending == "an answer from the cache":
        jobs.claim([request.id], "w")
        end = threading.Timer(0.2, finish, (jobs, request, "图中是长方形。"))
    else:
        end = threading.Timer(0.2, jobs.cancel, (request.id,))
    end.start()
    t0 = time.monotonic()
    deltas = list(read(jobs, request.id, timeout=10, poll_s=5.0))
    took = time.monotonic() - t0
    end.join()
    assert deltas[-1].result is not None and deltas[-1].result.status.terminal, deltas
    assert 0.15 < took < 0.8, took  # the job ended at 0.2 s; the reader's own look would come at 5 s
    if ending == "an answer from the cache":
        assert [d.text for d in deltas if d.text] == ["图中是长方形。"]
    # A job that does not stream gets no stream
    quiet = JobRequest(id=uuid.uuid4().hex, image_key="images/x", question="图中有什么？")
    jobs.create(quiet)
    jobs.claim([quiet.id], "w")
    finish(jobs, quiet, "一")
    assert not jobs.redis.exists(stream_key(quiet.id))
