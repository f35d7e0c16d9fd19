"""What the failure drills share: workers killed and started again, each waited for by its own pid, and
an observer that does not trust the system's own bookkeeping. Helpers, not tests.

* ``Lives`` — one worker name, its processes one after another. ``start`` returns once the heartbeat
  carries the new process's pid (the killed one's heartbeat lives on for ``registry.TTL_S``);
  ``kill_when_running`` kills only once a job claimed by *that* process is running.
* ``executions`` — how many answers the model produced per job, from the workers' own log lines
  (``answered job <id>``, one per answer, written before its result), not from the job store.
* ``outcome`` — waits for the jobs and checks every answer against its picture's known facts.
* ``Producer`` — a client submitting without pause across a fault, each id kept with when it was handed out.
* ``GatewayProcess`` — ``tuwen gateway serve`` as a child process that a drill can SIGKILL.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import Unavailable
from tuwen.pipeline.jobs import connect
from tuwen.pipeline.registry import live_workers
from tuwen.pipeline.schema import JobResult, JobStatus
from tuwen.pipeline.settings import Settings
from tuwen.workers.demo.samples import Sample, load_samples
from tuwen.workers.demo.scenes import has_facts
from tuwen.workers.serve.hooks import Hooks
from tuwen.workers.bench.process import WorkerProcess

from tests.faults import ResultWrites
from tests.ports import free_port

ANSWERED = re.compile(r"answered job (\S+)")


def submit_samples(client: Client, n: int, start: int = 0) -> dict[str, Sample]:
    """Submit ``n`` jobs over the bundled samples (pictures whose answers are known); ``{job id: sample}``."""
    samples = load_samples()
    jobs = {}
    for i in range(start, start + n):
        sample = samples[i % len(samples)]
        jobs[client.submit(sample.path.read_bytes(), sample.question).id] = sample
    return jobs


def executions(logs: Iterable[Path]) -> Counter[str]:
    """Answers the model produced per job, counted from the worker logs (a killed process's log stays)."""
    counts: Counter[str] = Counter()
    for log in logs:
        if log.exists():
            counts.update(ANSWERED.findall(log.read_text(errors="replace")))
    return counts


def wait_for_own_heartbeat(proc: WorkerProcess, timeout: float) -> None:
    """Block until the worker's heartbeat carries this process's pid (a name alone may be a dead one's)."""
    client = connect(proc.settings.redis_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert proc.proc is not None and proc.alive, f"worker exited early; log:\n{proc.log_tail()}"
            if any(w["name"] == proc.hostname and w.get("pid") == proc.proc.pid for w in live_workers(client)):
                return
            assert time.monotonic() < deadline, f"worker not ready after {timeout:.0f}s:\n{proc.log_tail()}"
            time.sleep(0.1)
    finally:
        client.close()


class Lives:
    """One worker name and its processes, one after another (each with its own log)."""

    def __init__(self, settings: Settings, name: str, tmp: Path, hooks: Hooks | None = None,
                 role: str = "picture") -> None:
        self.settings, self.name, self.tmp, self.hooks, self.role = settings, name, tmp, hooks, role
        self.procs: list[WorkerProcess] = []
        self.spawned_at = 0.0  #: wall clock before the current process started (claims after it are its own)
        self.ready_at = 0.0  #: monotonic time its own heartbeat was seen

    @property
    def current(self) -> WorkerProcess:
        return self.procs[-1]

    @property
    def logs(self) -> list[Path]:
        return [p.log_path for p in self.procs]

    def start(self, timeout: float = 180) -> WorkerProcess:
        proc = WorkerProcess(self.settings, self.name,
                             self.tmp / f"{self.name.replace('@', '_')}-{len(self.procs)}.log", hooks=self.hooks,
                             role=self.role)
        self.procs.append(proc)
        self.spawned_at = time.time()
        proc.start()
        wait_for_own_heartbeat(proc, timeout)
        self.ready_at = time.monotonic()
        return proc

    def own_running(self, client: Client, ids: Iterable[str]) -> list[str]:
        """Jobs running that the current process claimed (the earlier ones are dead: they claim nothing)."""
        return [i for i, r in client.jobs.get_many(ids).items()
                if r.status == JobStatus.running and r.worker == self.name and (r.started_at or 0) >= self.spawned_at]

    def wait_own_running(self, client: Client, ids: list[str], timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while not (running := self.own_running(client, ids)):
            assert self.current.alive, self.current.log_tail()
            assert time.monotonic() < deadline, f"no job claimed by pid {self.current.proc.pid} ran"  # type: ignore[union-attr]
            time.sleep(0.005)
        return running

    def kill_when_running(self, client: Client, ids: list[str], timeout: float = 120) -> dict[str, Any]:
        """kill -9 the current process once a job it claimed is running. Returns the kill's record; its
        ``victims`` are the jobs still running when it died (empty if they all finished just before)."""
        running = self.wait_own_running(client, ids, timeout)
        proc = self.current
        assert proc.proc is not None
        proc.kill()
        return {"pid": proc.proc.pid, "after_ready_s": round(time.monotonic() - self.ready_at, 2),
                "running": len(running), "victims": self.own_running(client, ids)}

    def stop(self) -> None:
        for proc in self.procs[:-1]:
            proc.kill()
        if self.procs:
            self.current.stop()


def outcome(client: Client, jobs: dict[str, Sample], logs: Iterable[Path], timeout: float, since: float,
            writes: ResultWrites | None = None) -> tuple[dict[str, Any], dict[str, JobResult]]:
    """Wait for the jobs; then count, from outside the job store where it can be done:

    * ``lost`` — not ended; ``unknown`` — no record at all (an id handed out that the store forgot);
    * ``wrong`` — succeeded with an answer that misses its picture's facts (a swap would show here);
    * ``observed`` — jobs the workers' logs show answered; ``run_twice`` — answered more than once;
    * ``recomputed`` — jobs started more than once (the store's attempts; a kill's victims must be here);
    * ``duplicated`` / ``publishes`` — result writes seen on ``tuwen:done:*``, when ``writes`` listens.
    """
    ids = list(jobs)
    results = client.wait_many(ids, timeout=timeout)
    recover_s = round(time.monotonic() - since, 1)
    logs = list(logs)
    answered = {i for i, r in results.items() if r.status == JobStatus.succeeded}
    ended = {i for i, r in results.items() if r.status.terminal}
    deadline = time.monotonic() + 10  # each log line is written before its result: it is there, or flushing
    while (not all((runs := executions(logs))[i] for i in answered)
           or (writes is not None and sum(writes.counts[i] for i in ids) < len(ended))):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    numbers: dict[str, Any] = {
        "recover_s": recover_s,
        "jobs": len(ids),
        "succeeded": len(answered),
        "lost": sum(not r.status.terminal for r in results.values()),
        "unknown": sum(r.status == JobStatus.unknown for r in results.values()),
        "wrong": sum(not has_facts(results[i].answer or "", jobs[i].facts) for i in answered),
        "observed": sum(runs[i] >= 1 for i in ids),
        "run_twice": sum(runs[i] >= 2 for i in ids),
        "recomputed": sum(r.attempts > 1 for r in results.values()),
    }
    if writes is not None:
        numbers["publishes"] = sum(writes.counts[i] for i in ids)
        numbers["duplicated"] = sum(writes.counts[i] > 1 for i in ids)
    return numbers, results


def wrong_answers(jobs: dict[str, Sample], results: dict[str, JobResult]) -> list[tuple[str, str | None]]:
    return [(jobs[i].question, r.answer) for i, r in results.items()
            if r.status == JobStatus.succeeded and not has_facts(r.answer or "", jobs[i].facts)]


def wait_until(condition: Any, timeout: float, what: str, every: float = 0.05) -> float:
    """Poll ``condition`` until it is true; returns the seconds it took (fails after ``timeout``)."""
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, f"not within {timeout:.0f}s: {what}"
        time.sleep(every)
    return time.monotonic() - t0


def kill_repeatedly(lives: Lives, client: Client, ids: list[str], kills: int) -> list[dict[str, Any]]:
    """kill -9 the worker ``kills`` times, each time once a job its fresh process claimed is running,
    starting it again under the same name. A kill that found its jobs just finished does not count."""
    record: list[dict[str, Any]] = []
    while sum(bool(k["victims"]) for k in record) < kills:
        assert len(record) < kills + 3, record
        record.append(lives.kill_when_running(client, ids))
        lives.start()
    return record


def assert_kills_landed(kills: list[dict[str, Any]], results: dict[str, Any], wanted: int) -> None:
    landed = [k for k in kills if k["victims"]]
    assert len(landed) >= wanted and len({k["pid"] for k in kills}) == len(kills), kills
    victims = {v for k in landed for v in k["victims"]}
    assert all(results[v].attempts >= 2 for v in victims), {v: results[v].attempts for v in victims}


def kill_log(kills: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the report keeps of each kill: the process, how long after its own heartbeat, what it ran."""
    return [{"pid": k["pid"], "after_ready_s": k["after_ready_s"], "running": k["running"],
             "killed_mid_job": len(k["victims"])} for k in kills]


def check(numbers: dict[str, Any], jobs: dict[str, Sample], results: dict[str, Any]) -> None:
    """Every job answered, right, and seen answered by the independent observer."""
    n = len(jobs)
    assert numbers["lost"] == 0 and numbers["unknown"] == 0, numbers
    assert numbers["succeeded"] == n, {i: (r.status, r.error) for i, r in results.items()
                                        if r.status != JobStatus.succeeded}
    assert numbers["wrong"] == 0, wrong_answers(jobs, results)
    assert numbers["observed"] == n, numbers  # the logs saw every completion


class Producer(threading.Thread):
    """Submits jobs one after another as a client would, across a fault: each id handed out is kept with
    when it was handed out; a submit refused as ``Unavailable`` is counted and tried again. At most
    ``window`` jobs are unfinished at a time, so the run lasts as long as the drill needs."""

    def __init__(self, client: Client, window: int = 16) -> None:
        super().__init__(daemon=True)
        self.client, self.window = client, window
        self.jobs: dict[str, Sample] = {}
        self.handed_out_at: list[float] = []
        self.refused = 0
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()

    @classmethod
    def mid_run(cls, client: Client, worker: Lives) -> Producer:
        """A producer started and running: 10 of its jobs answered, one running on ``worker``'s own process,
        and an id handed out within the last quarter second (the moment a drill strikes)."""
        producer = cls(client)
        producer.start()
        wait_until(lambda: sum(r.status == JobStatus.succeeded for r in client.jobs.get_many(producer.ids())
                               .values()) >= 10 and worker.own_running(client, producer.ids())
                   and time.monotonic() - producer.handed_out_at[-1] < 0.25, 120,
                   "10 jobs answered, one running, and an id just handed out")
        return producer

    def ids(self) -> list[str]:
        with self._lock:
            return list(self.jobs)

    def run(self) -> None:
        samples = load_samples()
        try:
            while not self._done.is_set():
                if self._unfinished() >= self.window:
                    time.sleep(0.01)
                    continue
                sample = samples[len(self.jobs) % len(samples)]
                try:
                    job = self.client.submit(sample.path.read_bytes(), sample.question)
                except Unavailable:
                    self.refused += 1
                    continue
                with self._lock:
                    self.jobs[job.id] = sample
                    self.handed_out_at.append(time.monotonic())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def _unfinished(self) -> int:
        try:
            states = self.client.jobs.get_many(self.ids()[-4 * self.window:])
        except Unavailable:
            return self.window  # Redis is away: wait, then try again
        return sum(not r.status.terminal for r in states.values())

    def stop(self) -> None:
        self._done.set()
        self.join(60)
        assert self.error is None, self.error


class GatewayProcess:
    """``tuwen gateway serve`` as a child process on ``settings`` (passed as ``TUWEN_*``, nothing inherited)."""

    def __init__(self, settings: Settings, log_path: Path, log_level: str = "warning", **gateway: str) -> None:
        self.settings, self.log_path, self.log_level = settings, log_path, log_level
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"TUWEN_RATE_LIMIT_PER_MINUTE": "0", **{f"TUWEN_{k.upper()}": v for k, v in gateway.items()}}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUWEN_")}
        env.update({**self.settings.to_env(), **self.env, "PYTHONUNBUFFERED": "1"})
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tuwen.workers.cli", "gateway", "serve", f"--port={self.port}",
                 f"--log-level={self.log_level}"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the gateway exited: {self.log_path.read_text(errors='replace')}"
            try:
                if httpx.get(self.url + "/healthz", timeout=2, trust_env=False).status_code < 600:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(f"the gateway did not start: {self.log_path.read_text(errors='replace')}")

    def status_mb(self, field: str) -> float:
        """``VmRSS`` (now) or ``VmHWM`` (the peak so far) of the process, in MiB, from /proc."""
        assert self.proc is not None
        for row in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if row.startswith(field + ":"):
                return int(row.split()[1]) / 1024
        raise AssertionError(f"no {field} in /proc/{self.proc.pid}/status")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
