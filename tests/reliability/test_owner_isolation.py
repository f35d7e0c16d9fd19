"""Owners are isolated: a stored picture's key (a content hash) grants nothing to an owner who never
uploaded those bytes, in jobs, bulk lines, reports and deletion alike."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tuwen.pipeline.bulk.manifest import open_source
from tuwen.pipeline.bulk.report import thumbnail, write_report
from tuwen.pipeline.bulk.store import BulkStore
from tuwen.pipeline.client import Client, StoredImage
from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.jobs import IMAGE_OWNERS
from tuwen.pipeline.settings import Settings
from tests.bulk.conftest import write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def unique_png(seed: int) -> bytes:
    img = Image.new("RGB", (64, 48), (seed % 256, (seed * 7) % 256, 200))
    img.putpixel((seed % 64, 0), (1, 2, 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def client(pipeline_settings: Settings) -> Iterator[Client]:
    """A client on queues no worker reads: jobs stay queued, lines stay countable."""
    tag = uuid.uuid4().hex[:8]
    c = Client(pipeline_settings.model_copy(update={"interactive_queue": f"own-i-{tag}", "bulk_queue": f"own-b-{tag}"}))
    yield c
    c.close()


def submit_lines(client: Client, tmp_path: Path, owner: str, keys: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    manifest = write_jsonl(tmp_path / f"{owner}-{uuid.uuid4().hex[:6]}.jsonl",
                           [{"custom_id": cid, "image": key, "question": "图形是什么颜色的？"} for cid, key in keys.items()])
    store = BulkStore(client)
    bulk = store.submit(open_source(manifest), owner=owner)
    return bulk, {x["custom_id"]: x for x in store.results(bulk.id)}


def test_a_bulk_line_cannot_use_another_owners_picture(client: Client, tmp_path: Path) -> None:
    # Given school-a's uploaded picture, school-b's own upload, and a key nobody ever stored
    theirs, mine = unique_png(uuid.uuid4().int), unique_png(uuid.uuid4().int)
    a_job = client.submit(theirs, "图中有几个圆形？", owner="school-a")
    b_key = client.store_image(mine, owner="school-b")
    never = "images/" + hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    assert a_job.image_key is not None
    # When school-b's bulk names all three keys
    bulk, lines = submit_lines(client, tmp_path, "school-b", {"theirs": a_job.image_key, "never": never,
                                                                 "mine": b_key})
    # Then school-a's key is refused exactly like a key that does not exist; school-b's own one works
    assert lines["mine"]["status"] == "queued"
    refused, absent = lines["theirs"]["error"], lines["never"]["error"]
    assert refused["code"] == absent["code"] == "image_not_found"
    assert refused["message"].replace(a_job.image_key, "KEY") == absent["message"].replace(never, "KEY")
    assert lines["theirs"]["image_key"] is None
    # And school-b's report embeds its own picture only
    page_path = tmp_path / "report.html"
    write_report(page_path, BulkStore(client).refresh(bulk.id), BulkStore(client).results(bulk.id), client.images)
    page = page_path.read_text(encoding="utf-8")
    assert page.count("data:image/") == 1 and thumbnail(theirs) not in page and thumbnail(mine) in page
    # And school-a's delete still removes its picture: no job of school-b's holds on to it
    assert client.delete(a_job.id, owner="school-a")
    assert not client.images.exists(a_job.image_key)
    assert not client.jobs.redis.exists(IMAGE_OWNERS + a_job.image_key)


def test_a_claim_lasts_while_the_owner_has_jobs_on_the_picture(client: Client, tmp_path: Path) -> None:
    # Given the same bytes uploaded by two owners: school-a twice, school-b once
    shared = unique_png(uuid.uuid4().int)
    a1, a2 = (client.submit(shared, q, owner="school-a") for q in ("图中有几个圆形？", "图形是什么颜色的？"))
    b1 = client.submit(shared, "图中有几个圆形？", owner="school-b")
    key = a1.image_key
    assert key is not None and key == a2.image_key == b1.image_key
    ttl = client.jobs.redis.ttl(IMAGE_OWNERS + key)
    assert ttl >= client.settings.image_ttl_days * 86400  # at least the picture's life
    # When school-a deletes one of its jobs, its claim stays; when it deletes the last, the claim goes
    assert client.delete(a1.id, owner="school-a")
    assert client.owns_image(key, "school-a") and client.owns_image(key, "school-b")
    assert client.delete(a2.id, owner="school-a")
    assert not client.owns_image(key, "school-a") and client.owns_image(key, "school-b")
    # Then school-b's job keeps the picture, and only school-b may still name it
    assert client.images.exists(key)
    _, a_lines = submit_lines(client, tmp_path, "school-a", {"again": key})
    _, b_lines = submit_lines(client, tmp_path, "school-b", {"again": key})
    assert a_lines["again"]["error"]["code"] == "image_not_found" and b_lines["again"]["status"] == "queued"


def test_a_job_names_a_stored_picture_only_for_the_owner_who_stored_it(client: Client) -> None:
    # Given school-a's stored picture and a key nobody ever stored
    key = client.store_image(unique_png(uuid.uuid4().int), owner="school-a")
    never = "images/" + hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    # When school-a prepares a job on it by key, then it gets one (its params, max_new_tokens on top)
    mine = client.prepare(StoredImage(key), "图形是什么颜色的？", owner="school-a",
                          params={"temperature": 0.5, "seed": 3, "max_new_tokens": 4}, max_new_tokens=9)
    assert mine.image_key == key
    assert (mine.params.temperature, mine.params.seed, mine.params.max_new_tokens) == (0.5, 3, 9)
    # And school-b naming it is refused exactly like the key nobody stored, and nothing is recorded
    refusals = []
    for name in (key, never):
        with pytest.raises(InvalidInput) as info:
            client.submit(StoredImage(name), "图形是什么颜色的？", owner="school-b")
        refusals.append((info.value.code, info.value.message.replace(name, "KEY")))
    assert refusals[0] == refusals[1] and refusals[0][0] == "image_not_found"
    assert not client.owns_image(key, "school-b")
    # And parameters that are not a mapping are refused with a code, before anything is stored
    with pytest.raises(InvalidInput) as bad:
        client.prepare(StoredImage(key), "图形是什么颜色的？", owner="school-a", params=["x"])  # type: ignore[arg-type]
    assert bad.value.code == "invalid_params"
