"""The tests' port allocator (tests/support/ports.py): disjoint per xdist worker, below the
kernel's ephemeral range, never the same port twice, never one something listens on."""

from __future__ import annotations

import socket
import threading

import pytest

from tests.support.ports import LOW, PortPool, ephemeral_low, free_port, worker_slice


@pytest.mark.parametrize(("worker", "count", "expected"), [
    (None, None, range(20_000, 32_000)),
    ("gw0", "1", range(20_000, 32_000)),
    ("gw0", "4", range(20_000, 23_000)),
    ("gw3", "4", range(29_000, 32_000)),
    ("gw5", "4", range(23_000, 26_000)),  # more workers than announced: wraps, never out of range
    ("master", "4", range(20_000, 32_000)),
    ("gwx", "4", range(20_000, 32_000)),
])
def test_each_worker_has_its_own_slice(worker: str | None, count: str | None, expected: range) -> None:
    assert worker_slice(worker, count, 20_000, 32_000) == expected


def test_the_slices_of_a_run_do_not_overlap() -> None:
    slices = [set(worker_slice(f"gw{i}", "6", LOW, 32_768)) for i in range(6)]
    assert sum(len(s) for s in slices) == len(set().union(*slices))


def test_ports_come_from_below_the_ephemeral_range_and_never_twice() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(LOW <= p < ephemeral_low() for p in ports)


def test_threads_never_get_the_same_port() -> None:
    got: list[int] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(20):
            port = free_port()
            with lock:
                got.append(port)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == len(set(got)) == 80


def test_a_port_in_use_is_skipped() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        assert PortPool(range(taken, taken + 1)).take() != taken  # the only one is taken: the kernel's choice
