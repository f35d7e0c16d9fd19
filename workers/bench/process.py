"""Run ``tuwen worker`` as a child process (for the demo, the tests and the benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tuwen.pipeline.jobs import connect
from tuwen.pipeline.registry import live_workers
from tuwen.pipeline.settings import Settings
from tuwen.workers.serve.hooks import Hooks


class WorkerProcess:
    """A worker subprocess configured by ``settings`` (passed as ``TUWEN_*``, nothing inherited)."""

    def __init__(self, settings: Settings, hostname: str, log_path: Path, *, threads: int = 1,
                 extra_env: dict[str, str] | None = None, hooks: Hooks | None = None, role: str = "picture") -> None:
        self.settings, self.hostname, self.log_path = settings, hostname, log_path
        self.role = role  #: ``picture`` or ``speech`` (``tuwen worker --role``)
        self.threads = threads
        self.extra_env = {**(hooks.to_env() if hooks else {}), **(extra_env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUWEN_")}
        env.update(self.settings.to_env())
        env.update({"OMP_NUM_THREADS": str(self.threads), "TUWEN_TORCH_THREADS": str(self.threads),
                    "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tuwen.workers.cli", "worker", f"--role={self.role}", f"--hostname={self.hostname}",
             "--loglevel=INFO"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until this very process consumes (it announces itself, with its pid, only after the model
        loaded): a heartbeat left by an earlier process of the same name does not count."""
        client = connect(self.settings.redis_url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited early; log:\n{self.log_tail()}")
                if any(w["name"] == self.hostname and w.get("pid") == self.proc.pid for w in live_workers(client)):
                    return
                time.sleep(0.2)
        finally:
            client.close()
        raise TimeoutError(f"worker not ready after {timeout:.0f}s; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 60.0) -> int | None:
        """Warm shutdown (SIGTERM); SIGKILL if it does not exit in ``timeout``."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
