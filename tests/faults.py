"""Fault injection for drills: a TCP proxy that can take a service off the network and back."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

from tuwen.pipeline.localredis import free_port

DRILL_REPORT = Path(os.environ.get("TUWEN_DRILL_REPORT", "build/drills.jsonl"))


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


def report(drill: str, **numbers: object) -> None:
    """Print a drill's numbers and append them to the drill report (the README table comes from it)."""
    row = {"drill": drill, **numbers}
    print("DRILL", json.dumps(row, ensure_ascii=False))
    DRILL_REPORT.parent.mkdir(parents=True, exist_ok=True)
    with DRILL_REPORT.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
