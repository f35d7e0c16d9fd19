"""Row e1 of ``tuwen bench`` (and scripts/bulk_submit_rate.py): a bulk whose lines name pictures the owner
stored before, submitted as ``tuwen bulk submit`` does (``BulkStore.submit``: the input validated, every
line checked, its job recorded and published, the line recorded), timed from the call to its return. Beside
it, e0 is the upload-bound rate: a new picture stored per job."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tuwen.pipeline.bulk.manifest import open_source
from tuwen.pipeline.bulk.model import Bulk
from tuwen.pipeline.bulk.store import BulkStore
from tuwen.pipeline.client import Client

QUESTIONS = ("图中有什么？", "图中有几个圆形？", "图中是什么颜色？")


def stored_manifest(path: Path, keys: list[str], lines: int, tag: str) -> Path:
    """A JSONL input of ``lines`` lines over the stored pictures ``keys`` (round robin)."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(lines):
            row = {"custom_id": f"{tag}-{i}", "image": keys[i % len(keys)], "question": QUESTIONS[i % len(QUESTIONS)]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def submit_rate(client: Client, manifest: Path, lines: int) -> tuple[float, Bulk]:
    """Submit ``manifest`` as a fresh bulk; returns (lines/s, the bulk)."""
    store = BulkStore(client)
    t0 = time.perf_counter()
    bulk = store.submit(open_source(manifest), fresh=True)
    return lines / (time.perf_counter() - t0), bulk


def job_ids(client: Client, bulk: Bulk) -> list[str]:
    """The jobs of the bulk's lines, in input order."""
    return [line["job_id"] for line in BulkStore(client).results(bulk.id) if line["job_id"]]
