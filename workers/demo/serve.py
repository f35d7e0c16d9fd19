"""``tuwen serve``: the whole service on one machine, kept running until Ctrl-C.

One command to an OpenAI-compatible endpoint, as ``vllm serve`` or ``ollama serve`` are: a private
redis-server on a free port (or ``TUWEN_REDIS_URL``), pictures in the per-user data directory, one worker
with the bundled demo model (or ``--model``) and the gateway; it prints the URL, the playground and an API
key. Redis keeps its data in the data directory too, so the key (saved beside it, owner-only) and the
answers survive a restart.

Each piece is a process in its own session: a Ctrl-C at the terminal reaches this process alone, which
then stops them in order, the gateway first (no new requests), then the worker (it finishes what it
runs), Redis last. SIGTERM does the same. Production runs the same pieces apart (docs/deployment.md).
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from tuwen.pipeline.gateway.apikeys import KeyStore
from tuwen.pipeline.jobs import connect
from tuwen.pipeline.localredis import LocalRedis, free_port
from tuwen.pipeline.registry import live_workers
from tuwen.pipeline.settings import Settings, data_home
from tuwen.pipeline.stores import storage_place
from tuwen.workers.bench.process import WorkerProcess

#: The owner of the key ``tuwen serve`` makes (no rate limit: it is the machine's own user).
OWNER = "local"


class Stopped(Exception):
    """SIGTERM, raised where the process is, like Ctrl-C's KeyboardInterrupt."""


@dataclass(frozen=True)
class Place:
    """Where ``tuwen serve`` keeps its state: ``<data home>/serve``."""

    root: Path

    @property
    def redis(self) -> Path:
        return self.root / "redis"

    @property
    def key_file(self) -> Path:
        return self.root / "api-key"

    def redis_port(self) -> int:
        """The port of the last start while it is free (so that a ``TUWEN_REDIS_URL`` exported for the
        producer commands stays right across restarts), else a new free one; remembered for the next."""
        saved = self.root / "redis-port"
        try:
            port = int(saved.read_text())
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
        except (OSError, ValueError):
            port = free_port()
        saved.write_text(str(port))
        return port

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"


def run_serve(console: Console, settings: Settings, *, redis_given: bool, host: str, port: int,
              threads: int) -> int:
    """Start everything, print where it is, wait for Ctrl-C or SIGTERM, stop everything. 0 when stopped by a
    signal, 1 when a piece died, 3 when one could not start."""
    place = Place(data_home() / "serve")
    place.redis.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Both, whatever this process inherited: a shell runs a background command with SIGINT ignored, and
    # uvicorn and redis-server stop on it anyway.
    handlers = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, _raise_stopped)
    t0, outcome = time.monotonic(), 0
    try:
        with ExitStack() as stack:
            try:
                stack.callback(_lock(place.root / "lock").close)
                _check_port(host, port)
                # Each piece's stop goes on the stack before it starts: a Ctrl-C may come at any time.
                redis = None if redis_given else LocalRedis(appendonly=True, directory=place.redis,
                                                            port=place.redis_port())
                if redis is not None:
                    stack.callback(redis.stop)
                    settings = settings.model_copy(update={"redis_url": redis.start().url})
                token, fresh = _api_key(settings, place.key_file)
                worker = WorkerProcess(settings, f"serve-{os.getpid()}@{socket.gethostname()}", place.log("worker"),
                                       threads=threads)
                stack.callback(_quietly, worker.stop, 30)
                worker.start()
                speech = _speech_worker(settings, place, threads)
                if speech is not None:
                    stack.callback(_quietly, speech.stop, 30)
                    speech.start()
                gateway = _start_gateway(settings, host, port, place.log("gateway"))
                stack.callback(_quietly, _stop, gateway)
                worker.wait_ready(timeout=300)
                if speech is not None:
                    speech.wait_ready(timeout=300)
                _wait_ready(gateway, host, port, place.log("gateway"))
                _announce(console, settings, worker, token, fresh, place, redis, host, port, time.monotonic() - t0,
                          speech)
                died = _watch([w for w in (worker, speech) if w is not None], gateway, redis)
                console.print(f"the {died} stopped (logs in {place.root})", markup=False, soft_wrap=True)
                outcome = 1
            except (KeyboardInterrupt, Stopped):
                pass
            except (RuntimeError, TimeoutError, OSError) as exc:
                console.print(f"tuwen serve could not start: {exc}", markup=False, highlight=False, soft_wrap=True)
                outcome = 3
            # From here on the clean-up (the stack, in reverse) runs to its end: a second Ctrl-C or SIGTERM
            # does not cut it short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            console.print("stopping the gateway, the worker (it finishes what it runs) and Redis …", markup=False)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    console.print("stopped: no process of tuwen serve is left", markup=False)
    return outcome


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped()


