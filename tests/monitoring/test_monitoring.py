"""Monitoring: Flower shows real job states, Prometheus counters match, ``tuwen status`` matches.

Flower runs through ``tuwen flower`` (this host only, credentials from the environment, stopped with
its parent); the worker's metrics listen on 127.0.0.1 unless ``TUWEN_METRICS_ADDRESS`` says otherwise.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuwen.pipeline import app as queue
from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis
from tests.ports import free_port
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tests.conftest import make_settings, need
from tests.faults import listening_addresses, metric_values
from tests.s3servers import S3Endpoint
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "build" / "screenshots"
#: Bootstrap's success and danger badge fills, as Flower draws SUCCESS and FAILURE, and a badge's rough area.
BADGE_SUCCESS, BADGE_FAILURE, BADGE_PIXELS = (25, 135, 84), (220, 53, 69), 1000
AUTH = ("ops", "s3cret-flower")


def http_get(url: str, auth: tuple[str, str] | None = None, timeout: float = 10) -> bytes:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return bytes(resp.read())


@pytest.fixture(scope="module")
def own_redis() -> Iterator[LocalRedis]:
    with LocalRedis(port=free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def mon_settings(own_redis: LocalRedis, s3: S3Endpoint) -> Settings:
    return make_settings(own_redis.url, s3, metrics_port=free_port(), answer_cache=False)


def start_flower(settings: Settings, port: int, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``tuwen flower`` with the credentials in its environment; returns once Flower answers."""
    env = {"PATH": os.environ["PATH"], **settings.to_env(), "FLOWER_BASIC_AUTH": ":".join(AUTH)}
    proc = subprocess.Popen([sys.executable, "-m", "tuwen.pipeline.cli", "flower", f"--port={port}", *args],
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            http_get(f"http://127.0.0.1:{port}/healthcheck")
            return proc
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, f"flower did not start: {log.read_text()}"
            time.sleep(0.3)


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # exited, waiting for its (dead) parent's reaper
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def flower(mon_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    proc = start_flower(mon_settings, port, tmp_path_factory.mktemp("flower") / "flower.log")
    yield f"http://127.0.0.1:{port}"
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
    groups = [t for t in tasks.values() if t["name"] == "tuwen.group"]  # each hand-over to the decode loop
    assert groups and all("jobs" in t["kwargs"] for t in groups)
    shown = json.dumps(tasks, ensure_ascii=False)
    for text in {s.question for s in load_samples()} | {r.answer for r in results.values() if r.answer}:
        assert text not in shown
    for marker in ("iVBOR", "\\x89PNG", "PNG\\r\\n", "/9j/"):
        assert marker not in shown
    assert run["client"].settings.minio_secret_key.get_secret_value() not in shown
    # Flower inspects in the background, and a refresh asked while an inspection runs gets that one's answer
    # (one that started before the worker was up knows no worker): ask until the worker shows.
    deadline = time.monotonic() + 30
    while "mon@tests" not in (workers := json.loads(http_get(flower + "/api/workers?refresh=1", AUTH, timeout=30))):
        assert time.monotonic() < deadline, workers
        time.sleep(1)
    # Its stats came too (a transport option that was not JSON made every stats reply fail)
    deadline = time.monotonic() + 30
    while "stats" not in workers["mon@tests"]:
        assert time.monotonic() < deadline, workers
        time.sleep(1)
        workers = json.loads(http_get(flower + "/api/workers?refresh=1", AUTH, timeout=30))
    assert workers["mon@tests"]["stats"]["pool"]["max-concurrency"] == run["client"].settings.pool_threads


def test_flower_tasks_page_screenshot(run: dict, flower: str, tmp_path: Path) -> None:  # type: ignore[type-arg]
    """The screenshot shows Flower's task list with this run's jobs in it, not an error or a login page."""
    chromium = shutil.which("chromium")
    need(chromium is not None, "Debian chromium is not installed")
    out = SHOTS / "flower-tasks.png"  # under build/: the tracked docs/img/flower-tasks.png is never overwritten
    out.parent.mkdir(parents=True, exist_ok=True)
    url = flower.replace("http://", f"http://{AUTH[0]}:{AUTH[1]}@") + "/tasks"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=8000", "--window-size=1400,900"]
    subprocess.run([*flags, f"--screenshot={out}", url], capture_output=True, timeout=90, check=True)
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=90, check=True).stdout
    (SHOTS / "flower-tasks.html").write_text(dom, encoding="utf-8")
    # The page is Flower's task list, filled in by its script with this run's jobs and their states
    assert "<title>Tasks · Flower</title>" in dom and 'id="tasks-table"' in dom, dom[:2000]
    rows = [r for r in re.findall(r"<tr[^>]*>(.*?)</tr>", dom, re.S) if "<td" in r]
    ids = [job.id for job in [*run["good"], *run["gone"]]]
    # The first page (15 rows) is this run's: its jobs and its hand-overs to the decode loop (how many
    # hand-overs there are depends on how the jobs arrived, so the page holds some of the 12 jobs, not all)
    assert len(rows) == 15 and all(any(i in r for i in ids) or "tuwen.group" in r for r in rows), rows
    shown = [job.id for job in run["good"] if any(job.id in r for r in rows)]
    assert len(shown) >= 5, (len(rows), dom[:3000])
    assert all("SUCCESS" in r for r in rows if any(job.id in r for job in run["good"]))
    assert any(run["gone"][0].id in r and "FAILURE" in r for r in rows)
    # And the screenshot is that page drawn: Flower's green SUCCESS badges, one per visible job, and the red
    # FAILURE badge of the job whose picture vanished (an error page or a login prompt has neither)
    from PIL import Image

    img = Image.open(out).convert("RGB")
    assert img.size == (1400, 900)
    colours = {rgb: n for n, rgb in img.getcolors(img.width * img.height) or []}
    success, failure = colours.get(BADGE_SUCCESS, 0), colours.get(BADGE_FAILURE, 0)
    assert success >= 8 * BADGE_PIXELS and failure >= BADGE_PIXELS // 2, (success, failure)  # jobs and hand-overs


def test_worker_metrics_match_the_run(run: dict, mon_settings: Settings) -> None:  # type: ignore[type-arg]
    assert listening_addresses(mon_settings.metrics_port) == {"127.0.0.1"}  # TUWEN_METRICS_ADDRESS default
    text = http_get(f"http://127.0.0.1:{mon_settings.metrics_port}/metrics").decode()
    values = metric_values(text)
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
    assert snap["consumers"] == {mon_settings.interactive_queue: ["mon@tests"], mon_settings.bulk_queue: ["mon@tests"]}
    assert sum(m["succeeded"] for m in snap["stats"]["minutes"]) == 12
    assert snap["stats"]["codes"] == {"image_not_found": 1}
    screen = subprocess.run([sys.executable, "-m", "tuwen.pipeline.cli", "status"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert "mon@tests" in screen.stdout and "image_not_found" in screen.stdout


def test_flower_listens_on_this_host_only_and_keeps_the_password_off_command_lines(
        mon_settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    parent = start_flower(mon_settings, port, tmp_path / "flower.log")
    try:
        (child,) = children(parent.pid)
        assert listening_addresses(port) == {"127.0.0.1"}
        for pid in (parent.pid, child):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert AUTH[1] not in cmdline and mon_settings.redis_url not in cmdline, cmdline
        assert http_get(f"http://127.0.0.1:{port}/api/workers", AUTH)  # the credentials reached Flower
        # When the parent gets SIGTERM, then Flower stops with it
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(20) is not None
        assert gone(child, 20), "flower outlived tuwen flower (SIGTERM)"
    finally:
        parent.kill()


def test_flower_stops_even_when_its_parent_is_killed(mon_settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    parent = start_flower(mon_settings, port, tmp_path / "flower.log", "--address=127.0.0.1")
    (child,) = children(parent.pid)
    parent.kill()
    parent.wait(10)
    assert gone(child, 20), "flower outlived tuwen flower (SIGKILL)"


def test_flower_refuses_an_example_password(mon_settings: Settings) -> None:
    env = {"PATH": os.environ["PATH"], **mon_settings.to_env(), "FLOWER_BASIC_AUTH": "admin:change-me"}
    out = subprocess.run([sys.executable, "-m", "tuwen.pipeline.cli", "flower", f"--port={free_port()}"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "example password" in out.stderr and "Traceback" not in out.stderr


def test_status_counts_cancelled_jobs(run: dict, mon_settings: Settings) -> None:  # type: ignore[type-arg]
    # Given a job cancelled while queued (the cancel lands before the worker reads its message)
    client: Client = run["client"]
    sample = load_samples()[0]
    request = client.prepare(sample.path.read_bytes(), sample.question)
    client.jobs.create(request)
    assert client.cancel(request.id).status == JobStatus.cancelled
    queue.enqueue(client.celery, mon_settings, request)
    # When the worker takes it off the queue, then `tuwen status` and the metrics count the cancellation
    env = {"PATH": "/usr/bin:/bin", **mon_settings.to_env()}
    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run([sys.executable, "-m", "tuwen.pipeline.cli", "status", "--json"], env=env,
                             capture_output=True, text=True, timeout=60)
        snap = json.loads(out.stdout)
        if sum(m["cancelled"] for m in snap["stats"]["minutes"]) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sum(m["cancelled"] for m in snap["stats"]["minutes"]) == 1
    assert "cancelled" not in snap["stats"]["codes"]  # a cancellation is not a failure
    values = metric_values(http_get(f"http://127.0.0.1:{mon_settings.metrics_port}/metrics").decode())
    assert values['tuwen_jobs_total{code="",status="cancelled"}'] == 1
    assert client.get(request.id).status == JobStatus.cancelled
