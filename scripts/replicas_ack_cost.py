"""What waiting for a replica costs a submit: ``Client.submit`` latency on a Redis Sentinel deployment
(a primary, two replicas, three sentinels, all on this machine) with ``TUWEN_REDIS_REPLICAS_ACK`` 0 and 1,
interleaved in rounds, with the spread. Usage, from the repository root:
``python -m scripts.replicas_ack_cost [submits per round]``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.faults import SentinelRedis
from tuwen.pipeline.client import Client
from tuwen.pipeline.settings import Settings
from tuwen.workers.demo.samples import load_samples


def main(per_round: int = 200, rounds: int = 3) -> None:
    sample = load_samples()[0]
    picture = sample.path.read_bytes()
    with SentinelRedis() as deployment, tempfile.TemporaryDirectory() as tmp:
        clients = {ack: Client(Settings(redis_url=deployment.url, storage_dir=Path(tmp), redis_replicas_ack=ack,
                                        answer_cache=False)) for ack in (0, 1)}
        for client in clients.values():  # warm: connections, the stored picture
            client.submit(picture, sample.question)
        medians: dict[int, list[float]] = {0: [], 1: []}
        p99: dict[int, list[float]] = {0: [], 1: []}
        for _ in range(rounds):
            for ack, client in clients.items():
                times = []
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    client.submit(picture, sample.question)
                    times.append((time.perf_counter() - t0) * 1000)
                medians[ack].append(statistics.median(times))
                p99[ack].append(sorted(times)[int(0.99 * len(times)) - 1])
        for ack in (0, 1):
            print(f"replicas_ack={ack}: submit p50 {statistics.median(medians[ack]):.2f} ms "
                  f"({min(medians[ack]):.2f}–{max(medians[ack]):.2f} over {rounds} rounds of {per_round}), "
                  f"p99 {statistics.median(p99[ack]):.2f} ms ({min(p99[ack]):.2f}–{max(p99[ack]):.2f})")
        ratios = [b / a for a, b in zip(medians[0], medians[1])]
        print(f"p50 with a replica's ack / without: {statistics.median(ratios):.2f}× "
              f"({min(ratios):.2f}–{max(ratios):.2f})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
