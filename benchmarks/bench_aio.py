"""mqprimer.aio against the blocking API on the same backend, in one run.

    .venv/bin/python benchmarks/bench_aio.py [memory sqlite amqp beanstalk zeromq stomp-rabbitmq gearman ...]
    .venv/bin/python benchmarks/bench_aio.py --quick memory
    .venv/bin/python benchmarks/bench_aio.py --hop-floor

Per backend: one producer sending (``await producer.send`` vs ``producer.send``), one consumer
receiving and acking a filled queue (``await receive`` + ``await ack`` vs the blocking pair),
both interleaved in chunks so that a load burst hits both sides alike, best of 3 rounds; and
100 concurrent senders: 100 asyncio tasks on one connection vs 100 threads on one connection.
The ratio aio / blocking is printed for each (target >= 0.8x for the one-producer cases), and
the cost of one thread hop (a no-op call awaited from a thread, timed in the same chunks) with
the best ratio a call that still takes the thread path can reach.
"""

from __future__ import annotations

import asyncio
import queue
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Result, broker_urls, report, timed_threads  # noqa: E402

import mqprimer  # noqa: E402
import mqprimer.aio as aio  # noqa: E402
from mqprimer.aio._runner import Runner  # noqa: E402

QUICK = "--quick" in sys.argv
ROUNDS = 3


def url_of(name: str) -> str:
    if name == "memory":
        return "memory://bench-aio"
    if name == "sqlite":
        return f"sqlite:///{tempfile.mkdtemp(prefix='bench-aio-')}/b.db"
    if name == "zeromq":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return f"zmq+tcp://127.0.0.1:{port}"
    url = broker_urls().get(name)
    if url is None:
        raise SystemExit(f"no {name} URL in .run/brokers/urls: scripts/brokers up")
    return url


