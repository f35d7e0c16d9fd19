"""What one Redis primary carries: Redis commands, bytes and CPU per job, measured, and this machine's ceiling.

A private redis-server, a real worker with the null model (``TUWEN_HOOK_NULL_MODEL``: every Redis and queue
step of a job, no model), and ``Client``: ``jobs`` jobs submitted (the worker paused, so submission is
measured alone), then answered (the worker's side), then read back (``Client.get_many``). ``INFO
commandstats`` and ``INFO stats`` are read before and after each phase: commands, Redis CPU microseconds
(``usec``) and network bytes per job. The ceiling: ``redis-benchmark`` on the same server measures what one
command costs beyond its own execution at saturation (syscalls, parsing), alone and 8 to a round trip; a
job's commands plus that overhead give the jobs/s one Redis core carries, between the two. Usage, from the
repository root:

    python -m scripts.redis_capacity [jobs]
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis
from tuwen.pipeline.settings import Settings
from tuwen.workers.bench.process import WorkerProcess
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.serve.hooks import Hooks


def snapshot(r: redis.Redis) -> dict[str, Any]:
    stats = r.info("stats")
    commands = {k.removeprefix("cmdstat_"): v for k, v in r.info("commandstats").items()}
    return {"calls": Counter({k: v["calls"] for k, v in commands.items()}),
            "usec": Counter({k: v["usec"] for k, v in commands.items()}),
            "in": stats["total_net_input_bytes"], "out": stats["total_net_output_bytes"]}


def delta(before: dict[str, Any], after: dict[str, Any], jobs: int) -> dict[str, Any]:
    calls, usec = after["calls"] - before["calls"], after["usec"] - before["usec"]
    return {"calls": sum(calls.values()) / jobs, "usec": sum(usec.values()) / jobs,
            "bytes_in": (after["in"] - before["in"]) / jobs, "bytes_out": (after["out"] - before["out"]) / jobs,
            "by_command": {k: round(v / jobs, 2) for k, v in calls.most_common(12)}}


def overhead_us(port: int, r: redis.Redis, pipeline: int) -> float:
    """Microseconds a command costs Redis beyond its ``usec`` at saturation: 50 clients, ``pipeline`` commands
    per round trip (1: every command its own; tuwen sends most of a job's commands in pipelines and scripts)."""
    r.config_resetstat()
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-c", "50", "-n", "400000", "-P", str(pipeline),
                          "-t", "hset", "-q"], capture_output=True, text=True, timeout=300).stdout
    rate = float(re.findall(r"([\d.]+) requests per second", out)[-1])
    stat = r.info("commandstats")["cmdstat_hset"]
    return 1e6 / rate - stat["usec_per_call"]


def main(jobs: int = 1000) -> None:
    samples = load_samples()
    with LocalRedis() as server, tempfile.TemporaryDirectory() as tmp:
        settings = Settings(redis_url=server.url, storage_dir=Path(tmp) / "storage", answer_cache=False,
                            max_batch_size=64)
        r = redis.Redis(port=server.port, decode_responses=True)
        worker = WorkerProcess(settings, "capacity@localhost", Path(tmp) / "worker.log", hooks=Hooks(null_model=True))
        worker.start().wait_ready(180)
        client = Client(settings)
        client.wait(client.submit(samples[0].path.read_bytes(), samples[0].question).id, 60)  # warm
        pictures = [s.path.read_bytes() for s in samples]
        worker.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        phases = {}
        before = snapshot(r)
        ids = [client.submit(pictures[i % len(pictures)], samples[i % len(samples)].question).id for i in range(jobs)]
        phases["submit"] = delta(before, mid := snapshot(r), jobs)
        worker.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        results = client.wait_many(ids, timeout=600)
        assert all(x.status.value == "succeeded" for x in results.values()), Counter(x.status for x in results.values())
        phases["answer (worker)"] = delta(mid, after := snapshot(r), jobs)
        client.jobs.get_many(ids)
        phases["read (get_many)"] = delta(after, snapshot(r), jobs)
        worker.stop()
        client.close()
        overheads = {p: overhead_us(server.port, r, p) for p in (1, 8)}
    total_calls = sum(p["calls"] for p in phases.values())
    total_usec = sum(p["usec"] for p in phases.values())
    print(f"{jobs} jobs, null model; per job:")
    for name, p in phases.items():
        print(f"  {name:16} {p['calls']:6.1f} commands, {p['usec']:7.1f} µs Redis CPU, {p['bytes_in']:8.0f} B in, "
              f"{p['bytes_out']:8.0f} B out; {p['by_command']}")
    print(f"  {'total':16} {total_calls:6.1f} commands, {total_usec:7.1f} µs Redis CPU")
    for p, overhead in overheads.items():
        print(f"redis-benchmark, {p} command(s) per round trip: {overhead:.1f} µs per command beyond its execution "
              f"(HSET, 50 clients): ceiling {1e6 / (total_usec + total_calls * overhead):.0f} jobs/s on one core")
    print(f"counting command execution alone: {1e6 / total_usec:.0f} jobs/s")

if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
