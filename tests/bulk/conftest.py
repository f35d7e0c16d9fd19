"""Helpers for the bulk tests: input files, drawn pictures, a bulk store, an idle queue, Chromium."""

from __future__ import annotations

import json
import random
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tuwen.pipeline.bulk.store import BulkStore
from tuwen.pipeline.client import Client
from tuwen.pipeline.settings import Settings
from tests.conftest import need
from tuwen.workers.demo.scenes import draw_training_example


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def draw_pictures(directory: Path, n: int, seed: int, kinds: tuple[str, ...] = ("shape", "colour", "count")
                  ) -> list[tuple[Path, str]]:
    """``n`` distinct demo pictures (distinct, so the answer cache cannot answer them) with questions."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ex = draw_training_example(rng, kinds[i % len(kinds)])
        path = directory / f"p{i:05d}.png"
        ex.image.save(path)
        out.append((path, ex.question))
    return out


@pytest.fixture
def store(pipeline_settings: Settings) -> Iterator[BulkStore]:
    """A bulk store on the session worker's queues."""
    client = Client(pipeline_settings)
    yield BulkStore(client)
    client.close()


@pytest.fixture
def idle_settings(pipeline_settings: Settings) -> Settings:
    """Queues no worker reads: what is published there stays there, countable."""
    tag = uuid.uuid4().hex[:8]
    return pipeline_settings.model_copy(update={"interactive_queue": f"idle-i-{tag}", "bulk_queue": f"idle-b-{tag}"})


@pytest.fixture
def idle_store(idle_settings: Settings) -> Iterator[BulkStore]:
    client = Client(idle_settings)
    yield BulkStore(client)
    client.close()


@pytest.fixture(scope="session")
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    need(exe is not None, "chromium is not installed (Debian: apt-get install chromium)")
    assert exe is not None
    return exe


def cli() -> Any:
    """``tuwen bulk …`` and ``tuwen eval`` as pipeline/cli.py mounts them, in this process."""
    import typer

    from tuwen.pipeline.bulk.cli import bulk_app, eval_command

    root = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    root.add_typer(bulk_app, name="bulk")
    root.command("eval")(eval_command)
    return root
