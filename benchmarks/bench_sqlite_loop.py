"""How long the asyncio twin's loop-side sqlite operations hold the event loop.

    .venv/bin/python benchmarks/bench_sqlite_loop.py [--ops N]
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python benchmarks/bench_sqlite_loop.py --only blocking|aio send|recv N [--base]

The twin runs a plain send (``Producer.send_nowait``: the backend's ``nowait_publisher``),
a poll (``receive_nowait``) and an ack (``ack_nowait``) on its event loop, each through a
second sqlite connection with busy timeout 0 that never checkpoints; each returns "not done"
where it would wait, and the twin then takes the thread path. This times every loop-side call
(``time.perf_counter`` around exactly what the twin calls on the loop) over ``--ops`` sends and
as many receive + ack, twice: alone on the file, and while another process writes batches of
100 messages to the same file as fast as it can (its commits hold the write lock, its
connection checkpoints the WAL). It prints p50 / p99 / max per call, how many were "not done"
(then done on a thread), the longest the loop was late for a 1 ms timer (the loop yields after
every call), the largest the WAL file grew, and checks that every message sent was received
once. ``--only`` runs N plain sends, or N receive + ack of a filled queue, through one API
and nothing else (``--base``: the same set-up without the N operations), for instruction
counts that the machine's load does not move: (run - base) / N per operation.

On a shared machine a call's wall time includes time the thread was runnable but waited for a
CPU (preempted): the "own" columns subtract that wait (the thread's run-queue time from
/proc/thread-self/schedstat), leaving the call's CPU time plus any wait for I/O or a lock;
"cpu max" is the largest CPU time of one call (time.thread_time).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mqprimer
import mqprimer.aio as aio
from mqprimer.aio import _nowait
from mqprimer.producer import Producer

WRITER = """
import sys, mqprimer
with mqprimer.connect(sys.argv[1]) as conn:
    p = conn.producer()
    print("ready", flush=True)
    while True:
        p.send_many([("writer", {"n": i}) for i in range(100)])
