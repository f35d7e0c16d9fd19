"""``tuwen bulk …`` as a user runs it: user data printed as text, never as markup; exit codes that say when
nothing worked; one Ctrl-C while waiting is enough. The matrices run the command in this process
(``tests.cli``); the Ctrl-C tests and one refusal run it as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuwen.pipeline.bulk.manifest import open_source
from tuwen.pipeline.bulk.model import BulkState
from tuwen.pipeline.bulk.records import PREFIX
from tuwen.pipeline.bulk.store import BulkStore
from tuwen.pipeline.settings import Settings
from tests.bulk.conftest import draw_pictures, write_jsonl
from tests.cli import as_at_a_terminal, tuwen_here, tuwen_process
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


def tuwen(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return tuwen_here(*args, env=settings.to_env())


def bulk_of(store: BulkStore, manifest: Path) -> str:
    (bulk,) = [b for b in store.recent(50) if b.input == str(manifest)]
    return bulk.id


@pytest.mark.timeout(180)
def test_custom_ids_and_ids_with_markup_are_printed_as_written(idle_settings: Settings, idle_store: BulkStore,
                                                               tmp_path: Path) -> None:
    # Given a file whose custom_ids look like rich markup, and repeat
    manifest = write_jsonl(tmp_path / "marks.jsonl", [
        {"custom_id": "[/x]", "image": "a.png", "question": "q"},
        {"custom_id": "[/x]", "image": "b.png", "question": "q"},
        {"custom_id": "[bold red]y", "image": "c.png", "question": "q"},
        {"custom_id": "[bold red]y", "image": "d.png", "question": "q"}])
    # When it is submitted (by the installed command, a real process), then the refusal lists them literally,
    # without a traceback
    submitted = tuwen_process("bulk", "submit", str(manifest), "--no-wait", env=idle_settings.to_env(), timeout=90)
    assert submitted.returncode == 2, submitted.stderr
    assert "Traceback" not in submitted.stderr and "MarkupError" not in submitted.stderr
    assert "line 2: custom_id '[/x]' repeats line 1" in submitted.stderr
    assert "line 4: custom_id '[bold red]y' repeats line 3" in submitted.stderr
    # And `bulk status` shows the failed bulk's lines as written
    status = tuwen(idle_settings, "bulk", "status", bulk_of(idle_store, manifest))
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    assert "custom_id '[/x]' repeats line 1" in status.stdout and "'[bold red]y' repeats" in status.stdout
    # And ids with markup in them are answered as unknown bulks, printed as typed
    for bulk_id in ("[/x]", "[bold red]z"):
        for verb in ("status", "cancel", "results", "report"):
            out = tuwen(idle_settings, "bulk", verb, bulk_id)
            assert out.returncode == 1 and "Traceback" not in out.stderr, (verb, out.stderr)
            assert f"error bulk_not_found: no bulk '{bulk_id}'" in out.stderr, (verb, out.stderr)


@pytest.mark.timeout(180)
def test_submit_exits_1_when_every_line_failed_and_shows_where_it_looked(idle_settings: Settings,
                                                                       idle_store: BulkStore, tmp_path: Path) -> None:
    (tmp_path / "pages").mkdir()
    manifest = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": str(i), "image": f"pages/{i:03d}.png", "question": "q"}
                                                   for i in range(3)])
    # When every line fails (here: no such pictures) the command says so with its exit code
    for wait in ("--no-wait", "--wait"):
        out = tuwen(idle_settings, "bulk", "submit", str(manifest), wait)
        assert out.returncode == 1, (wait, out.stdout, out.stderr)
        assert "0 completed, 3 failed of 3" in out.stderr
    bulk_id = bulk_of(idle_store, manifest)
    assert idle_store.get(bulk_id).state == BulkState.completed
    first = next(idle_store.results(bulk_id))
    assert first["error"]["code"] == "image_not_found"
    assert f"looked for {tmp_path.resolve() / 'pages' / '000.png'}" in first["error"]["message"]
    # While one line that works is enough for 0
    draw_pictures(tmp_path / "pages", 1, seed=520)[0][0].rename(tmp_path / "pages" / "000.png")
    assert tuwen(idle_settings, "bulk", "submit", str(manifest), "--no-wait", "--new").returncode == 0


@pytest.mark.timeout(180)
def test_one_ctrl_c_while_waiting_stops_and_names_the_bulk(idle_settings: Settings, idle_store: BulkStore,
                                                           tmp_path: Path) -> None:
    # Given a submission waiting for answers that will not come (no worker reads these queues)
    pics = draw_pictures(tmp_path, 3, seed=521)
    manifest = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": p.name, "image": p.name, "question": q}
                                                   for p, q in pics])
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TUWEN_")}, **idle_settings.to_env()}
    with as_at_a_terminal([sys.executable, "-m", "tuwen.pipeline.cli", "bulk", "submit", str(manifest)], env=env,
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        deadline, bulk_id = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            ids = [b.id for b in idle_store.recent(50) if b.input == str(manifest)]
            if ids and idle_store.redis.llen(PREFIX + ids[0] + ":lines") == 3:
                bulk_id = ids[0]
                break
            time.sleep(0.05)
        assert bulk_id is not None, proc.communicate(timeout=5)
        # When Ctrl-C is pressed once
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    # Then the command stops, says the bulk goes on and how to watch it (its real id)
    assert proc.returncode == 130, stderr
    assert f"tuwen bulk status {bulk_id} --watch" in stderr and "Traceback" not in stderr
    assert idle_store.get(bulk_id).state == BulkState.in_progress
    idle_store.cancel(bulk_id)


@pytest.mark.timeout(180)
def test_one_ctrl_c_while_eval_waits_stops_it(idle_settings: Settings, idle_store: BulkStore,
                                              tmp_path: Path) -> None:
    from tuwen.workers.demo.mmbench_demo import write_tsv

    tsv = write_tsv(tmp_path / "demo.tsv", per_kind=1)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TUWEN_")}, **idle_settings.to_env()}
    with as_at_a_terminal([sys.executable, "-m", "tuwen.pipeline.cli", "eval", str(tsv), "--prompt", "plain"],
                          env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        # Given an evaluation waiting for answers (no worker reads these queues)
        assert proc.stderr is not None
        while "waiting for the answers" not in (line := proc.stderr.readline()):
            assert line, proc.communicate(timeout=5)
        bulk = next(b for b in idle_store.recent(50) if b.input == f"mmbench:{tsv.name}")
        # When Ctrl-C is pressed once, it stops (it used to take two presses)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert "interrupted; run the same command again to continue" in stderr
    idle_store.cancel(bulk.id)


@pytest.mark.timeout(120)
def test_a_question_that_is_not_text_fails_its_line_and_the_report_still_renders(
        idle_settings: Settings, idle_store: BulkStore, tmp_path: Path) -> None:
    pic = draw_pictures(tmp_path, 1, seed=522)[0][0]
    manifest = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "n", "image": pic.name, "question": 12345},
                                                   {"custom_id": "l", "image": pic.name, "question": ["[b]x"]}])
    assert tuwen(idle_settings, "bulk", "submit", str(manifest), "--no-wait").returncode == 1
    bulk_id = bulk_of(idle_store, manifest)
    assert {x["error"]["code"] for x in idle_store.results(bulk_id)} == {"invalid_question"}
    page = tmp_path / "report.html"
    out = tuwen(idle_settings, "bulk", "report", bulk_id, "--html", str(page))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert page.read_text(encoding="utf-8").count("invalid_question") == 2


@pytest.mark.timeout(120)
def test_bulk_list_prints_whole_ids_however_narrow_the_terminal(idle_settings: Settings, idle_store: BulkStore,
                                                                tmp_path: Path) -> None:
    # Given a bulk whose input has a long path (the widest column)
    deep = tmp_path / ("三年级二班的练习题" * 5)
    pics = draw_pictures(deep, 1, seed=17)
    manifest = write_jsonl(deep / "questions.jsonl", [{"custom_id": "a", "image": pics[0][0].name,
                                                       "question": pics[0][1]}])
    bulk = idle_store.submit(open_source(manifest))
    # When the bulks are listed at 60 and at 120 columns, then its id is printed whole, on one line
    for columns in ("60", "120"):
        listed = tuwen_process("bulk", "list", env={**idle_settings.to_env(), "COLUMNS": columns})
        assert listed.returncode == 0, listed.stderr
        assert any(bulk.id in line for line in listed.stdout.splitlines()), (columns, listed.stdout)
    idle_store.cancel(bulk.id)


@pytest.mark.timeout(240)
def test_the_documented_start_runs_as_written(worker: WorkerProcess, pipeline_settings: Settings) -> None:
    """docs/bulk.md's "Start" block, from the repository's folder, with the settings ``tuwen serve`` gives (here
    the session worker's): the bundled pictures are answered, one result line each."""
    doc = (REPO / "docs" / "bulk.md").read_text(encoding="utf-8")
    block = re.search(r"## Start\n.*?```bash\n(.*?)```", doc, re.S)
    assert block is not None
    commands = [line for line in block.group(1).splitlines() if line.startswith("tuwen bulk")]
    assert len(commands) == 2, commands
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TUWEN_")}, **pipeline_settings.to_env(),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the installed `tuwen`
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(commands)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=200)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    pictures = sorted(p.name for p in (REPO / "workers" / "demo" / "samples").glob("*.png"))
    assert sorted(Path(line["image"]).name for line in lines) == pictures, out.stdout
    assert all(line["status"] == "succeeded" and line["answer"] for line in lines), out.stdout
