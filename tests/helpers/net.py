"""Small networking / polling helpers shared by the test suite."""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago.

    The OS picks it (bind to port 0); there is an unavoidable race until the server binds it,
    which is acceptable for tests and far better than hard-coded ports colliding between runs.
    Under pytest-xdist each worker only takes ports congruent to its index modulo the number of
    workers (chosen at random, then probed: the kernel's own choice for port 0 is always odd), so
    two workers of one run can never be handed the same port in that window.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... or unset
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if count <= 1:
                sock.bind(("127.0.0.1", 0))
                return int(sock.getsockname()[1])
            port = random.randrange(20000 // count, 32000 // count) * count + index  # below the ephemeral range
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.1) -> T:
    """Poll `predicate` until it returns a truthy value and return that value.

    Raises TimeoutError after `timeout` seconds; the predicate is always evaluated once more at
    the deadline so a slow machine that just made it does not fail spuriously.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout:.1f}s: {predicate!r}")
        time.sleep(interval)


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
