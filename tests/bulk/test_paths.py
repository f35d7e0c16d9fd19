"""Bulk lines name pictures inside the images dir only: paths are resolved (symlinks too) and confined,
every refusal reads alike whether or not something exists outside, and sizes are checked before reading."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tuwen.pipeline.bulk.model import BulkState
from tuwen.pipeline.bulk.store import BulkStore
from tuwen.pipeline.bulk.submission import confined
from tuwen.pipeline.client import read_image
from tuwen.pipeline.errors import InvalidImage
from tuwen.pipeline.bulk.manifest import CsvSource, JsonlSource, open_source, validate
from tuwen.pipeline.settings import Settings
from tests.pdfs import PAGE_KINDS, scene_pdf, scenes
from tests.bulk.conftest import cli, draw_pictures, write_jsonl

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()

#: (escapes to something that exists, the same escape to something missing)
ESCAPES = [
    ("../outside/secret.png", "../outside/none.png"),
    ("sub/../../outside/secret.png", "sub/../../outside/none.png"),
    ("link-out.png", "dangling.png"),  # a symlink out of the dir; one pointing nowhere
    ("dir-link/secret.png", "dir-link/none.png"),  # through a symlinked folder
    ("/etc/passwd", "/etc/no-such-file-tuwen"),
]


def layout(tmp: Path) -> dict[str, Any]:
    """An images dir with good pictures, symlinks in and out, and a folder outside it holding a secret."""
    imgs, outside = tmp / "imgs", tmp / "outside"
    (imgs / "sub").mkdir(parents=True)
    pics = draw_pictures(imgs, 2, seed=515)
    secret = draw_pictures(outside, 1, seed=516)[0][0].rename(outside / "secret.png")
    (imgs / "link-out.png").symlink_to("../outside/secret.png")
    (imgs / "dangling.png").symlink_to("../outside/none.png")
    (imgs / "dir-link").symlink_to("../outside", target_is_directory=True)
    (imgs / "link-in.png").symlink_to(pics[1][0].name)
    return {"imgs": imgs, "pics": pics, "secret": secret, "question": pics[0][1],
            "escapes": ESCAPES + [(str(secret), str(outside / "none.png"))]}


# -- no services ------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_paths_are_resolved_and_confined_to_the_images_dir(tmp_path: Path) -> None:
    d = layout(tmp_path)
    imgs = d["imgs"].resolve()
    assert confined(imgs, "p00000.png") == imgs / "p00000.png"
    assert confined(imgs, "sub/../p00000.png") == imgs / "p00000.png"
    assert confined(imgs, "link-in.png") == imgs / "p00001.png"  # a symlink that stays inside is fine
    for outside, missing in d["escapes"]:
        assert confined(imgs, outside) is None and confined(imgs, missing) is None, outside
    assert confined(imgs, ".") is None and confined(imgs, "bad\0name") is None


@pytest.mark.timeout(60)
def test_a_400_mb_file_is_refused_from_its_size_without_being_read(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    with big.open("wb") as f:  # sparse: 400 MB that take no disk
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(400 * 1024 * 1024)
    tracemalloc.start()
    with pytest.raises(InvalidImage) as info:
        read_image(big, 20 * 1024 * 1024)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert info.value.code == "image_too_large" and "419430400 bytes" in info.value.message
    assert peak < 1024 * 1024, peak
    # A file that grows past the limit after the size check is cut at limit + 1 bytes
    with big.open("rb") as f:
        with pytest.raises(InvalidImage) as grown:
            read_image(f, 1000)
        assert f.tell() == 1001 and grown.value.code == "image_too_large"


@pytest.mark.timeout(60)
def test_a_deeply_nested_line_is_refused_by_line_not_parsed(tmp_path: Path) -> None:
    path = tmp_path / "deep.jsonl"
    deep = '{"custom_id": "deep", "image": "a.png", "question": "q", "params": ' + "[" * 100_000 + "]" * 100_000 + "}"
    brackets_in_text = json.dumps({"custom_id": "[[[" * 40, "image": "a.png", "question": "{{{" * 40})
    path.write_text('{"custom_id": "ok", "image": "a.png", "question": "q"}\n' + deep + "\n" + brackets_in_text + "\n",
                    encoding="utf-8")
    total, problems = validate(JsonlSource(path))
    assert (total, problems) == (3, ["line 2: nested deeper than 32 levels"])
    csv_path = tmp_path / "deep.csv"
    csv_path.write_text("custom_id,image,question,params\nx,a.png,q," + "[" * 50_000 + "]" * 50_000 + "\n")
    (rec,) = list(CsvSource(csv_path).records())
    assert isinstance(rec.params, str) and rec.problem is None  # left as text: that line fails invalid_params


# -- against Redis and S3 (no worker: the lines stay queued) -----------------------------------------------

def results_by_id(store: BulkStore, bulk_id: str) -> dict[str, dict[str, Any]]:
    return {x["custom_id"]: x for x in store.results(bulk_id)}


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_escaping_paths_are_refused_alike_and_nothing_outside_is_uploaded(idle_store: BulkStore,
                                                                         tmp_path: Path) -> None:
    # Given an images dir, a secret picture outside it, and lines that try every way out
    d = layout(tmp_path)
    imgs = d["imgs"]
    os.mkfifo(imgs / "pipe.png")
    rows = [{"custom_id": "good", "image": "p00000.png", "question": d["question"]},
            {"custom_id": "link-in", "image": "link-in.png", "question": d["question"]},
            {"custom_id": "fifo", "image": "pipe.png", "question": d["question"]}]
    for n, (outside, missing) in enumerate(d["escapes"]):
        rows += [{"custom_id": f"out-{n}", "image": outside, "question": d["question"]},
                 {"custom_id": f"missing-{n}", "image": missing, "question": d["question"]}]
    manifest = write_jsonl(tmp_path / "in.jsonl", rows)
    # When they are submitted with --images-dir
    bulk = idle_store.submit(open_source(manifest, images_dir=imgs))
    lines = results_by_id(idle_store, bulk.id)
    # Then the lines inside are queued, a FIFO is refused without hanging the submitter
    assert lines["good"]["status"] == lines["link-in"]["status"] == "queued"
    assert lines["fifo"]["error"]["code"] == "file_not_readable"
    # And an escape to an existing file reads exactly like one to a missing file (no existence oracle)
    for n, (outside, missing) in enumerate(d["escapes"]):
        seen, absent = lines[f"out-{n}"]["error"], lines[f"missing-{n}"]["error"]
        assert seen["code"] == absent["code"] == "image_not_found", (outside, seen)
        assert seen["message"].replace(outside, "NAME") == absent["message"].replace(missing, "NAME"), (seen, absent)
        assert str(imgs.resolve()) in seen["message"] and repr(outside) in seen["message"]
    # And the secret picture never reached the bucket
    images = idle_store.client.images
    assert not images.exists(images.key_for(d["secret"].read_bytes()))
    assert bulk.rejected == 1 + 2 * len(d["escapes"])
    idle_store.cancel(bulk.id)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_400_mb_picture_does_not_blow_up_the_cli(idle_settings: Settings, idle_store: BulkStore,
                                                   tmp_path: Path) -> None:
    # Given a manifest naming a 400 MB (sparse) file and one good picture
    pics = draw_pictures(tmp_path, 1, seed=517)
    with (tmp_path / "huge.png").open("wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(400 * 1024 * 1024)
    manifest = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "huge", "image": "huge.png", "question": "q"},
                                                   {"custom_id": "ok", "image": pics[0][0].name, "question": "q"}])
    # When the real CLI submits it, under a parent that reports the child's peak memory
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TUWEN_")}, **idle_settings.to_env()}
    cmd = [sys.executable, "-m", "tuwen.pipeline.cli", "bulk", "submit", str(manifest), "--no-wait", "--json"]
    probe = ("import resource, subprocess, sys\n"
             f"rc = subprocess.run({cmd!r}, stdout=subprocess.DEVNULL).returncode\n"
             "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=150, check=True)
    rc, peak_kb = (int(x) for x in out.stdout.split())
    # Then the file was refused from its size, and the process stayed far below 400 MB
    assert rc == 0, out.stderr
    assert peak_kb < 200 * 1024, peak_kb  # it was 481 MB when the whole file was read
    bulk = next(b for b in idle_store.recent(50) if b.input == str(manifest))
    lines = results_by_id(idle_store, bulk.id)
    assert lines["huge"]["error"]["code"] == "image_too_large" and lines["ok"]["status"] == "queued"
    idle_store.cancel(bulk.id)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_documented_example_works_as_written(idle_settings: Settings, idle_store: BulkStore,
                                                 tmp_path: Path) -> None:
    # Given docs/bulk.md's JSONL example next to a pages/ folder, as the page describes
    doc = (REPO / "docs" / "bulk.md").read_text(encoding="utf-8")
    example = re.search(r"```jsonl\n(.*?)```", doc, re.S)
    command = re.search(r"^tuwen bulk submit questions\.jsonl[^#\n]*", doc, re.M)
    assert example and command
    rows = [json.loads(x) for x in example.group(1).splitlines()]
    for row in rows:
        if "pdf" in row:  # a PDF of 9 worksheet pages, of which the line asks pages 3-5 and 9
            (tmp_path / row["pdf"]).write_bytes(scene_pdf([e.image for e in scenes(520, PAGE_KINDS * 3)]))
        elif not row["image"].startswith("images/"):
            pic = draw_pictures(tmp_path / "draw", 1, seed=518)[0][0]
            (tmp_path / row["image"]).parent.mkdir(parents=True, exist_ok=True)
            pic.rename(tmp_path / row["image"])
    (tmp_path / "questions.jsonl").write_text(example.group(1), encoding="utf-8")
    # When the documented command runs there
    args = shlex.split(command.group(0))[1:]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        res = runner.invoke(cli(), [*args, "--no-wait", "--json"], env=idle_settings.to_env())
    finally:
        os.chdir(cwd)
    # Then every line naming a file is queued; only the made-up key is not found, with the path looked at
    assert res.exit_code == 0, res.output
    lines = list(idle_store.results(json.loads(res.stdout)["id"]))
    assert [x["status"] for x in lines] == ["queued", "queued", "failed"] + ["queued"] * 4, lines
    assert [x.get("page") for x in lines[3:]] == [3, 4, 5, 9], lines
    assert lines[2]["error"]["code"] == "image_not_found"
    assert str(tmp_path.resolve() / rows[2]["image"]) in lines[2]["error"]["message"]
    idle_store.cancel(json.loads(res.stdout)["id"])


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_deeply_nested_line_fails_the_bulk_instead_of_leaving_it_validating(
        idle_settings: Settings, idle_store: BulkStore, tmp_path: Path) -> None:
    pics = draw_pictures(tmp_path, 1, seed=519)
    manifest = tmp_path / "deep.jsonl"
    manifest.write_text(json.dumps({"custom_id": "ok", "image": pics[0][0].name, "question": "q"}) + "\n"
                        + '{"custom_id": "deep", "params": ' + "[" * 100_000 + "]" * 100_000 + "}\n", encoding="utf-8")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TUWEN_")}, **idle_settings.to_env()}
    out = subprocess.run([sys.executable, "-m", "tuwen.pipeline.cli", "bulk", "submit", str(manifest), "--no-wait"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=90)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "line 2: nested deeper than 32 levels" in out.stderr
    (bulk,) = [b for b in idle_store.recent(50) if b.input == str(manifest)]
    assert bulk.state == BulkState.failed and bulk.errors == ["line 2: nested deeper than 32 levels"]
    assert idle_store.redis.llen(idle_settings.bulk_queue) == 0
