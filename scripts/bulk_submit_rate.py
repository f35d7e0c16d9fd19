"""Bulk submission of already-stored pictures, measured alone: a private Redis and local storage, 64 stored
pictures, a 5,000-line input naming them, submitted as a fresh bulk 3 times onto queues no worker reads.
Prints each run's lines/s and the min–max (docs/performance.md, row e1).

    .venv/bin/python scripts/bulk_submit_rate.py [--lines 5000] [--runs 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis
from tuwen.pipeline.settings import Settings
from tuwen.workers.bench.bulk import job_ids, stored_manifest, submit_rate
from tuwen.workers.bench.fleet import noise_pictures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pictures", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tuwen-submit-") as tmp, LocalRedis() as redis:
        settings = Settings(redis_url=redis.url, storage_dir=Path(tmp) / "storage", interactive_queue="idle-i",
                            bulk_queue="idle-b")
        client = Client(settings)
        try:
            keys = [client.store_image(p) for p in noise_pictures(args.pictures, seed=1)]
            manifest = stored_manifest(Path(tmp) / "in.jsonl", keys, args.lines, "line")
            rates = []
            for run in range(args.runs):
                rate, bulk = submit_rate(client, manifest, args.lines)
                queued = client.jobs.redis.llen(settings.bulk_queue)
                assert bulk.queued == args.lines and len(job_ids(client, bulk)) == args.lines, bulk
                print(f"run {run + 1}: {rate:.0f} lines/s ({bulk.queued} lines queued, {queued} messages in all)")
                rates.append(rate)
            print(f"{args.lines} lines, {args.runs} runs: {min(rates):.0f}–{max(rates):.0f} lines/s")
        finally:
            client.close()


if __name__ == "__main__":
    main()
