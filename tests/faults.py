"""Fault injection and measuring for drills: a TCP proxy that can take a service off the network and
back, a Redis run as docker-compose.yml runs it that can be SIGKILLed, a counter of result writes, the
drill report, and readers for metrics and listening sockets."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import redis
import yaml

from tuwen.pipeline.keys import DONE as DONE_CHANNEL
from tuwen.pipeline.localredis import LocalRedis
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
DRILL_REPORT = Path(os.environ.get("TUWEN_DRILL_REPORT", ROOT / "build" / "drills.jsonl"))


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target``. ``down()`` refuses and cuts every connection;
    ``up()`` accepts again on the same port — an outage as clients see it, the data kept."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def up(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        with self._lock:
            if self._listener is not None:
                try:  # wakes the accept() blocked in _accept; close() alone let it take one more connection
                    self._listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._listener.close()
                self._listener = None
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


def compose_redis_flags(compose: Path = ROOT / "docker-compose.yml") -> list[str]:
    """The persistence flags docker-compose.yml gives redis-server (e.g. ``--appendonly yes --appendfsync
    everysec --save ''``), read from the file so that a drill crashes the Redis that operators run."""
    command = yaml.safe_load(compose.read_text(encoding="utf-8"))["services"]["redis"]["command"]
    args = shlex.split(" ".join(command).split("exec redis-server", 1)[1])
    return args[next(i for i, a in enumerate(args) if a.startswith("--")):]


class ComposeRedis(LocalRedis):
    """A private redis-server with docker-compose.yml's persistence flags (not ``LocalRedis``'s
    ``appendfsync always``) that ``crash()`` kills with SIGKILL; ``start()`` again reopens the same port
    and data directory, as a restarted container does."""

    def __init__(self) -> None:
        super().__init__(appendonly=True, port=free_port())
        self.flags = compose_redis_flags()

    def persistence(self) -> list[str]:
        return self.flags

    def crash(self) -> None:
        """SIGKILL: no shutdown, no final write; what survives is what the AOF already held."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def config(self, name: str) -> str:
        client = redis.Redis(port=self.port, decode_responses=True)
        try:
            return str(client.config_get(name)[name])
        finally:
            client.close()


def report(drill: str, **numbers: object) -> None:
    """Print a drill's numbers and append them to the drill report (the README table comes from it)."""
    row = {"drill": drill, **numbers}
    print("DRILL", json.dumps(row, ensure_ascii=False))
    DRILL_REPORT.parent.mkdir(parents=True, exist_ok=True)
    with DRILL_REPORT.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def metric_values(text: str) -> dict[str, float]:
    """A Prometheus text exposition as ``{'name{labels}': value}``."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def listening_addresses(port: int) -> set[str]:
    """The local IPv4/IPv6 addresses on which something listens on ``port`` (read from /proc/net)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                if len(address) == 8:
                    found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    found.add("::" if int(address, 16) == 0 else address)
    return found