def _lock(path: Path) -> IO[str]:
    """One ``tuwen serve`` per data directory (two would share one Redis data directory): held while the
    returned file is open."""
    f = path.open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise RuntimeError(f"another tuwen serve (pid {holder}) uses {path.parent}; stop it first, or give this one "
                           "its own XDG_DATA_HOME") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def _check_port(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a just-closed port is free
        try:
            s.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another: "
                          f"tuwen serve --port {port + 1}") from None


def _api_key(settings: Settings, saved: Path) -> tuple[str, bool]:
    """The saved key if this Redis still knows it, else a new one (saved, owner-only). Returns it and
    whether it is new."""
    store = KeyStore(connect(settings.redis_url))
    try:
        if saved.exists():
            token = saved.read_text(encoding="utf-8").strip()
            if store.authenticate(token) is not None:
                return token, False
        _, token = store.create(OWNER, "tuwen serve", rate_limit_per_minute=0)
    finally:
        store.redis.close()
    fd = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token, True


def _start_gateway(settings: Settings, host: str, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """``tuwen gateway serve`` as a child in its own session, on the same settings (the caller's other
    ``TUWEN_*`` gateway settings pass through)."""
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "tuwen.workers.cli", "gateway", "serve", "--host", host,
                                 "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait_ready(gateway: subprocess.Popen[bytes], host: str, port: int, log_path: Path) -> None:
    """Until ``/readyz`` answers 200 (Redis, storage and a worker are there)."""
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/readyz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if gateway.poll() is not None:
            raise RuntimeError(f"the gateway exited ({gateway.returncode}); its log:\n{_tail(log_path)}")
        try:
            with opener.open(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the gateway was not ready within 60 s; its log:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _speech_worker(settings: Settings, place: Place, threads: int) -> WorkerProcess | None:
    """A speech worker for spoken questions, when there is a speech checkpoint: ``TUWEN_SPEECH_MODEL_PATH``, or
    the bundled demo speech model once it is trained; else None (spoken questions then get a 503 that says so)."""
    from tuwen.workers.demo.speech import bundled_speech_model

    path = settings.speech_model_path or bundled_speech_model()
    if not (path / "config.json").exists():
        return None
    return WorkerProcess(settings.model_copy(update={"speech_model_path": path}),
                         f"serve-speech-{os.getpid()}@{socket.gethostname()}", place.log("speech"), threads=threads,
                         role="speech")


def _announce(console: Console, settings: Settings, worker: WorkerProcess, token: str, fresh: bool, place: Place,
              redis: LocalRedis | None, host: str, port: int, took: float, speech: WorkerProcess | None) -> None:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    client = connect(settings.redis_url)
    try:
        models = [w.get("model_id", "?") for w in live_workers(client) if w["name"] == worker.hostname]
    finally:
        client.close()
    where = f"{settings.redis_url} (private; its data in {place.redis})" if redis else settings.redis_url
    rows = [("OpenAI API", f"http://{shown}:{port}/v1   (base_url; model \"tuwen\")"),
            ("playground", f"http://{shown}:{port}/playground"),
            ("API key", f"{token}   ({'new' if fresh else 'saved'}: {place.key_file})"),
            ("model", f"{models[0] if models else '?'} on one worker"),
            ("speech", f"{speech.settings.speech_model_path} on one speech worker (spoken questions)" if speech
             else "off: no speech checkpoint (TUWEN_SPEECH_MODEL_PATH)"),
            ("Redis", where),
            ("pictures", storage_place(settings)),
            ("logs", f"{place.log('worker')}, {place.log('gateway')}"
                     + (f", {place.log('speech')}" if speech else ""))]
    console.print(f"tuwen serve is ready ({took:.1f} s):", markup=False)
    for name, value in rows:
        console.print(f"  {name:<11} {value}", markup=False, highlight=False, soft_wrap=True)
    console.print("The tuwen commands and Client.from_env() of another terminal reach it with:", markup=False)
    console.print(f"  export TUWEN_REDIS_URL={settings.redis_url}", markup=False, soft_wrap=True)
    console.print("Ctrl-C stops everything.", markup=False)


def _watch(workers: list[WorkerProcess], gateway: subprocess.Popen[bytes], redis: LocalRedis | None) -> str:
    """Until a piece dies (its name) or a signal comes."""
    while True:
        for worker in workers:
            if not worker.alive:
                return "speech worker" if worker.role == "speech" else "worker"
        if gateway.poll() is not None:
            return "gateway"
        if redis is not None and (redis.proc is None or redis.proc.poll() is not None):
            return "Redis server"
        time.sleep(0.5)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM (uvicorn finishes its requests), then SIGKILL to the whole session."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _quietly(stop: Any, *args: Any) -> None:
    try:
        stop(*args)
    except Exception:  # noqa: BLE001 - clean-up of the others goes on
        pass
