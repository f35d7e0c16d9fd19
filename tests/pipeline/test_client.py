"""``Client.submit`` takes a picture as bytes, a path or a binary file, and never reads past the limit."""

from __future__ import annotations

import io
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tuwen.workers.bench.process import WorkerProcess
from tuwen.workers.demo.samples import load_samples

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def idle_client(pipeline_settings: Settings) -> Iterator[Client]:
    """A client on a queue no worker reads."""
    client = Client(pipeline_settings.model_copy(update={"interactive_queue": f"inputs-{uuid.uuid4().hex[:8]}"}))
    yield client
    client.close()


def test_submit_accepts_bytes_a_path_or_a_binary_file(idle_client: Client) -> None:
    sample = load_samples()[3]
    data = sample.path.read_bytes()
    with sample.path.open("rb") as opened:
        forms = [data, bytearray(data), memoryview(data), str(sample.path), sample.path, opened, io.BytesIO(data)]
        jobs = [idle_client.submit(form, sample.question) for form in forms]  # type: ignore[arg-type]
    assert {j.status for j in jobs} == {JobStatus.queued}
    assert {j.image_key for j in jobs} == {idle_client.images.key_for(data)}


def test_what_is_not_a_picture_source_is_refused_with_a_code(idle_client: Client, tmp_path: Path) -> None:
    sample = load_samples()[3]
    queued = idle_client.jobs.redis.llen(idle_client.settings.interactive_queue)
    big = tmp_path / "big.png"
    with big.open("wb") as f:
        f.truncate(idle_client.settings.max_image_bytes * 20)  # sparse: refused from its size, never read
    with sample.path.open("r", encoding="latin-1") as text_mode:
        cases = {"text-mode file": (text_mode, "invalid_image"), "a number": (12345, "invalid_image"),
                 "missing path": (tmp_path / "nope.png", "file_not_found"), "a folder": (tmp_path, "file_not_readable"),
                 "too large": (big, "image_too_large"), "empty file": (io.BytesIO(b""), "empty_image")}
        for name, (image, code) in cases.items():
            with pytest.raises(InvalidInput) as info:
                idle_client.submit(image, sample.question)  # type: ignore[arg-type]
            assert info.value.code == code, (name, info.value.message)
    assert idle_client.jobs.redis.llen(idle_client.settings.interactive_queue) == queued


def test_the_documented_snippet_runs_as_written(worker: WorkerProcess, pipeline_settings: Settings,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """docs/client.md's first snippet, from the repository's folder with the settings ``tuwen serve`` would
    give it (here the session worker's), reads a bundled picture and prints the answer with its fact."""
    doc = (REPO / "docs" / "client.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", doc, re.S)
    assert block is not None and "workers/demo/samples/count-photo.png" in block.group(1)
    for name in [k for k in os.environ if k.startswith("TUWEN_")]:
        monkeypatch.delenv(name)
    for name, value in pipeline_settings.to_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(REPO)
    exec(compile(block.group(1), "docs/client.md", "exec", dont_inherit=True), {})  # noqa: S102 - the docs' own code
    printed = capsys.readouterr().out
    assert printed.startswith("succeeded ") and "4个" in printed, printed
