"""Small helpers for tests against real brokers: poll until a deadline, never sleep and hope."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from ..consumer import Consumer
from ..message import Message
from ..url import URL

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> T:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def collect(consumer: Consumer, n: int, timeout: float = 15.0, ack: bool = True) -> list[Message]:
    """Receive exactly ``n`` messages (acking them) or fail after ``timeout`` seconds."""
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"received {len(out)} of {n} messages within {timeout}s")
        m = consumer.receive(timeout=min(left, 1.0))
        if m is not None:
            if ack:
                m.ack()
            out.append(m)
    return out


def unreachable_url(url: str) -> str:
    """The same kind of URL, pointing at a port where nothing listens.

    Backends without a network endpoint (memory, sqlite) get an unopenable sqlite file.
    """
    u = URL.parse(url)
    if u.host is None or u.scheme in ("memory", "sqlite"):
        return "sqlite:////proc/mqprimer-nonexistent/x.db"
    return URL(u.scheme, u.username, u.password, (("127.0.0.1", 1),), u.path, u.query).render(hide_password=False)
