"""Fixtures that start real services on free ports and clean up after themselves.

* ``redis_server`` — a private redis-server (never the one on 6379).
* ``s3`` — moto's standalone S3 server (real HTTP S3 protocol).
* ``runtime`` — the bundled demo model, loaded once per session in this process.
* ``pipeline_settings`` / ``worker`` — a real ``tuwen worker`` subprocess on those services.
* ``rabbitmq_server`` — a private rabbitmq-server (own node, ports and data; never the one on 5672).
* ``lives`` — the drill workers a test starts (``tests.drills``), stopped at its end.

A missing service fails the run in CI (``CI`` set, as ``.ci/run`` does) and skips locally with the reason;
in CI any other skip fails too, so a CI run is green only when every test ran.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis
from tests.ports import free_port
from tuwen.pipeline.settings import Settings
from tests import rabbit
from tests.drills import Lives
from tests.rabbit import LocalRabbit
from tests.s3servers import S3Endpoint, moto_server
from tuwen.workers.bench.process import WorkerProcess

IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def need(condition: bool, reason: str) -> None:
    """Skip locally, fail in CI: a missing service must never turn CI green."""
    if not condition:
        if IN_CI:
            pytest.fail(f"required in CI: {reason}")
        pytest.skip(reason)


#: The group of tests that check wall-clock bounds, latencies or a window a join must land in
#: (``@pytest.mark.xdist_group(TIMING)``): under pytest-xdist they run on one worker, one after another.
TIMING = "timing"
#: Groups handed out first, longest first (as ``--durations`` measured them): a long group handed out last
#: would run alone at the end while the other worker idles.
LONGEST = (TIMING, "tests.reliability.test_drills", "tests.workers.test_bench", "tests.reliability.test_rabbitmq",
           "tests.workers.test_demo", "tests.gateway.test_schemathesis", "tests.gateway.test_batches_restart",
           "tests.bulk.test_bulk", "tests.monitoring.test_monitoring", "tests.gateway.test_clients",
           "tests.workers.test_train_demo")


def group_of(item: pytest.Item) -> str:
    marker = item.get_closest_marker("xdist_group")
    assert marker is not None
    return str(marker.args[0])


#: The run's own per-user data directory (``XDG_DATA_HOME``): tuwen's default storage and ``tuwen serve``'s state
#: live under it, so no test, and no process a test starts, writes to the real ``~/.local/share/tuwen``.
DATA_HOME = "TESTS_TUWEN_DATA_HOME"


def pytest_configure(config: pytest.Config) -> None:
    if DATA_HOME not in os.environ:  # (an xdist worker inherits its controller's)
        os.environ[DATA_HOME] = tempfile.mkdtemp(prefix="tuwen-tests-data-")
    os.environ["XDG_DATA_HOME"] = os.environ[DATA_HOME]


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist) removes it
        shutil.rmtree(os.environ.get(DATA_HOME, ""), ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``make test`` runs pytest-xdist with ``--dist loadgroup``: each xdist_group runs on one worker. A test
    outside the timing group is grouped with its module, so that a module's fixtures (a worker process, a
    gateway, a built wheel) are made once; and the longest groups are handed out first."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__ if item.module else item.nodeid))
    items.sort(key=lambda item: LONGEST.index(group_of(item)) if group_of(item) in LONGEST else len(LONGEST))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI a skipped test is a failed one, whoever skipped it: CI passes only with 0 skipped."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome, report.longrepr = "failed", f"skipped in CI, which must run every test: {reason}"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    need(shutil.which("redis-server") is not None, "redis-server is not installed")
    with LocalRedis(appendonly=True, port=free_port()) as server:
        yield server


@pytest.fixture(scope="session")
def rabbitmq_server() -> Iterator[LocalRabbit]:
    need(rabbit.installed(), f"rabbitmq-server is not installed: {rabbit.INSTALL}")
    with LocalRabbit() as server:
        yield server


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Endpoint]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    from tuwen.workers.demo import bundled_demo_model

    path = bundled_demo_model()
    assert (path / "config.json").exists(), f"the bundled demo checkpoint is missing at {path}"
    return path


@pytest.fixture(scope="session")
def runtime(demo_checkpoint: Path):  # type: ignore[no-untyped-def]
    from tuwen.workers.engine.model import Runtime

    rt = Runtime(Settings(model_path=demo_checkpoint, torch_threads=1, max_new_tokens=48))
    rt.load()
    return rt


def make_settings(redis_url: str, s3: S3Endpoint, **overrides: object) -> Settings:
    values: dict[str, object] = dict(
        redis_url=redis_url, minio_endpoint=s3.endpoint, minio_access_key=s3.access_key,
        minio_secret_key=s3.secret_key, minio_bucket=f"t-{uuid.uuid4().hex[:12]}", minio_secure=s3.secure,
        max_batch_size=8, batch_wait_ms=100, visibility_timeout_s=60, max_new_tokens=48)
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pipeline_settings(redis_server: LocalRedis, s3: S3Endpoint) -> Settings:
    """Settings for the shared session worker: its own queues, so other tests' workers never steal."""
    return make_settings(redis_server.url, s3, interactive_queue="it-interactive", bulk_queue="it-bulk",
                         speech_queue="it-speech", answer_cache=False)


@contextmanager
def running(proc: WorkerProcess) -> Iterator[WorkerProcess]:
    """A worker process started, ready (its model loaded), and stopped at the end, even after a failure."""
    proc.start()
    try:
        proc.wait_ready(timeout=180)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def worker(pipeline_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    with running(WorkerProcess(pipeline_settings, "session@tests", tmp_path_factory.mktemp("worker") / "worker.log")) \
            as proc:
        yield proc


@pytest.fixture(scope="session")
def untrained_speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Whisper checkpoint (the demo speech model before training): the speech stage's plumbing,
    not its transcripts, is what tests with it check."""
    from tuwen.workers.demo.speech.build import build_untrained

    return build_untrained(tmp_path_factory.mktemp("speech") / "untrained")


@pytest.fixture(scope="session")
def speech_worker(pipeline_settings: Settings, untrained_speech: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """The session's speech worker (``tuwen worker --role speech``) on ``pipeline_settings``' speech queue."""
    settings = pipeline_settings.model_copy(update={"speech_model_path": untrained_speech})
    with running(WorkerProcess(settings, "speech@tests", tmp_path_factory.mktemp("speech-worker") / "worker.log",
                               role="speech")) as proc:
        yield proc


@pytest.fixture
def lives() -> Iterator[list[Lives]]:
    """Drill workers (``tests.drills.Lives``) a test starts: all stopped or killed at its end, even after a failure."""
    started: list[Lives] = []
    yield started
    for w in started:
        w.stop()


@pytest.fixture
def client(pipeline_settings: Settings) -> Iterator[Client]:
    c = Client(pipeline_settings)
    yield c
    c.close()
