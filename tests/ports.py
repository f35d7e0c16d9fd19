"""Free ports for the servers the tests start, never handed to two of them at once. A helper, not tests.

Under pytest-xdist several processes start servers at the same time, each on a port it was told is free.
``bind(0)`` finds one free now, but between that check and the server's own bind another process can be
handed the same port, and outgoing connections draw theirs from the same (ephemeral) range. So ports come
from a range below the kernel's ephemeral one, and a machine-wide registry (a file under a lock) keeps
each port handed out for ``RESERVE_S``: long enough for a test that stops a server and starts it again on its port.
"""

from __future__ import annotations

import fcntl
import random
import socket
import tempfile
import time
from pathlib import Path

#: How long a port handed out stays reserved for whoever asked for it.
RESERVE_S = 900.0
REGISTRY = Path(tempfile.gettempdir()) / "tuwen-test-ports"
#: Ports drawn from here: above the registered services' usual ports, below Linux's default ephemeral range.
LOW, HIGH = 20_000, 32_000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 that is free now and that no other caller on this machine got in ``RESERVE_S``."""
    high = min(HIGH, _ephemeral_low())
    with REGISTRY.open("a+") as registry:
        fcntl.flock(registry, fcntl.LOCK_EX)
        registry.seek(0)
        now = time.time()
        held = {int(port): float(until) for port, until in (line.split() for line in registry if line.strip())}
        held = {port: until for port, until in held.items() if until > now}
        for _ in range(200 if high - LOW >= 1000 else 0):
            port = random.randrange(LOW, high)
            if port not in held and _bindable(port):
                break
        else:  # the range is crowded: fall back to the kernel's choice, still registered
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
        held[port] = now + RESERVE_S
        registry.seek(0)
        registry.truncate()
        registry.write("".join(f"{p} {until:.0f}\n" for p, until in held.items()))
        return port
