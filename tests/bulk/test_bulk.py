"""Bulks: input parsing, refusal, bad lines, results in order, resume, cancel, expiry, report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from tuwen.pipeline.bulk import model
from tuwen.pipeline.bulk import store as store_module
from tuwen.pipeline.bulk.manifest import CsvSource, FolderSource, InvalidManifest, JsonlSource, open_source, validate
from tuwen.pipeline.bulk.model import LEGACY_ID_PREFIX, BulkState
from tuwen.pipeline.bulk.records import PREFIX
from tuwen.pipeline.bulk.store import BulkStore
from tuwen.pipeline.bulk.submission import CHUNK
from tuwen.pipeline.client import Client
from tuwen.pipeline.jobs import PREFIX as JOB_PREFIX
from tuwen.pipeline.schema import GenerationParams, Priority
from tuwen.pipeline.settings import Settings
from tuwen.pipeline.stores import open_results
from tests.bulk.conftest import cli, draw_pictures, write_jsonl

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def entries(store: BulkStore, bulk_id: str) -> list[dict[str, Any]]:
    return [json.loads(e) for e in store.redis.lrange(PREFIX + bulk_id + ":lines", 0, -1)]


# -- input, no services --------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_jsonl_csv_and_folder_inputs_are_read_alike(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for name in ("a/2.png", "a/1.jpg", "b.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes("\ufeff".encode() + '{"custom_id": "q1", "image": "b.png", "question": "图中是什么形状？"}\n\n'
                      '{"custom_id": 2, "image": "a/1.jpg", "params": {"max_new_tokens": 8}}\n'.encode())
    csv_path = tmp_path / "in.csv"
    csv_path.write_text("\ufeffcustom_id,image,question,params\nq1,b.png,图中是什么形状？,\n"
                        '2,a/1.jpg,,"{""max_new_tokens"": 8}"\n', encoding="utf-8")
    as_jsonl = list(JsonlSource(jsonl, question="默认问题").records())
    as_csv = list(CsvSource(csv_path, question="默认问题").records())
    for recs in (as_jsonl, as_csv):
        assert [(r.custom_id, r.image, r.question, r.params) for r in recs] == [
            ("q1", "b.png", "图中是什么形状？", None), ("2", "a/1.jpg", "默认问题", {"max_new_tokens": 8})]
    assert [r.line for r in as_jsonl] == [1, 3]
    folder = list(FolderSource(tmp_path, "图中有什么？").records())
    assert [r.custom_id for r in folder] == ["a/1.jpg", "a/2.png", "b.png"]
    assert isinstance(open_source(csv_path), CsvSource) and isinstance(open_source(jsonl), JsonlSource)
    with pytest.raises(InvalidManifest):
        open_source(tmp_path)  # a folder needs a question
    # The same input and options give the same bulk; another question gives another
    assert JsonlSource(jsonl).digest() == JsonlSource(jsonl).digest() != JsonlSource(jsonl, question="x").digest()


@pytest.mark.timeout(60)
def test_duplicate_missing_and_unreadable_custom_ids_are_listed_by_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"custom_id": "a", "image": "1.png", "question": "q"}\n'
                    '{"image": "2.png", "question": "q"}\n'
                    '{"custom_id": "a", "image": "3.png", "question": "q"}\n'
                    'not json\n'
                    '{"custom_id": "  ", "image": "3.png"}\n', encoding="utf-8")
    total, problems = validate(open_source(path))
    assert total == 5
    assert problems == ["line 2: no custom_id", "line 3: custom_id 'a' repeats line 1",
                        "line 4: not a JSON line (Expecting value: line 1 column 1 (char 0))", "line 5: no custom_id"]


@pytest.mark.timeout(120)
def test_a_50000_line_file_is_streamed_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(50_000):
            f.write(json.dumps({"custom_id": f"line-{i:06d}", "image": f"pics/{i % 97}.png",
                                "question": "请数一数这张练习题里有几个圆形？" * 3}, ensure_ascii=False) + "\n")
    size_mb = path.stat().st_size / 1e6
    tracemalloc.start()
    total, problems = validate(open_source(path))
    peak_mb = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    # Only the custom_ids are kept (to find repeats), never the lines
    assert (total, problems) == (50_000, [])
    assert peak_mb < 12 and peak_mb < size_mb, (peak_mb, size_mb)


# -- against real services -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_bulk(worker: Any, pipeline_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished bulk with six good lines and five bad ones, submitted through the CLI."""
    tmp = tmp_path_factory.mktemp("mixed")
    pics = draw_pictures(tmp / "imgs", 7, seed=4242)
    (tmp / "imgs" / "broken.png").write_bytes(pics[0][0].read_bytes()[:150])
    client = Client(pipeline_settings)
    key = client.store_image(pics[6][0], owner="default")  # a key is usable by the owner who stored it
    client.close()
    rows: list[dict[str, Any]] = [{"custom_id": f"学生-{i}", "image": p.name, "question": q}
                                  for i, (p, q) in enumerate(pics[:5])]
    rows.insert(1, {"custom_id": "broken", "image": "broken.png", "question": "图中是什么形状？"})
    rows.insert(3, {"custom_id": "missing", "image": "nope.png", "question": "图中是什么形状？"})
    rows += [{"custom_id": "empty-q", "image": pics[1][0].name, "question": "  "},
             {"custom_id": "by-key", "image": key, "question": pics[6][1], "params": {"max_new_tokens": 24}},
             {"custom_id": "bad-params", "image": pics[2][0].name, "question": "图形是什么颜色的？",
              "params": {"no_such_knob": 2}},
             {"custom_id": "no-image", "question": "图形是什么颜色的？"}]
    manifest = write_jsonl(tmp / "bulk.jsonl", rows)
    args = ["bulk", "submit", str(manifest), "--images-dir", str(tmp / "imgs")]
    started = time.monotonic()
    res = runner.invoke(cli(), args, env=pipeline_settings.to_env())
    assert res.exit_code == 0, res.output
    return {"id": res.stdout.strip().splitlines()[-1], "rows": rows, "args": args, "tmp": tmp,
            "seconds": time.monotonic() - started}


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_bad_lines_fail_alone_and_results_keep_input_order(mixed_bulk: dict[str, Any], store: BulkStore,
                                                          pipeline_settings: Settings) -> None:
    env, bulk_id, tmp = pipeline_settings.to_env(), mixed_bulk["id"], mixed_bulk["tmp"]
    # Given the finished bulk, when its results are written
    res = runner.invoke(cli(), ["bulk", "results", bulk_id, "--out", str(tmp / "results.jsonl"),
                                "--errors", str(tmp / "errors.jsonl")], env=env)
    assert res.exit_code == 0, res.output
    text = (tmp / "results.jsonl").read_text(encoding="utf-8")
    lines = [json.loads(x) for x in text.splitlines()]
    # Then there is one line per input line, in input order, and Chinese stays readable
    assert [x["custom_id"] for x in lines] == [r["custom_id"] for r in mixed_bulk["rows"]]
    assert "学生-0" in text and "\\u" not in text
    codes = {x["custom_id"]: (x["error"] or {}).get("code") for x in lines if x["status"] != "succeeded"}
    assert codes == {"broken": "corrupt_image", "missing": "image_not_found", "empty-q": "empty_question",
                     "bad-params": "invalid_params", "no-image": "missing_image"}
    good = [x for x in lines if x["status"] == "succeeded"]
    assert len(good) == 6 and all(x["answer"] and x["model_id"] for x in good)
    errors = [json.loads(x) for x in (tmp / "errors.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["custom_id"] for x in errors] == [x["custom_id"] for x in lines if x["status"] != "succeeded"]
    # And the bulk object says so, and its results are in the bucket under the bulk id
    bulk = store.get(bulk_id)
    assert bulk_id.startswith("bulk_")
    assert bulk.state == BulkState.completed
    assert bulk.request_counts.model_dump() == {"total": 11, "completed": 6, "failed": 5}
    assert bulk.created_at <= bulk.in_progress_at <= bulk.finalizing_at <= bulk.completed_at  # type: ignore[operator]
    stored = open_results(pipeline_settings).get_bytes(f"bulks/{bulk_id}/results.jsonl").decode()
    assert [json.loads(x)["custom_id"] for x in stored.splitlines()] == [x["custom_id"] for x in lines]
    status = runner.invoke(cli(), ["bulk", "status", bulk_id, "--json"], env=env)
    assert json.loads(status.stdout)["state"] == "completed"
    listed = runner.invoke(cli(), ["bulk", "list", "--json"], env=env)
    assert bulk_id in [b["id"] for b in json.loads(listed.stdout)]
    # And the same command again submits nothing: same bulk, same lines
    again = runner.invoke(cli(), mixed_bulk["args"], env=env)
    assert again.exit_code == 0 and again.stdout.strip().splitlines()[-1] == bulk_id
    assert len(entries(store, bulk_id)) == 11


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_refused_file_lists_its_lines_and_queues_nothing(pipeline_settings: Settings, idle_store: BulkStore,
                                                           idle_settings: Settings, tmp_path: Path) -> None:
    manifest = write_jsonl(tmp_path / "dup.jsonl", [{"custom_id": "a", "image": "x.png", "question": "q"},
                                                    {"image": "x.png", "question": "q"},
                                                    {"custom_id": "a", "image": "y.png", "question": "q"}])
    res = runner.invoke(cli(), ["bulk", "submit", str(manifest)], env=idle_settings.to_env())
    assert res.exit_code == 2
    assert "line 2: no custom_id" in res.stderr and "line 3: custom_id 'a' repeats line 1" in res.stderr
    assert idle_store.redis.llen(idle_settings.bulk_queue) == 0
    failed = [b for b in idle_store.recent(50) if b.input == str(manifest)]
    assert failed and failed[0].state == BulkState.failed and len(failed[0].errors) == 2


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_stopped_submission_resumes_without_submitting_twice(idle_store: BulkStore, idle_settings: Settings,
                                                               tmp_path: Path) -> None:
    # Given 600 lines on a queue no worker reads, and a submission stopped after 150 (as Ctrl-C does)
    pics = draw_pictures(tmp_path, 3, seed=7)
    rows = [{"custom_id": f"c{i}", "image": pics[i % 3][0].name, "question": pics[i % 3][1]} for i in range(600)]
    manifest = write_jsonl(tmp_path / "in.jsonl", rows)
    stop = threading.Event()
    first = idle_store.submit(open_source(manifest), stop=stop,
                              on_progress=lambda p: stop.set() if p.queued >= 150 else None)
    assert (first.state, first.submitted) == (BulkState.in_progress, 150)
    # When the same input is submitted again
    second = idle_store.submit(open_source(manifest))
    # Then it is the same bulk, every line was published exactly once, in input order
    assert second.id == first.id and second.submitted == 600
    assert idle_store.redis.llen(idle_settings.bulk_queue) == 600
    assert [e["c"] for e in entries(idle_store, first.id)] == [r["custom_id"] for r in rows]
    # And cancelling it cancels every queued job
    cancelled = idle_store.cancel(first.id)
    assert cancelled.state == BulkState.cancelled
    assert cancelled.request_counts.model_dump() == {"total": 600, "completed": 0, "failed": 600}
    assert {r["error"]["code"] for r in idle_store.results(first.id)} == {"cancelled"}


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_killed_submission_resumes_and_loses_nothing(idle_store: BulkStore, idle_settings: Settings,
                                                       tmp_path: Path) -> None:
    pics = draw_pictures(tmp_path, 3, seed=8)
    rows = [{"custom_id": f"k{i}", "image": pics[i % 3][0].name, "question": pics[i % 3][1]} for i in range(800)]
    manifest = write_jsonl(tmp_path / "in.jsonl", rows)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TUWEN_")}, **idle_settings.to_env()}
    cmd = [sys.executable, "-m", "tuwen.pipeline.cli", "bulk", "submit", str(manifest), "--no-wait"]
    # Given a submission killed with SIGKILL part-way through
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    bulk_id = None
    while time.monotonic() < deadline and proc.poll() is None:
        ids = [b.id for b in idle_store.recent(50) if b.input == str(manifest)]
        if ids and idle_store.redis.llen(PREFIX + ids[0] + ":lines") >= 100:
            bulk_id = ids[0]
            proc.kill()
            break
        time.sleep(0.02)
    proc.wait()
    assert bulk_id is not None, proc.communicate()
    before = idle_store.get(bulk_id).submitted
    assert 100 <= before < 800
    # When the same command runs again (it waits for the dead submitter's lock to lapse)
    rerun = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip().splitlines()[-1] == bulk_id
    # Then every line is recorded once, in order, each with one job; at most the one line in flight when
    # the process died was published twice (harmless: jobs are idempotent)
    assert [e["c"] for e in entries(idle_store, bulk_id)] == [r["custom_id"] for r in rows]
    jobs = list(idle_store.redis.scan_iter(JOB_PREFIX + bulk_id + "_*", count=1000))
    assert len(jobs) == 800
    assert 800 <= idle_store.redis.llen(idle_settings.bulk_queue) <= 801
    idle_store.cancel(bulk_id)


#: ``tuwen bulk submit`` that SIGKILLs itself at its second batch's publish: "before" it (the batch's jobs
#: recorded, none published) or "after" it (published, the batch's lines not recorded yet).
DIES_IN_A_BATCH = """
import os, signal, sys
from tuwen.pipeline import cli
from tuwen.pipeline.client import Client

when, publish, calls = sys.argv.pop(1), Client.publish_many, []

def publish_then_die(self, requests):
    calls.append(len(requests))
    if len(calls) == 2 and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    publish(self, requests)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)

Client.publish_many = publish_then_die
sys.argv[0] = "tuwen"
cli.main()
"""


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_submission_killed_in_the_middle_of_a_batch_resumes_with_every_line_once(
        idle_store: BulkStore, idle_settings: Settings, tmp_path: Path, when: str) -> None:
    # Given 3 batches' worth of lines over stored pictures, and a submission killed at its second batch's
    # publish: before it (jobs recorded, nothing published) or after it (published, lines not recorded)
    keys = [idle_store.client.store_image(p) for p, _ in draw_pictures(tmp_path, 3, seed=16)]
    n = 2 * CHUNK + 40
    rows = [{"custom_id": f"m{i}", "image": keys[i % 3], "question": "图中有几个圆形？"} for i in range(n)]
    rows[CHUNK + 7]["image"] = "images/" + "0" * 64  # a refused line inside the batch that dies
    manifest = write_jsonl(tmp_path / "in.jsonl", rows)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TUWEN_")}, **idle_settings.to_env()}
    args = ["bulk", "submit", str(manifest), "--no-wait"]
    killed = subprocess.run([sys.executable, "-c", DIES_IN_A_BATCH, when, *args], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    bulk_id = next(b.id for b in idle_store.recent(50) if b.input == str(manifest))
    assert idle_store.get(bulk_id).submitted == CHUNK  # the first batch only
    jobs = list(idle_store.redis.scan_iter(JOB_PREFIX + bulk_id + "_*", count=1000))
    assert len(jobs) == 2 * CHUNK - 1  # the second batch's jobs exist (all but the refused line's)
    published = idle_store.redis.llen(idle_settings.bulk_queue)
    assert published == (CHUNK if when == "before" else 2 * CHUNK - 1)
    # When the same command runs again (it waits for the dead submitter's lock to lapse)
    rerun = subprocess.run([sys.executable, "-m", "tuwen.pipeline.cli", *args], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr
    # Then every line is recorded exactly once, in input order, the refused one with its error, each other
    # with one job of its own
    lines = entries(idle_store, bulk_id)
    assert [e["c"] for e in lines] == [r["custom_id"] for r in rows]
    assert [e.get("e", {}).get("code") for e in lines].count("image_not_found") == 1
    assert lines[CHUNK + 7]["e"]["code"] == "image_not_found" and "j" not in lines[CHUNK + 7]
    job_ids = [e["j"] for e in lines if "j" in e]
    assert len(job_ids) == len(set(job_ids)) == n - 1
    assert len(list(idle_store.redis.scan_iter(JOB_PREFIX + bulk_id + "_*", count=1000))) == n - 1
    bulk = idle_store.get(bulk_id)
    assert (bulk.submitted, bulk.queued, bulk.rejected) == (n, n - 1, 1)
    # And every job was published once; killed after its batch's publish, that batch's jobs (still queued)
    # once more: the only duplicates, harmless since a job runs once whatever its messages
    again = 0 if when == "before" else CHUNK - 1
    assert idle_store.redis.llen(idle_settings.bulk_queue) == n - 1 + again
    idle_store.cancel(bulk_id)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_bulk_started_under_its_old_batch_id_resumes_under_it(
        idle_store: BulkStore, idle_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a submission made when bulk ids began with batch_, stopped after 5 of 40 lines
    pics = draw_pictures(tmp_path, 2, seed=14)
    rows = [{"custom_id": f"o{i}", "image": pics[i % 2][0].name, "question": pics[i % 2][1]} for i in range(40)]
    manifest = write_jsonl(tmp_path / "in.jsonl", rows)
    monkeypatch.setattr(store_module, "bulk_id_for", partial(model.bulk_id_for, prefix=LEGACY_ID_PREFIX))
    stop = threading.Event()
    old = idle_store.submit(open_source(manifest), stop=stop,
                            on_progress=lambda p: stop.set() if p.queued >= 5 else None)
    monkeypatch.undo()
    assert old.id.startswith(LEGACY_ID_PREFIX) and old.submitted == 5
    # And its process died after publishing the 5th line, before recording it; that job's record was
    # written by the old code, which called the field batch_id
    lost = json.loads(idle_store.redis.rpop(PREFIX + old.id + ":lines"))
    idle_store.redis.hincrby(PREFIX + old.id, "queued", -1)
    record = JOB_PREFIX + lost["j"]
    old_request = idle_store.redis.hget(record, "request").replace('"bulk_id":', '"batch_id":')
    idle_store.redis.hset(record, "request", old_request)
    # When the same input is submitted now
    bulk = idle_store.submit(open_source(manifest))
    # Then it continues that bulk: every line recorded once and in order, the lost line's queued job
    # published again, every other line once
    assert bulk.id == old.id and bulk.submitted == 40
    assert [e["c"] for e in entries(idle_store, bulk.id)] == [r["custom_id"] for r in rows]
    assert idle_store.redis.llen(idle_settings.bulk_queue) == 41
    request = idle_store.client.jobs.request(lost["j"])
    assert request is not None and request.bulk_id == old.id
    idle_store.cancel(bulk.id)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_lines_params_reach_its_job_whether_its_picture_is_a_file_or_a_key(idle_store: BulkStore,
                                                                              tmp_path: Path) -> None:
    # Given lines with every generation parameter, one naming a file and one a picture the owner stored
    pics = draw_pictures(tmp_path, 2, seed=15)
    key = idle_store.client.store_image(pics[1][0], owner="default")
    params = {"max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9, "seed": 5, "stop": ["。"],
              "truncation": "oldest_turns"}
    manifest = write_jsonl(tmp_path / "in.jsonl", [
        {"custom_id": "file", "image": pics[0][0].name, "question": pics[0][1], "params": params},
        {"custom_id": "key", "image": key, "question": pics[1][1], "params": params}])
    # When they are submitted
    bulk = idle_store.submit(open_source(manifest))
    # Then both jobs carry all of them (a file's line used to keep max_new_tokens only)
    for line in idle_store.results(bulk.id):
        request = idle_store.client.jobs.request(line["job_id"])
        assert request is not None, line
        assert request.params == GenerationParams.model_validate(params), line["custom_id"]
        assert (request.bulk_id, request.priority, request.owner) == (bulk.id, Priority.bulk, "default")
    idle_store.cancel(bulk.id)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_an_unfinished_bulk_expires_after_its_window(idle_store: BulkStore, tmp_path: Path) -> None:
    pics = draw_pictures(tmp_path, 2, seed=9)
    manifest = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": str(i), "image": pics[i % 2][0].name,
                                                    "question": pics[i % 2][1]} for i in range(20)])
    bulk = idle_store.submit(open_source(manifest), window_s=1.0)
    assert bulk.state == BulkState.in_progress
    time.sleep(1.2)
    expired = idle_store.refresh(bulk.id)
    assert expired.state == BulkState.expired and expired.expired_at
    assert {r["error"]["code"] for r in idle_store.results(bulk.id)} == {"bulk_expired"}
    assert expired.output_key


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_submit_reads_the_input_in_chunks(idle_store: BulkStore, tmp_path: Path) -> None:
    pics = draw_pictures(tmp_path, 1, seed=10)
    manifest = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": str(i), "image": pics[0][0].name,
                                                    "question": pics[0][1]} for i in range(5 * CHUNK)])
    read = [0]

    class Counting(JsonlSource):
        def records(self):  # type: ignore[no-untyped-def]
            for rec in super().records():
                read[0] += 1
                yield rec

    stop = threading.Event()
    bulk = idle_store.submit(Counting(manifest), stop=stop, on_progress=lambda p: stop.set())
    # validation streams the file once; submission then stops after its first chunk
    assert bulk.submitted == 1 and read[0] <= 5 * CHUNK + CHUNK
    idle_store.cancel(bulk.id)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_report_is_self_contained_and_renders_in_chromium(mixed_bulk: dict[str, Any], pipeline_settings: Settings,
                                                          chromium: str, tmp_path: Path) -> None:
    html = tmp_path / "report.html"
    res = runner.invoke(cli(), ["bulk", "report", mixed_bulk["id"], "--html", str(html)],
                        env=pipeline_settings.to_env())
    assert res.exit_code == 0, res.output
    page = html.read_text(encoding="utf-8")
    assert page.count("data:image/") >= 6 and 'src="http' not in page and "<link" not in page
    assert "学生-0" in page and "corrupt_image" in page
    profile = tempfile.mkdtemp(prefix="tuwen-chromium-")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"]
    try:
        shot = tmp_path / "report.png"
        subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1400,900", html.as_uri()],
                       check=True, capture_output=True, timeout=120)
        dom = subprocess.run([*flags, "--dump-dom", html.as_uri() + "#failures"], check=True, capture_output=True,
                             text=True, timeout=120).stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1400, 900)
    grey = img.convert("L").point(lambda v: 255 if v < 245 else 0)
    inked = (grey.histogram()[255]) / (img.width * img.height)
    colours = len(set(img.resize((350, 225)).getdata()))
    assert inked > 0.05 and colours > 200, (inked, colours)  # text, table lines and coloured thumbnails
    (REPO / "build" / "screenshots").mkdir(parents=True, exist_ok=True)  # never over the tracked docs/img
    shutil.copy(shot, REPO / "build" / "screenshots" / "bulk-report.png")
    # The failure filter works from the address: report.html#failures shows the five failed lines only
    assert 'data-filter="failures"' in dom and '<b id="shown">5</b>' in dom


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_folder_is_submitted_as_every_picture_times_one_question(idle_store: BulkStore, idle_settings: Settings,
                                                                   tmp_path: Path) -> None:
    pics = draw_pictures(tmp_path / "pages" / "unit1", 2, seed=11)
    shutil.copy(pics[0][0], tmp_path / "pages" / "cover.png")
    (tmp_path / "pages" / "readme.txt").write_text("not a picture")
    env = idle_settings.to_env()
    res = runner.invoke(cli(), ["bulk", "submit", str(tmp_path / "pages"), "--question", "图中有几个图形？",
                                "--no-wait", "--json"], env=env)
    assert res.exit_code == 0, res.output
    bulk = json.loads(res.stdout)
    assert bulk["state"] == "in_progress" and bulk["request_counts"]["total"] == 3
    lines = list(idle_store.results(bulk["id"]))
    assert [(x["custom_id"], x["question"], x["status"]) for x in lines] == [
        ("cover.png", "图中有几个图形？", "queued"), ("unit1/p00000.png", "图中有几个图形？", "queued"),
        ("unit1/p00001.png", "图中有几个图形？", "queued")]
    cancelled = runner.invoke(cli(), ["bulk", "cancel", bulk["id"]], env=env)
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stdout
    no_question = runner.invoke(cli(), ["bulk", "submit", str(tmp_path / "pages")], env=env)
    assert no_question.exit_code == 2 and "--question" in no_question.stderr


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("stop_as", ["cancelled", "expired"])
def test_a_bulk_stopped_before_all_its_lines_were_submitted_accounts_for_every_line(
        idle_store: BulkStore, idle_settings: Settings, tmp_path: Path, stop_as: str) -> None:
    # Given 600 lines of which a submitter that then died placed 150
    pics = draw_pictures(tmp_path, 3, seed=11)
    rows = [{"custom_id": f"s{i}", "image": pics[i % 3][0].name, "question": pics[i % 3][1]} for i in range(600)]
    manifest = write_jsonl(tmp_path / "in.jsonl", rows)
    stop = threading.Event()
    first = idle_store.submit(open_source(manifest), stop=stop,
                              on_progress=lambda p: stop.set() if p.queued >= 150 else None)
    assert first.submitted == 150
    # When the bulk is stopped (cancelled, or past its window) and its input is submitted again
    if stop_as == "cancelled":
        stopped = idle_store.cancel(first.id)
    else:
        idle_store.redis.hset(PREFIX + first.id, "expires_at", repr(time.time() - 1))
        stopped = idle_store.refresh(first.id)
    assert stopped.state.value == stop_as and stopped.unread
    again = idle_store.submit(open_source(manifest))
    # Then no job was queued for the other 450, yet every input line has its stopped line, in input order
    code = "cancelled" if stop_as == "cancelled" else "bulk_expired"
    assert idle_store.redis.llen(idle_settings.bulk_queue) == 150
    assert again.id == first.id and not again.unread and again.output_key
    assert again.request_counts.model_dump() == {"total": 600, "completed": 0, "failed": 600}
    results = list(idle_store.results(first.id))
    assert [r["custom_id"] for r in results] == [r["custom_id"] for r in rows]
    assert {r["error"]["code"] for r in results} == {code}
    assert sum(1 for r in results if r["job_id"]) == 150
    # And the stored result file, written when the bulk stopped, was written again with all 600
    stored = open_results(idle_settings).get_bytes(f"bulks/{first.id}/results.jsonl").decode().splitlines()
    assert [json.loads(x)["custom_id"] for x in stored] == [r["custom_id"] for r in rows]
