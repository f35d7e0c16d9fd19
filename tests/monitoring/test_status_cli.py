"""``tuwen status`` / ``submit`` against missing or misconfigured services: a line and an exit code, fast.

The command runs in this process (``tests.cli``); one ``tuwen status`` runs as a real process.

Exit codes (pipeline/cli.py): 2 input or a setting refused · 3 a service is unavailable · 4 not finished.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuwen.pipeline.localredis import LocalRedis
from tests.ports import free_port
from tuwen.pipeline.settings import Settings
from tests.cli import tuwen_here
from tests.conftest import make_settings, need
from tests.s3servers import S3Endpoint
from tuwen.workers.demo.samples import load_samples

pytestmark = [pytest.mark.timeout(120)]


def tuwen(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the whole ``tuwen`` command (producer and worker commands), in this process, with only the ``TUWEN_*``
    variables of ``env`` set; and how long it took."""
    t0 = time.monotonic()
    out = tuwen_here(*args, env={"COLUMNS": "200", **env})
    return out, time.monotonic() - t0


@pytest.fixture
def empty_redis() -> Iterator[LocalRedis]:
    need(shutil.which("redis-server") is not None, "redis-server is not installed")
    with LocalRedis(port=free_port()) as server:
        yield server


def test_status_with_a_wrong_redis_port_says_unavailable() -> None:
    out, took = tuwen("status", env={"TUWEN_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert out.returncode == 3, out.stderr
    assert "service_unavailable" in out.stderr and "Redis is not reachable" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert took < 5, took
    as_json, _ = tuwen("status", "--json", env={"TUWEN_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert as_json.returncode == 3 and '"code": "service_unavailable"' in as_json.stdout


def test_submit_to_an_unreachable_redis_fails_within_two_seconds_or_so(tmp_path: Path) -> None:
    picture = load_samples()[0].path
    out, took = tuwen("submit", str(picture), "图中是什么形状？", env={
        "TUWEN_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "TUWEN_STORAGE_DIR": str(tmp_path)})
    assert out.returncode == 3, out.stderr
    assert "Traceback" not in out.stderr
    assert took < 4, took  # it took 7-8 s: six retries with backoff


@pytest.mark.parametrize("variable", ["TUWEN_REDIS_URL", "TUWEN_BROKER_URL"])
def test_a_url_without_a_scheme_is_a_refused_setting(variable: str) -> None:
    out, _ = tuwen("status", env={variable: "localhost:6379", "TUWEN_MINIO_SECRET_KEY": "a-real-secret-4711"})
    assert out.returncode == 2, out.stderr
    assert f"invalid_setting: {variable}: not a URL tuwen can use" in out.stderr
    assert "Traceback" not in out.stderr and "a-real-secret-4711" not in out.stderr


def test_example_secrets_are_refused_at_start() -> None:
    # (status as the installed command, a real process with only PATH and this variable set)
    out = subprocess.run([sys.executable, "-m", "tuwen.workers.cli", "status"], capture_output=True, text=True,
                         timeout=60, env={"PATH": os.environ["PATH"], "COLUMNS": "200",
                                          "TUWEN_REDIS_URL": "redis://:change-me-redis@127.0.0.1:6379/0"})
    assert out.returncode == 2 and "the password in TUWEN_REDIS_URL still has an example value" in out.stderr
    out, _ = tuwen("worker", env={"TUWEN_MINIO_ENDPOINT": "127.0.0.1:9000",
                                  "TUWEN_MINIO_SECRET_KEY": "change-me-to-a-long-random-string"})
    assert out.returncode != 0 and "TUWEN_MINIO_SECRET_KEY still has an example value" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.integration
def test_a_wait_says_at_once_when_no_worker_consumes_the_queue(empty_redis: LocalRedis, s3: S3Endpoint) -> None:
    settings: Settings = make_settings(empty_redis.url, s3)
    picture = load_samples()[0].path
    # Given no worker: `submit --wait` says so, and how to start one, before it waits (it was silent for the
    # whole wait, 120 s by default) ...
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TUWEN_")}, **settings.to_env(), "COLUMNS": "200"}
    t0 = time.monotonic()
    waiting = subprocess.Popen([sys.executable, "-m", "tuwen.workers.cli", "submit", str(picture), "图中是什么形状？",
                                "--wait"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert waiting.stderr is not None
        note = waiting.stderr.readline()
        said_after = time.monotonic() - t0
        assert waiting.poll() is None, note  # ... while it still waits
    finally:
        waiting.kill()
        waiting.wait()
    assert f"no live worker is consuming {settings.interactive_queue}" in note, note
    assert "`tuwen worker`" in note and "`tuwen serve`" in note, note
    assert said_after < 10, said_after
    # And a wait that times out still ends with exit status 4, for either queue
    out, _ = tuwen("submit", str(picture), "图中是什么形状？", "--wait", "--timeout", "1", env=settings.to_env())
    assert out.returncode == 4 and f"no live worker is consuming {settings.interactive_queue}" in out.stderr
    out, _ = tuwen("submit", str(picture), "图中是什么形状？", "--wait", "--timeout", "1", "--priority", "bulk",
                   env=settings.to_env())
    assert out.returncode == 4 and f"no live worker is consuming {settings.bulk_queue}" in out.stderr
    status, _ = tuwen("status", env=settings.to_env())
    assert status.returncode == 0 and "none" in status.stdout