"""


class Clock:
    """Wall time of a call, and that minus the time the thread waited for a CPU meanwhile."""

    def __init__(self) -> None:
        self.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)

    def queued(self) -> float:
        return int(os.pread(self.fd, 100, 0).split()[1]) / 1e9


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] * 1e6 if xs else 0.0


async def lag_watch(out: list[float], stop: asyncio.Event, wal: str, wal_max: list[int]) -> None:
    """How late a 1 ms timer fires: the longest anything held the loop, plus scheduling noise."""
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        out.append(time.perf_counter() - t - 0.001)
        try:
            wal_max[0] = max(wal_max[0], os.path.getsize(wal))
        except OSError:
            pass


def instrument(times: dict[str, list[float]], own: dict[str, list[float]], cpu: dict[str, list[float]],
               missed: dict[str, int]) -> None:
    """Time every call the twin makes on its loop (it calls these three, and nothing else of
    the driver there): the public API below then runs exactly as in an application."""
    clock = Clock()

    def timed(k: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            q0 = clock.queued()
            c0 = time.thread_time()
            t = time.perf_counter()
            r = fn(*args)
            dt = time.perf_counter() - t
            cpu[k].append(time.thread_time() - c0)
            times[k].append(dt)
            own[k].append(max(0.0, dt - (clock.queued() - q0)))
            if r is None or r is False:
                missed[k] += 1
            return r

        return call

    _nowait.poll = timed("poll", _nowait.poll)  # type: ignore[assignment]
    _nowait.ack = timed("ack", _nowait.ack)  # type: ignore[assignment]
    Producer.send_nowait = timed("send", Producer.send_nowait)  # type: ignore[method-assign]


async def run(url: str, ops: int, wal: str, wal_max: list[int]) -> list[float]:
    lag: list[float] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(lag_watch(lag, stop, wal, wal_max))
    sent: list[str] = []
    got: list[str] = []
    async with aio.connect(url) as conn, conn.consumer("loop", prefetch=50) as c:
        p = conn.producer()
        for i in range(ops):
            sent.append(await p.send("loop", {"n": i}))
            await asyncio.sleep(0)  # let the lag watcher run
        while len(got) < len(sent):
            m = await c.receive(timeout=10)
            assert m is not None, f"lost: {len(sent) - len(got)} messages never came"
            got.append(m.id)
            await m.ack()
            await asyncio.sleep(0)
    stop.set()
    await watcher
    assert sorted(got) == sorted(sent), "a message was lost or delivered twice"
    return lag


def only(mode: str, phase: str, n: int, base: bool) -> None:
    url = f"sqlite:///{tempfile.mkdtemp(prefix='bench-sqlite-loop-')}/q.db"
    with mqprimer.connect(url) as b:
        if phase == "recv":
            b.producer().send_many([("q", {"n": 1}) for _ in range(n)])
    if base:
        n = 0
    if mode == "blocking":
        with mqprimer.connect(url) as conn, conn.consumer("q", prefetch=50) as c:
            p = conn.producer()
            p.send("w", 0)  # the first send learns the driver's path
            for _ in range(n if phase == "send" else 0):
                p.send("w", {"n": 1})
            for _ in range(n if phase == "recv" else 0):
                m = c.receive(timeout=5)
                assert m is not None
                m.ack()
        return

    async def run() -> None:
        async with aio.connect(url) as conn, conn.consumer("q", prefetch=50) as c:
            p = conn.producer()
            await p.send("w", 0)
            for _ in range(n if phase == "send" else 0):
                await p.send("w", {"n": 1})
            for _ in range(n if phase == "recv" else 0):
                m = await c.receive(timeout=5)
                assert m is not None
                await m.ack()

    asyncio.run(run())


def main() -> None:
    if "--only" in sys.argv:
        at = sys.argv.index("--only")
        only(sys.argv[at + 1], sys.argv[at + 2], int(sys.argv[at + 3]), "--base" in sys.argv)
        return
    ops = int(sys.argv[sys.argv.index("--ops") + 1]) if "--ops" in sys.argv else 5000
    times: dict[str, list[float]] = {"send": [], "poll": [], "ack": []}
    own: dict[str, list[float]] = {"send": [], "poll": [], "ack": []}
    cpu: dict[str, list[float]] = {"send": [], "poll": [], "ack": []}
    missed = {"send": 0, "poll": 0, "ack": 0}
    instrument(times, own, cpu, missed)
    for contended in (False, True):
        for k in times:
            times[k].clear()
            own[k].clear()
            cpu[k].clear()
            missed[k] = 0
        path = Path(tempfile.mkdtemp(prefix="bench-sqlite-loop-")) / "q.db"
        url = f"sqlite:///{path}"
        writer = None
        if contended:
            writer = subprocess.Popen([sys.executable, "-c", WRITER, url], stdout=subprocess.PIPE, text=True)
            assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        wal_max = [0]
        try:
            lag = asyncio.run(run(url, ops, f"{path}-wal", wal_max))
        finally:
            if writer is not None:
                writer.kill()
                writer.wait()
        title = "another process writing batches of 100" if contended else "alone on the file"
        print(f"\n## loop-side sqlite calls, {ops} sends + receives + acks, {title}")
        print(f"{'call':22} {'calls':>6} {'p50 µs':>7} {'p99 µs':>7} {'max µs':>8} {'own p99':>8} {'own max':>8} "
              f"{'cpu max':>8} {'not done':>8}")
        for k, xs in times.items():
            mine = own[k]
            print(f"{k:22} {len(xs):6d} {pct(xs, 0.5):7.1f} {pct(xs, 0.99):7.1f} {max(xs) * 1e6:8.1f} "
                  f"{pct(mine, 0.99):8.1f} {max(mine) * 1e6:8.1f} {max(cpu[k]) * 1e6:8.1f} {missed[k]:8d}")
        print(f"{'loop lag (1 ms timer)':22} {len(lag):6d} {pct(lag, 0.5):7.1f} {pct(lag, 0.99):7.1f} "
              f"{max(lag) * 1e6:8.1f}")
        print(f"largest WAL file seen: {wal_max[0] / 1e6:.1f} MB; every message received exactly once: yes")


if __name__ == "__main__":
    main()