class ResultWrites(threading.Thread):
    """Counts result writes per job: the job store publishes on ``tuwen:done:<id>`` once per write, so
    a count above one means a result was written twice. Survives a Redis restart."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.counts: Counter[str] = Counter()
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self._stopped = threading.Event()
        self._subscribed = threading.Event()

    def run(self) -> None:
        pubsub = None
        while not self._stopped.is_set():
            try:
                if pubsub is None:
                    pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                    pubsub.psubscribe(DONE_CHANNEL + "*")
                    self._subscribed.set()
                msg = pubsub.get_message(timeout=0.5)
            except redis.ConnectionError:
                pubsub = None
                time.sleep(0.5)
                continue
            if msg and msg["type"] == "pmessage":
                self.counts[msg["channel"][len(DONE_CHANNEL):]] += 1

    def started(self) -> ResultWrites:
        self.start()
        assert self._subscribed.wait(10), "could not subscribe"
        return self

    def stop(self) -> None:
        self._stopped.set()


class SentinelRedis:
    """A Redis deployment behind Sentinel, as production runs one: a primary and two replicas (AOF, fsync
    every second, as docker-compose.yml), watched by three sentinels (quorum 2). ``kill_primary()``
    SIGKILLs the primary; the sentinels then promote the replica. ``url`` is tuwen's
    ``redis+sentinel://`` URL for it. ``down_after_ms`` is the sentinels' own setting (Redis's default
    is 30 s; a drill shortens only how long the outage lasts, not what tuwen does through it)."""

    SERVICE = "tuwen"

    def __init__(self, down_after_ms: int = 3000) -> None:
        self.exe = shutil.which("redis-server")
        assert self.exe is not None, "redis-server is not installed"
        self.directory = Path(tempfile.mkdtemp(prefix="tuwen-sentinel-"))
        self.down_after_ms = down_after_ms
        self.ports = [free_port() for _ in range(3)]  # the first starts as primary
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.SERVICE}/0"

    def _start(self, port: int, *args: str) -> None:
        self.procs[port] = subprocess.Popen([self.exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port, self.procs[port])

    def __enter__(self) -> SentinelRedis:
        primary = self.ports[0]
        for port in self.ports:
            data = self.directory / str(port)
            data.mkdir()
            extra = ["--replicaof", "127.0.0.1", str(primary)] if port != primary else []
            self._start(port, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--logfile",
                        str(data / "redis.log"), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                        *extra)
        for port in self.sentinel_ports:
            conf = self.directory / f"sentinel-{port}.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                            f"logfile {self.directory / f'sentinel-{port}.log'}\n"
                            f"sentinel monitor {self.SERVICE} 127.0.0.1 {primary} 2\n"
                            f"sentinel down-after-milliseconds {self.SERVICE} {self.down_after_ms}\n"
                            f"sentinel failover-timeout {self.SERVICE} 10000\n")
            self._start(port, str(conf), "--sentinel")
        # Ready when every sentinel knows the replica and the two other sentinels
        deadline = time.monotonic() + 60
        while not all(self._sentinel(p, "SENTINEL", "MASTER", self.SERVICE).get("num-slaves") == "2" and
                      self._sentinel(p, "SENTINEL", "MASTER", self.SERVICE).get("num-other-sentinels") == "2"
                      for p in self.sentinel_ports):
            assert time.monotonic() < deadline, "the sentinels did not find each other and the replicas"
            time.sleep(0.2)
        return self

    def _sentinel(self, port: int, *command: str) -> dict[str, str]:
        client = redis.Redis(port=port, decode_responses=True, socket_timeout=2)
        try:
            reply = client.execute_command(*command)
            return dict(zip(reply[::2], reply[1::2])) if isinstance(reply, list) else reply
        finally:
            client.close()

    def primary_port(self) -> int:
        """The primary's port as the sentinels name it now (the majority's answer)."""
        named = Counter(int(redis.Redis(port=p, decode_responses=True, socket_timeout=2)
                            .sentinel_get_master_addr_by_name(self.SERVICE)[1]) for p in self.sentinel_ports)
        return named.most_common(1)[0][0]

    def kill_primary(self) -> int:
        port = self.primary_port()
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait()
        return port

    def freeze_primary(self) -> int:
        """SIGSTOP the primary: its connections stay open and unanswered (a hung machine, not a dead one)."""
        port = self.primary_port()
        self.procs[port].send_signal(signal.SIGSTOP)
        return port

    def thaw(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGCONT)

    def role(self, port: int) -> str:
        """``master`` or ``slave``, as the server at ``port`` says of itself."""
        client = redis.Redis(port=port, decode_responses=True, socket_timeout=2)
        try:
            return str(client.info("replication")["role"])
        finally:
            client.close()

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # one the drill froze must run to end
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15, url: str | None = None) -> None:
    """Until the redis-server ``proc`` answers a ping on ``port`` (through ``url``, such as a ``rediss://`` one)."""
    client = redis.Redis.from_url(url or f"redis://127.0.0.1:{port}", socket_connect_timeout=1)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, f"redis-server did not start on {port}"
                time.sleep(0.02)
    finally:
        client.close()


class TlsRedis:
    """A redis-server that speaks only TLS (its plain port closed), with a certificate authority of its own
    made for the test by ``openssl``. ``url`` is a ``rediss://`` URL that verifies the server against it."""

    def __init__(self) -> None:
        self.exe = shutil.which("redis-server")
        assert self.exe is not None, "redis-server is not installed"
        self.directory = Path(tempfile.mkdtemp(prefix="tuwen-tls-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={self.ca}"

    def _certificates(self) -> None:
        d = self.directory

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
                "-subj", "/CN=tuwen test CA")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
                "-subj", "/CN=127.0.0.1")
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", "server.crt", "-days", "1", "-extfile", "san.ext")

    def __enter__(self) -> TlsRedis:
        self._certificates()
        d = self.directory
        self.proc = subprocess.Popen(
            [str(self.exe), "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1", "--dir", str(d),
             "--tls-cert-file", str(d / "server.crt"), "--tls-key-file", str(d / "server.key"),
             "--tls-ca-cert-file", str(d / "ca.crt"), "--tls-auth-clients", "no", "--save", "",
             "--logfile", str(d / "redis.log")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc, url=self.url)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)
