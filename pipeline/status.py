"""``tuwen status``: queue depths, live workers, jobs per minute, failures by code — one screen."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.table import Table

from tuwen.pipeline import registry, stats
from tuwen.pipeline.app import make_celery
from tuwen.pipeline.jobs import connect
from tuwen.pipeline.settings import Settings


def queue_depths(settings: Settings) -> dict[str, int]:
    queues = [settings.interactive_queue, settings.bulk_queue]
    if settings.broker == settings.redis_url:
        client = connect(settings.redis_url)
        return {q: int(client.llen(q)) for q in queues}
    app = make_celery(settings)
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        return {q: int(channel.queue_declare(q, passive=True).message_count) for q in queues}


def collect(settings: Settings, minutes: int = 10) -> dict[str, Any]:
    client = connect(settings.redis_url)
    return {
        "queues": queue_depths(settings),
        "workers": registry.live_workers(client),
        "stats": stats.summary(client, minutes),
        "at": time.time(),
    }


def render(snapshot: dict[str, Any]) -> Group:
    queues = Table(title="queues", title_justify="left")
    queues.add_column("queue")
    queues.add_column("waiting", justify="right")
    for name, depth in snapshot["queues"].items():
        queues.add_row(name, str(depth))
    workers = Table(title=f"workers ({len(snapshot['workers'])} live)", title_justify="left")
    for col in ("name", "model", "device", "queues", "batch"):
        workers.add_column(col)
    for w in snapshot["workers"]:
        workers.add_row(w["name"], w.get("model_id", "?"), w.get("device", "?"), ",".join(w.get("queues", [])),
                        str(w.get("max_batch_size", "?")))
    per_minute = Table(title="jobs per minute", title_justify="left")
    for col in ("minute (UTC)", "succeeded", "failed", "cancelled"):
        per_minute.add_column(col, justify="right")
    for row in snapshot["stats"]["minutes"]:
        per_minute.add_row(time.strftime("%H:%M", time.gmtime(row["minute"])), str(row["succeeded"]),
                           str(row["failed"]), str(row["cancelled"]))
    codes = Table(title="failures by code", title_justify="left")
    codes.add_column("code")
    codes.add_column("jobs", justify="right")
    for code, n in sorted(snapshot["stats"]["codes"].items(), key=lambda kv: -kv[1]):
        codes.add_row(code, str(n))
    return Group(queues, workers, per_minute, codes)