def counts(name: str) -> tuple[int, int]:
    """(one-producer messages per chunk x chunks, concurrent-senders total)."""
    fast = name in ("memory", "zeromq")
    n = 400 if fast else 100
    return (n // 2 if QUICK else n), (2000 if fast else 1000) // (2 if QUICK else 1)


class Side:
    """Accumulates the per-call latencies of one side over several chunks (best round kept)."""

    def __init__(self) -> None:
        self.lat: list[float] = []


def result(name: str, lat: list[float]) -> Result:
    lat = sorted(lat)
    return Result(name, len(lat), sum(lat), lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6)


async def one_producer_one_consumer(name: str, url: str, chunk: int) -> list[Result]:
    q_send, q_recv = f"bs{uuid.uuid4().hex[:8]}", f"br{uuid.uuid4().hex[:8]}"
    chunks = 5
    best: dict[str, Result] = {}
    blocking = mqprimer.connect(url)
    # zeromq: a PUSH socket blocks at its high-water mark without a peer, so q_send gets one
    drain = blocking.consumer(q_send, prefetch=100) if name == "zeromq" else None
    hop = Runner(1, "bench-hop")
    async with aio.connect(url) as conn:
        bp, ap = blocking.producer(), conn.producer()
        try:
            for _ in range(ROUNDS):
                lat: dict[str, list[float]] = {k: [] for k in ("send blocking", "send aio", "recv+ack blocking",
                                                                "recv+ack aio", "thread hop")}
                for _ in range(chunks):
                    # the floor of the thread path: a no-op call handed to a thread and awaited
                    for _ in range(chunk):
                        t = time.perf_counter()
                        await hop.call(_noop, inline=False)
                        lat["thread hop"].append(time.perf_counter() - t)
                    for _ in range(chunk):
                        t = time.perf_counter()
                        bp.send(q_send, {"n": 1})
                        lat["send blocking"].append(time.perf_counter() - t)
                    for _ in range(chunk):
                        t = time.perf_counter()
                        await ap.send(q_send, {"n": 1})
                        lat["send aio"].append(time.perf_counter() - t)
                    # each consumer alone on the queue while it is timed (one consumer, as the target says)
                    bp.send_many([(q_recv, {"n": i}) for i in range(chunk)])
                    with blocking.consumer(q_recv, prefetch=50) as bc:
                        for _ in range(chunk):
                            t = time.perf_counter()
                            m = bc.receive(timeout=10)
                            assert m is not None
                            m.ack()
                            lat["recv+ack blocking"].append(time.perf_counter() - t)
                    bp.send_many([(q_recv, {"n": i}) for i in range(chunk)])
                    async with conn.consumer(q_recv, prefetch=50) as ac:
                        for _ in range(chunk):
                            t = time.perf_counter()
                            am = await ac.receive(timeout=10)
                            assert am is not None
                            await am.ack()
                            lat["recv+ack aio"].append(time.perf_counter() - t)
                    if drain is not None:
                        for _ in range(2 * chunk):
                            dm = drain.receive(timeout=10)
                            assert dm is not None
                            dm.ack()
                for k, v in lat.items():
                    r = result(f"{name} {k}", v)
                    if k not in best or r.rate > best[k].rate:
                        best[k] = r
        finally:
            hop.shutdown()
            if drain is not None:
                drain.close()
            else:
                purge(blocking, q_send, 2 * chunks * chunk * ROUNDS)
            blocking.close()
    return list(best.values())


def _noop() -> None:
    return None


def hop_bounds(name: str, rows: list[Result]) -> None:
    """The ratio of median latencies; and where a call still takes the thread path, the best
    ratio it can reach: its blocking time over that time plus one hop per awaited call (send 1,
    receive + ack 2)."""
    by = {r.name: r for r in rows}
    for case in ("send", "recv+ack"):  # medians: what a load burst moves least
        a, b = by.get(f"{name} {case} aio"), by.get(f"{name} {case} blocking")
        if a is not None and b is not None and a.p50_us and b.p50_us:
            print(f"ratio of p50 latencies {name} {case} blocking / aio: {b.p50_us / a.p50_us:.2f}x")
    h = by.get(f"{name} thread hop")
    if h is None:
        return
    hop_us = 1e6 / h.rate
    for case, hops in (("send", 1), ("recv+ack", 2)):
        b = by.get(f"{name} {case} blocking")
        if b is not None:
            b_us = 1e6 / b.rate
            print(f"{name} {case} on the thread path: blocking {b_us:.1f} us/op, hop {hop_us:.1f} us: with "
                  f"{hops} hop(s) the ratio is at most {b_us / (b_us + hops * hop_us):.2f}x")


def threads_sending(name: str, url: str, total: int, n_threads: int = 100) -> Result:
    q = f"bt{uuid.uuid4().hex[:8]}"
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        each = total // n_threads
        go = threading.Barrier(n_threads + 1)

        def run() -> None:
            go.wait()
            for _ in range(each):
                p.send(q, {"n": 1})

        secs = timed_threads([threading.Thread(target=run) for _ in range(n_threads)], go)
        purge(conn, q, each * n_threads)
    return Result(f"{name} send, {n_threads} threads", each * n_threads, secs)


async def tasks_sending(name: str, url: str, total: int, n_tasks: int = 100) -> Result:
    q = f"ba{uuid.uuid4().hex[:8]}"
    async with aio.connect(url) as conn:
        p = conn.producer()
        each = total // n_tasks

        async def run() -> None:
            for _ in range(each):
                await p.send(q, {"n": 1})

        start = time.perf_counter()
        await asyncio.gather(*(run() for _ in range(n_tasks)))
        secs = time.perf_counter() - start
    with mqprimer.connect(url) as b:
        purge(b, q, each * n_tasks)
    return Result(f"{name} send, {n_tasks} tasks", each * n_tasks, secs)


def purge(conn: mqprimer.Connection, q: str, n: int) -> None:
    """Leave the broker as found (brokers are shared)."""
    with conn.consumer(q, prefetch=200) as c:
        for _ in range(n):
            m = c.receive(timeout=5)
            if m is None:
                return
            m.ack()


async def hop_floor(n: int = 500, rounds: int = 10) -> None:
    """The floor of handing a call to a thread, interleaved in one process: the aio runner's
    hop (future + call_soon_threadsafe), a bare hand-off in which the loop thread BLOCKS on a
    lock until the worker is done (not usable: it blocks the loop; the least any thread-based
    design could cost), and the direct call."""
    jobs: queue.SimpleQueue[threading.Lock | None] = queue.SimpleQueue()

    def worker() -> None:
        while (done := jobs.get()) is not None:
            _noop()
            done.release()

    threading.Thread(target=worker, daemon=True).start()

    def handoff() -> None:
        done = threading.Lock()
        done.acquire()
        jobs.put(done)
        done.acquire()

    hop = Runner(1, "bench-hop")
    lat: dict[str, list[float]] = {"runner hop": [], "blocking hand-off": [], "direct call": []}
    for _ in range(rounds):
        for _ in range(n):
            t = time.perf_counter()
            await hop.call(_noop, inline=False)
            lat["runner hop"].append(time.perf_counter() - t)
        for _ in range(n):
            t = time.perf_counter()
            handoff()
            lat["blocking hand-off"].append(time.perf_counter() - t)
        for _ in range(n):
            t = time.perf_counter()
            _noop()
            lat["direct call"].append(time.perf_counter() - t)
    hop.shutdown()
    jobs.put(None)
    report("handing a call to a thread", [result(k, v) for k, v in lat.items()])


def main() -> None:
    if "--hop-floor" in sys.argv:
        asyncio.run(hop_floor())
        return
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or ["memory", "sqlite"]
    for name in names:
        url = url_of(name)
        chunk, total = counts(name)
        try:
            rows = asyncio.run(one_producer_one_consumer(name, url, chunk))
        except mqprimer.ConnectionFailed as exc:  # shared brokers get restarted: go on with the next one
            print(f"\n## {name}: skipped, {exc}")
            continue
        if name != "zeromq":  # zeromq: one PUSH socket per connection; 100 senders only queue behind it
            rows.append(threads_sending(name, url, total))
            rows.append(asyncio.run(tasks_sending(name, url, total)))
        report(f"mqprimer.aio vs blocking on {name}", rows, [
            (f"{name} send aio", f"{name} send blocking"),
            (f"{name} recv+ack aio", f"{name} recv+ack blocking"),
            (f"{name} send, 100 tasks", f"{name} send, 100 threads"),
        ])
        hop_bounds(name, rows)


if __name__ == "__main__":
    main()
