"""``tuwen status``: queues with their live workers, workers, jobs per minute, failures by code and
refused messages — one screen. An unreachable Redis or broker raises ``Unavailable`` (exit status 3)."""

from __future__ import annotations

import time
from typing import Any

import redis
from rich.console import Group
from rich.markup import escape
from rich.table import Table

from tuwen.pipeline import deadletter, registry, stats
from tuwen.pipeline.app import make_celery
from tuwen.pipeline.jobs import connect, outage, redis_errors
from tuwen.pipeline.settings import Settings


def queue_depths(settings: Settings, client: redis.Redis) -> dict[str, int]:
    queues = [settings.interactive_queue, settings.bulk_queue]
    if settings.broker == settings.redis_url:
        return {q: int(client.llen(q)) for q in queues}
    if settings.broker.startswith(("redis://", "rediss://")):
        broker = connect(settings.broker)
        try:
            return {q: int(broker.llen(q)) for q in queues}
        finally:
            broker.close()
    app = make_celery(settings)
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1)
            channel = conn.default_channel
            return {q: int(channel.queue_declare(q, passive=True).message_count) for q in queues}
    except Exception as exc:  # noqa: BLE001 - kombu raises many connection error types
        raise outage("the broker is not reachable", exc) from exc
    finally:
        app.close()


def collect(settings: Settings, minutes: int = 10) -> dict[str, Any]:
    client = connect(settings.redis_url)
    try:
        with redis_errors():
            depths = queue_depths(settings, client)
            workers = registry.live_workers(client)
            return {
                "queues": depths,
                "consumers": registry.consumers(workers, depths),
                "workers": workers,
                "stats": stats.summary(client, minutes),
                "dead_letters": {"count": deadletter.size(client), "recent": deadletter.recent(client, 5)},
                "at": time.time(),
            }
    finally:
        client.close()


def render(snapshot: dict[str, Any]) -> Group:
    queues = Table(title="queues", title_justify="left")
    for col in ("queue", "waiting", "live workers"):
        queues.add_column(col, justify="right" if col == "waiting" else "left")
    for name, depth in snapshot["queues"].items():
        consumers = snapshot["consumers"].get(name) or []
        queues.add_row(escape(name), str(depth), escape(", ".join(consumers)) if consumers else "[red]none[/red]")
    workers = Table(title=f"workers ({len(snapshot['workers'])} live)", title_justify="left")
    for col in ("name", "model", "device", "queues", "batch", "holding"):
        workers.add_column(col)
    for w in snapshot["workers"]:
        name = escape(w["name"]) + (" (stopping)" if w.get("stopping") else "")
        workers.add_row(name, escape(str(w.get("model_id", "?"))), escape(str(w.get("device", "?"))),
                        escape(",".join(w.get("queues", []))), str(w.get("max_batch_size", "?")),
                        str(len(w.get("held", []))))
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
        codes.add_row(escape(code), str(n))
    dead = snapshot["dead_letters"]
    refused = Table(title=f"refused messages ({dead['count']} in {deadletter.KEY})", title_justify="left")
    for col in ("time (UTC)", "queue", "reason", "worker", "message"):
        refused.add_column(col)
    for e in dead["recent"]:
        refused.add_row(time.strftime("%m-%d %H:%M:%S", time.gmtime(e["at"])), escape(e["queue"]),
                        escape(e["reason"]), escape(e["worker"]), escape(e["message"][:60]))
    return Group(queues, workers, per_minute, codes, refused)
