"""Shared benchmark helpers: throughput and latency, printed as one table per run.

Every benchmark runs mqprimer and the raw client library on the same broker in one
process run, so the ratio is meaningful even on a noisy 2-core machine.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Result:
    name: str
    n: int
    seconds: float
    p50_us: float | None = None
    p99_us: float | None = None

    @property
    def rate(self) -> float:
        return self.n / self.seconds if self.seconds else float("inf")


def timed(name: str, n: int, fn: Callable[[], None]) -> Result:
    """Run ``fn`` once (it does ``n`` operations) and time it."""
    start = time.perf_counter()
    fn()
    return Result(name, n, time.perf_counter() - start)


def latencies(name: str, n: int, op: Callable[[], None]) -> Result:
    """Call ``op`` ``n`` times, timing each call: throughput plus p50/p99 latency."""
    samples = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        op()
        samples.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    samples.sort()
    return Result(name, n, total, samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6)


class Best:
    """Keeps, per case, the best of several rounds (a load burst from elsewhere only lowers a round)."""

    def __init__(self) -> None:
        self.rows: dict[str, Result] = {}

    def keep(self, name: str, ops: int, secs: float, lat: list[float] | None = None) -> None:
        r = Result(name, ops, secs)
        if lat:
            lat.sort()
            r.p50_us, r.p99_us = lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6
        if name not in self.rows or r.rate > self.rows[name].rate:
            self.rows[name] = r

    def interleaved(self, ops: Mapping[str, Callable[[], object]], n: int, chunk: int) -> None:
        """Run each op ``n`` times in chunks of ``chunk``, the sides taking turns, so a burst of
        load hits them alike; keep throughput and p50/p99 of each call."""
        sides: dict[str, list[float]] = {name: [] for name in ops}
        for _ in range(0, n, chunk):
            for name, op in ops.items():
                lat = sides[name]
                for _ in range(chunk):
                    t = time.perf_counter()
                    op()
                    lat.append(time.perf_counter() - t)
        for name, lat in sides.items():
            self.keep(name, len(lat), sum(lat), lat)


def timed_threads(threads: list[threading.Thread], go: threading.Barrier) -> float:
    """Start ``threads`` (each waits at ``go`` first), release them together and time until the
    last one ends: the start-up of the threads is left out."""
    for t in threads:
        t.start()
    go.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def report(title: str, rows: list[Result], pairs: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
    """Print a table; ``pairs`` are (mqprimer row, raw row) names whose ratio is shown."""
    print(f"\n## {title}")
    print(f"{'case':44} {'msgs':>8} {'msg/s':>10} {'p50 µs':>9} {'p99 µs':>9}")
    by = {r.name: r for r in rows}
    for r in rows:
        p50 = f"{r.p50_us:9.1f}" if r.p50_us is not None else f"{'':9}"
        p99 = f"{r.p99_us:9.1f}" if r.p99_us is not None else f"{'':9}"
        print(f"{r.name:44} {r.n:8d} {r.rate:10.0f} {p50} {p99}")
    for ours, raw in pairs:
        if ours in by and raw in by:
            print(f"ratio {ours} / {raw}: {by[ours].rate / by[raw].rate:.2f}x")
    if "--json" in sys.argv:
        print(json.dumps([asdict(r) | {"rate": r.rate} for r in rows]))


def broker_urls() -> dict[str, str]:
    """URL id -> URL for the brokers scripts/brokers started (.run/brokers/urls: "id url broker")."""
    path = Path(__file__).resolve().parent.parent / ".run" / "brokers" / "urls"
    lines = path.read_text().splitlines() if path.exists() else []
    return {parts[0]: parts[1] for parts in (line.split() for line in lines) if len(parts) >= 2}


def broker_url(name: str, broker: str) -> str:
    """The URL published as ``name``, or exit saying how to start ``broker``."""
    url = broker_urls().get(name)
    if url is None:
        raise SystemExit(f"no {name} URL: run scripts/brokers up {broker}, or pass --url")
    return url


def median_of(runs: list[float]) -> float:
    return statistics.median(runs)


def free_port_pair() -> int:
    """A free loopback port P whose P+1 is free too (a zmq+tcp:// URL uses P+1 for topics)."""
    while True:
        with socket.socket() as s, socket.socket() as t:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            try:
                t.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
