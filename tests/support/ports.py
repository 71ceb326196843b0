"""TCP ports for the servers tests start, without races between pytest-xdist workers.

A port the kernel hands out for ``bind((host, 0))`` comes from the ephemeral range
(``net.ipv4.ip_local_port_range``), the range every outgoing connection also takes its local
port from: between the moment a test picks it and the moment its server binds it, a client
connection of another worker (or of anything else on the machine) may take it, and the server
fails with "address already in use". So :func:`free_port` hands out ports from below that range:

* each xdist worker walks its own slice (``PYTEST_XDIST_WORKER`` = ``gw<i>`` of
  ``PYTEST_XDIST_WORKER_COUNT``), so two workers never pick the same port;
* from a random place in the slice, so a test suite of another checkout running at the same
  time on the machine most likely walks elsewhere;
* each port once per process, and only after binding it on all interfaces (no
  ``SO_REUSEADDR``: a port with a listener or a connection in ``TIME_WAIT`` is skipped) worked.

Thread model: any thread may call :func:`free_port`; the cursor is guarded by a lock.
"""

from __future__ import annotations

import os
import random
import socket
import threading

LOW = 20_000  # below the usual ephemeral range (32768-60999), above well-known service ports
DEFAULT_EPHEMERAL_LOW = 32_768


def ephemeral_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    """Where the kernel's ephemeral ports start."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_LOW


def worker_slice(worker: str | None, count: str | None, low: int, high: int) -> range:
    """The ports of one xdist worker: ``gw<i>`` of ``count`` gets the i-th equal part of
    [low, high); outside xdist (no worker), the whole range.

        worker_slice("gw1", "4", 20000, 32000) -> range(23000, 26000)
    """
    if not worker or not worker.startswith("gw") or not count:
        return range(low, high)
    try:
        index, total = int(worker[2:]), max(1, int(count))
    except ValueError:
        return range(low, high)
    size = (high - low) // total
    start = low + (index % total) * size
    return range(start, start + size)


class PortPool:
    def __init__(self, ports: range) -> None:
        self.ports = ports
        self._next = random.randrange(len(ports)) if len(ports) else 0
        self._lock = threading.Lock()

    def take(self, host: str = "127.0.0.1") -> int:
        with self._lock:
            for _ in range(len(self.ports)):
                port = self.ports[self._next]
                self._next = (self._next + 1) % len(self.ports)
                if bindable(host, port):
                    return port
        return kernel_port(host)  # the whole slice is taken: let the kernel choose


def bindable(host: str, port: int) -> bool:
    for address in {host, "0.0.0.0"}:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((address, port))
            except OSError:
                return False
    return True


def kernel_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_pool: PortPool | None = None
_pool_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` (and on all interfaces) a moment ago, handed out once in this
    process and never to another xdist worker of this run."""
    global _pool
    with _pool_lock:
        if _pool is None:
            high = ephemeral_low()
            if high - LOW < 1000:  # an unusual ephemeral range: no room below it
                return kernel_port(host)
            _pool = PortPool(worker_slice(os.environ.get("PYTEST_XDIST_WORKER"),
                                          os.environ.get("PYTEST_XDIST_WORKER_COUNT"), LOW, high))
    return _pool.take(host)
