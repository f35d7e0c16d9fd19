"""A private rabbitmq-server for tests, like ``LocalRedis``: free ports, its own node and data. A helper, not tests.

It never touches a RabbitMQ this machine may run (Debian's package starts one on 5672): its own node name,
AMQP, distribution and epmd ports on 127.0.0.1, data and log directory, config file, plugin list and Erlang
cookie (``HOME``), and it does not read /etc/rabbitmq/rabbitmq-env.conf. Everything it starts runs in one
process group, removed with its directory on exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from kombu import Connection

from tests.ports import free_port

#: Debian's server script. /usr/sbin/rabbitmq-server wraps it to run as the ``rabbitmq`` user in
#: /var/lib/rabbitmq, the system node's home: not for a private node.
SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
INSTALL = "apt-get install rabbitmq-server (make test does it)"


def installed() -> bool:
    return SERVER.exists() and shutil.which("epmd") is not None


class LocalRabbit:
    """``with LocalRabbit() as r: r.url`` — started on enter (about 5 s), stopped and removed on exit."""

    def __init__(self) -> None:
        self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        self.node = f"tuwen-test-{uuid.uuid4().hex[:8]}@localhost"
        self.directory = Path(tempfile.mkdtemp(prefix="tuwen-rabbit-"))
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    def start(self, timeout: float = 90.0) -> LocalRabbit:
        if not installed():
            raise RuntimeError(f"rabbitmq-server is not installed: {INSTALL}")
        d = self.directory
        (d / "rabbitmq-env.conf").write_text("")
        (d / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n")
        (d / "enabled_plugins").write_text("[].\n")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(d), "LANG": "C.UTF-8",
            "ERL_EPMD_PORT": str(self.epmd_port), "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"), "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"), "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"), "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}",
        }
        with self.log.open("ab") as log:
            self._procs.append(subprocess.Popen(["epmd", "-address", "127.0.0.1", "-port", str(self.epmd_port)],
                                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            self._wait_for_epmd(timeout)
            self._procs.append(subprocess.Popen([str(SERVER)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True))
        deadline = time.monotonic() + timeout
        while True:
            try:
                with Connection(self.url, connect_timeout=2) as conn:
                    conn.connect()
                return self
            except Exception:  # noqa: BLE001 - not up yet: refused, reset, or still booting
                if self._procs[-1].poll() is not None or time.monotonic() > deadline:
                    tail = self.log.read_text(errors="replace")[-3000:]
                    self.stop()
                    raise RuntimeError(f"rabbitmq-server did not start on port {self.port}:\n{tail}") from None
                time.sleep(0.25)

    def _wait_for_epmd(self, timeout: float) -> None:
        """The node must find our epmd (``-start_epmd false``: it never starts a shared one of its own)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.epmd_port), timeout=1).close()
                return
            except OSError:
                if self._procs[0].poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"epmd did not start on port {self.epmd_port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Kill what it started (the server's process group, then its epmd); the data goes with the directory."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        self._procs.clear()

    def __enter__(self) -> LocalRabbit:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
