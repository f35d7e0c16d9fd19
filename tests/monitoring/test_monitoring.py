"""Monitoring: Flower shows real job states, Prometheus counters match, ``tuwen status`` matches."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis, free_port
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tests.conftest import make_settings, need
from tests.s3servers import S3Endpoint
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
AUTH = ("ops", "s3cret-flower")


def http_get(url: str, auth: tuple[str, str] | None = None, timeout: float = 10) -> bytes:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return bytes(resp.read())


@pytest.fixture(scope="module")
def own_redis() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


@pytest.fixture(scope="module")
def mon_settings(own_redis: LocalRedis, s3: S3Endpoint) -> Settings:
    return make_settings(own_redis.url, s3, metrics_port=free_port(), answer_cache=False)


@pytest.fixture(scope="module")
def flower(mon_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = (tmp_path_factory.mktemp("flower") / "flower.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "celery", f"--broker={mon_settings.broker}", "flower",
                             f"--port={port}", "--address=127.0.0.1", f"--basic-auth={':'.join(AUTH)}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            http_get(url + "/healthcheck")
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "flower did not start"
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(20)


@pytest.fixture(scope="module")
def run(mon_settings: Settings, flower: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:  # type: ignore[type-arg]
    """A known run: 12 good jobs and 2 whose image vanished, through a real worker watched by Flower."""
    worker = WorkerProcess(mon_settings, "mon@tests", tmp_path_factory.mktemp("w") / "worker.log").start()
    worker.wait_ready(180)
    client = Client(mon_settings)
    samples = load_samples()
    good = [client.submit(samples[i % len(samples)].path.read_bytes(), samples[i % len(samples)].question)
            for i in range(12)]
    # Poison: the image object is deleted before the worker gets to it.
    probe = client.prepare(samples[3].path.read_bytes(), "图形是什么颜色的？")
    lonely = Path(tempfile.mkdtemp()) / "x.png"
    from PIL import Image

    Image.new("RGB", (50, 40), (1, 2, 3)).save(lonely)
    gone = [client.prepare(lonely.read_bytes(), "图中是什么形状？"), probe]
    client.images.delete(gone[0].image_key)
    client.enqueue(gone[0])
    results = client.wait_many([j.id for j in good] + [gone[0].id], timeout=180)
    yield {"client": client, "good": good, "gone": gone[:1], "results": results, "worker": worker}
    client.close()
    worker.stop()


def test_flower_shows_true_states_without_private_data(run: dict, flower: str) -> None:  # type: ignore[type-arg]
    results = run["results"]
    assert sum(r.status == JobStatus.succeeded for r in results.values()) == 12
    assert results[run["gone"][0].id].error.code == "image_not_found"  # type: ignore[union-attr]
    assert urllib.request.urlopen(flower + "/healthcheck", timeout=5).status == 200
    with pytest.raises(urllib.error.HTTPError) as denied:
        http_get(flower + "/api/tasks")
    assert denied.value.code == 401
    deadline = time.monotonic() + 30
    while True:
        tasks = json.loads(http_get(flower + "/api/tasks?limit=1000", AUTH))
        states = {tid: tasks.get(tid, {}).get("state") for tid in results}
        if all(s in ("SUCCESS", "FAILURE") for s in states.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    for job in run["good"]:
        task = tasks[job.id]
        assert task["state"] == "SUCCESS" and task["runtime"] > 0 and task["worker"] == "mon@tests"
    assert tasks[run["gone"][0].id]["state"] == "FAILURE"
    assert "image_not_found" in tasks[run["gone"][0].id]["exception"]
    batches = [t for t in tasks.values() if t["name"] == "tuwen.batch"]
    assert batches and all("jobs" in t["kwargs"] for t in batches)
    shown = json.dumps(tasks, ensure_ascii=False)
    for text in {s.question for s in load_samples()} | {r.answer for r in results.values() if r.answer}:
        assert text not in shown
    for marker in ("iVBOR", "\\x89PNG", "PNG\\r\\n", "/9j/"):
        assert marker not in shown
    assert run["client"].settings.minio_secret_key.get_secret_value() not in shown
    workers = json.loads(http_get(flower + "/api/workers?refresh=1", AUTH, timeout=30))
    assert "mon@tests" in workers


def test_flower_tasks_page_screenshot(run: dict, flower: str, tmp_path: Path) -> None:  # type: ignore[type-arg]
    chromium = shutil.which("chromium")
    need(chromium is not None, "Debian chromium is not installed")
    out = ROOT / "docs" / "img" / "flower-tasks.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    url = flower.replace("http://", f"http://{AUTH[0]}:{AUTH[1]}@") + "/tasks"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=8000",
                    f"--screenshot={out}", "--window-size=1400,900", url],
                   capture_output=True, timeout=90, check=True)
    from PIL import Image

    img = Image.open(out).convert("L")
    dark = sum(1 for px in img.getdata() if px < 200) / (img.width * img.height)
    assert dark > 0.01, "the screenshot is blank"


def test_worker_metrics_match_the_run(run: dict, mon_settings: Settings) -> None:  # type: ignore[type-arg]
    text = http_get(f"http://127.0.0.1:{mon_settings.metrics_port}/metrics").decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values['tuwen_jobs_total{code="",status="succeeded"}'] == 12
    assert values['tuwen_jobs_total{code="image_not_found",status="failed"}'] == 1
    assert values["tuwen_batch_size_sum"] == 12
    assert values["tuwen_images_fetched_total"] == 12
    assert values["tuwen_generated_tokens_total"] == sum(r.generated_tokens or 0 for r in run["results"].values())
    assert values["tuwen_model_load_seconds"] > 0
    assert values[f'tuwen_queue_depth{{queue="{mon_settings.interactive_queue}"}}'] == 0
    assert "tuwen_queue_wait_seconds_bucket" in text and "tuwen_model_seconds_count" in text


def test_status_command_matches_the_run(run: dict, mon_settings: Settings) -> None:  # type: ignore[type-arg]
    env = {"PATH": "/usr/bin:/bin", **mon_settings.to_env()}
    out = subprocess.run([sys.executable, "-m", "tuwen.pipeline.cli", "status", "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    assert snap["queues"] == {mon_settings.interactive_queue: 0, mon_settings.bulk_queue: 0}
    assert [w["name"] for w in snap["workers"]] == ["mon@tests"]
    assert sum(m["succeeded"] for m in snap["stats"]["minutes"]) == 12
    assert snap["stats"]["codes"] == {"image_not_found": 1}
    screen = subprocess.run([sys.executable, "-m", "tuwen.pipeline.cli", "status"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert "mon@tests" in screen.stdout and "image_not_found" in screen.stdout
