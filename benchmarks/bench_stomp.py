"""STOMP benchmarks: mqprimer against raw stomp.py on RabbitMQ and ActiveMQ, in one run.

Run (brokers from ``scripts/brokers up rabbitmq activemq``)::

    .venv/bin/python benchmarks/bench_stomp.py [N] [--before SRC [--rounds R] [--one]]   (default 4000, 5)
    .venv/bin/python benchmarks/bench_stomp.py --aio-sends [N]   (default 600)

``--before SRC`` (e.g. ``src`` of a ``git worktree add /tmp/stomp-before <commit>``) compares
this design with that checkout's STOMP driver instead, both loaded in this process: consume
+ ack with 1 consumer (the two in alternating chunks; then each alone, for its CPU time per
message), and 50 consumers on 50 queues (a thread each) with the threads and file
descriptors the 50 consumers cost (``--one``: 1 consumer only). Each round is printed.

For each broker: consume + ack (prefetch 100, pre-filled queue, same envelope bytes for
both; five alternating rounds, best kept, plus the client's CPU time per message), send
one at a time with a receipt (p50/p99), and batches of 100 sends with receipts (mqprimer
``send_many`` vs raw stomp.py sending 100 then waiting for the 100 receipts).
"""

from __future__ import annotations

import os
import queue
import statistics
import sys
import threading
import time
import types
import uuid
from pathlib import Path
from typing import Any

import stomp

sys.path.insert(0, str(Path(__file__).parent))
from _common import Best, Result, broker_urls, latencies, report, timed  # noqa: E402

import mqprimer  # noqa: E402
from mqprimer import registry  # noqa: E402
from mqprimer.backend import Outgoing  # noqa: E402
from mqprimer.url import URL  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BODY = {"user": "alice", "action": "signup", "plan": "pro", "n": 12345, "tags": ["a", "b"]}
PREFETCH = 100
BATCH = 100


class _Raw(stomp.ConnectionListener):  # type: ignore[misc]
    """The least a raw stomp.py user writes: an inbox and receipt tracking."""

    def __init__(self, url: str, rabbit: bool) -> None:
        u = URL.parse(url)
        self.rabbit = rabbit
        self.conn = stomp.Connection12([(u.host, u.port)], heartbeats=(4000, 4000), heart_beat_receive_scale=2.5,
                                       vhost="/", auto_decode=False)
        self.conn.set_listener("raw", self)
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.cond = threading.Condition()
        self.receipts: set[str] = set()
        self.conn.connect(u.username, u.password, wait=True)

    def on_message(self, frame: Any) -> None:
        self.inbox.put(frame)

    def on_receipt(self, frame: Any) -> None:
        with self.cond:
            self.receipts.add(frame.headers["receipt-id"])
            self.cond.notify_all()

    def wait(self, rids: list[str]) -> None:
        want = set(rids)
        with self.cond:
            while not want <= self.receipts:
                self.cond.wait(5)
            self.receipts -= want

    def headers(self) -> dict[str, str]:
        # the frames mqprimer sends (RabbitMQ refuses a queue declared with other arguments;
        # ActiveMQ gets an explicit priority 0, mqprimer's default, instead of JMS's 4)
        h = {"persistent": "true", "content-type": "application/cloudevents+json"}
        return {**h, "x-max-priority": "9"} if self.rabbit else {**h, "priority": "0"}

    def send(self, q: str, body: bytes, rid: str) -> None:
        self.conn.send(f"/queue/{q}", body, headers={**self.headers(), "receipt": rid})

    def close(self) -> None:
        self.conn.disconnect()


def _payload(conn: mqprimer.Connection) -> bytes:
    return conn.producer().build("x", BODY).payload


def _cpu_timed(name: str, n: int, fn: Any, cpu: dict[str, list[float]]) -> Result:
    """``timed`` plus this process's CPU time per message (stable where wall time is not)."""
    c0 = time.process_time()
    r = timed(name, n, fn)
    cpu.setdefault(name, []).append((time.process_time() - c0) / n * 1e6)
    return r


def consume(url: str, label: str, n: int, rabbit: bool, rounds: int = 5) -> list[Result]:
    """Alternate raw and mqprimer rounds (the broker's state drifts on a shared machine); keep the best."""
    best: dict[str, Result] = {}
    cpu: dict[str, list[float]] = {}
    with mqprimer.connect(url) as conn:
        payload = _payload(conn)

        def fill(q: str) -> None:
            for start in range(0, n, 500):
                items = [Outgoing(mqprimer.Queue(q), payload, str(uuid.uuid4())) for _ in range(min(500, n - start))]
                conn.publish(items)

        for _ in range(rounds):
            q_raw, q_ours = f"bench.raw.{uuid.uuid4().hex[:8]}", f"bench.ours.{uuid.uuid4().hex[:8]}"
            fill(q_raw)
            fill(q_ours)
            raw = _Raw(url, rabbit)
            sub = {"prefetch-count": str(PREFETCH)} if rabbit else {"activemq.prefetchSize": str(PREFETCH)}
            raw.conn.subscribe(f"/queue/{q_raw}", id="1", ack="client-individual", headers={**sub, **raw.headers()})

            def raw_loop(raw: _Raw = raw) -> None:
                for _ in range(n):
                    f = raw.inbox.get(timeout=30)
                    raw.conn.ack(f.headers["ack"])

            results = [_cpu_timed(f"{label} raw stomp.py consume+ack", n, raw_loop, cpu)]
            raw.close()
            with conn.consumer(q_ours, prefetch=PREFETCH) as c:
                def ours_loop(c: mqprimer.Consumer = c) -> None:
                    for _ in range(n):
                        m = c.receive(timeout=30)
                        assert m is not None
                        m.ack()

                results.append(_cpu_timed(f"{label} mqprimer consume+ack", n, ours_loop, cpu))
            for r in results:
                if r.name not in best or r.rate > best[r.name].rate:
                    best[r.name] = r
    for name, samples in cpu.items():
        print(f"{name}: client CPU {min(samples):.1f} µs/msg (best of {len(samples)} rounds)")
    return list(best.values())


def send(url: str, label: str, n: int, rabbit: bool) -> list[Result]:
    rows = []
    with mqprimer.connect(url) as conn:
        payload = _payload(conn)
        p = conn.producer()
        q = f"bench.send.{uuid.uuid4().hex[:8]}"
        raw = _Raw(url, rabbit)
        counter = iter(range(10**9))

        def raw_one() -> None:
            rid = f"r{next(counter)}"
            raw.send(q, payload, rid)
            raw.wait([rid])

        rows.append(latencies(f"{label} raw stomp.py send+receipt", n, raw_one))
        rows.append(latencies(f"{label} mqprimer send (receipt)", n, lambda: None if p.send(q, BODY) else None))

        def raw_batches() -> None:
            for _ in range(n // BATCH):
                rids = [f"r{next(counter)}" for _ in range(BATCH)]
                for rid in rids:
                    raw.send(q, payload, rid)
                raw.wait(rids)

        def our_batches() -> None:
            for _ in range(n // BATCH):
                p.send_many([(q, BODY)] * BATCH)

        m = n // BATCH * BATCH
        rows.append(timed(f"{label} raw stomp.py batch {BATCH} + receipts", m, raw_batches))
        rows.append(timed(f"{label} mqprimer send_many({BATCH})", m, our_batches))
        raw.close()
        # leave nothing behind: the benchmark queue is drained by a consumer
        with conn.consumer(q, prefetch=500) as c:
            while (msg := c.receive(timeout=1.0)) is not None:
                msg.ack()
    return rows


def _usage() -> tuple[int, int]:
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


def load_before(src: str) -> str:
    """Load the STOMP driver of another checkout (``src``) beside this one, as URL scheme
    ``stompbefore``: both designs then run in this process, under the same load."""
    base = Path(src) / "mqprimer" / "backends"
    renames = [(f"from .{m} import", f"from .{m}_before import") for m in ("_stomp_link", "_stomp_reply")]
    for name in ("_stomp_link", "_stomp_reply", "stomp"):
        code = (base / f"{name}.py").read_text()
        for old, new in renames:
            code = code.replace(old, new)
        mod = types.ModuleType(f"mqprimer.backends.{name}_before")
        mod.__package__ = "mqprimer.backends"
        sys.modules[mod.__name__] = mod
        exec(compile(code, str(base / f"{name}.py"), "exec"), mod.__dict__)
    registry._cache["stompbefore"] = mod.StompBackend
    return "stompbefore"


def _fill(conn: mqprimer.Connection, q: str, count: int) -> None:
    payload = _payload(conn)
    for start in range(0, count, 500):
        conn.publish([Outgoing(mqprimer.Queue(q), payload, str(uuid.uuid4())) for _ in range(min(500, count - start))])


def _drain(c: mqprimer.Consumer, count: int) -> None:
    for _ in range(count):
        m = c.receive(timeout=30)
        assert m is not None
        m.ack()


def designs(url: str, label: str, n: int, before: str, rounds: int = 5, many_too: bool = True) -> None:
    """This design against the one in ``before`` (a ``src`` directory), in this process.

    Each round: consume + ack by one consumer of each design in alternating chunks of 100 (who
    goes first alternates too), the wall-clock ratio of that round printed; then each design
    alone consumes ``n`` more while the process's CPU time (all threads) is counted, so the
    other design's receiver thread is idle then (interleaved, each design's prefetch arrives
    during the other's chunk). Then 50 consumers on 50 queues (a thread each), the designs
    taking turns."""
    urls = {"after": url, "before": url.replace("stomp://", f"{load_before(before)}://", 1)}
    best = Best()
    cpu: dict[str, list[float]] = {"after": [], "before": []}
    ratios: list[float] = []
    costs: dict[str, tuple[int, int]] = {}
    m = n // 100 * 100
    for r in range(rounds):
        with mqprimer.connect(urls["before"]) as old, mqprimer.connect(urls["after"]) as new:
            conns = {"before": old, "after": new}
            qs = {d: f"bench.one.{d}.{uuid.uuid4().hex[:8]}" for d in conns}
            for d, conn in conns.items():
                _fill(conn, qs[d], m)
            consumers = {d: conn.consumer(qs[d], prefetch=PREFETCH) for d, conn in conns.items()}
            spent = dict.fromkeys(conns, 0.0)
            for i in range(0, m, 100):
                for d in (("before", "after") if i // 100 % 2 else ("after", "before")):
                    t = time.perf_counter()
                    _drain(consumers[d], 100)
                    spent[d] += time.perf_counter() - t
            for d, c in consumers.items():
                c.close()
                best.keep(f"{label} consume+ack, 1 consumer, {d}", m, spent[d])
            ratios.append(spent["before"] / spent["after"])
            used = {}
            for d in (("before", "after") if r % 2 else ("after", "before")):
                _fill(conns[d], qs[d], m)
                with conns[d].consumer(qs[d], prefetch=PREFETCH) as c:
                    _drain(c, 1)  # the subscription is up and its prefetch arriving
                    c0 = time.process_time()
                    _drain(c, m - 1)
                    used[d] = (time.process_time() - c0) / (m - 1) * 1e6
                cpu[d].append(used[d])
        print(f"{label} round {r + 1}: 1 consumer {m / spent['after']:,.0f} vs {m / spent['before']:,.0f} msg/s "
              f"before, ratio {ratios[-1]:.2f}x; client CPU {used['after']:.1f} vs {used['before']:.1f} µs/msg "
              f"before ({used['before'] / used['after']:.2f}x less)", flush=True)
        if many_too:
            for d in ("before", "after"):
                rate, usage = many(urls[d], n)
                costs[d] = usage
                best.keep(f"{label} 50 consumers on 50 queues, {d}", n // 50 * 50, n // 50 * 50 / rate)
    cases = ("consume+ack, 1 consumer", "50 consumers on 50 queues") if many_too else ("consume+ack, 1 consumer",)
    report(f"STOMP on {label}: this design vs {before} (n={n}, best of {rounds} rounds, one process)",
           list(best.rows.values()), [(f"{label} {case}, after", f"{label} {case}, before") for case in cases])
    ca, cb = statistics.median(cpu["after"]), statistics.median(cpu["before"])
    print(f"1 consumer, per-round wall ratios: {', '.join(f'{x:.2f}' for x in ratios)} "
          f"(median {statistics.median(ratios):.2f}x)")
    print(f"client CPU per message, 1 consumer (median of the rounds, all threads): {ca:.1f} µs vs {cb:.1f} µs "
          f"before ({cb / ca:.2f}x less)")
    for d in costs:
        print(f"50 consumers cost ({d}): {costs[d][0]} extra threads, {costs[d][1]} extra file descriptors")


def many(url: str, n: int, k: int = 50) -> tuple[float, tuple[int, int]]:
    """``k`` consumers on ``k`` queues, a thread each: total msg/s, and the threads and fds the
    consumers cost (counted once each has received and acked, not counting the ``k`` workers)."""
    per = n // k
    with mqprimer.connect(url) as conn:
        queues = [f"bench.many.{uuid.uuid4().hex[:8]}.{i}" for i in range(k)]
        for q in queues:
            _fill(conn, q, per)
        threads0, fds0 = _usage()
        consumers = [conn.consumer(q, prefetch=PREFETCH) for q in queues]
        ready = threading.Barrier(k + 1)

        def work(c: mqprimer.Consumer) -> None:
            for i in range(per):
                m = c.receive(timeout=30)
                assert m is not None
                m.ack()
                if i == 0:
                    ready.wait()

        workers = [threading.Thread(target=work, args=(c,)) for c in consumers]
        start = time.perf_counter()
        for w in workers:
            w.start()
        ready.wait()
        threads, fds = _usage()
        for w in workers:
            w.join()
        rate = per * k / (time.perf_counter() - start)
        for c in consumers:
            c.close()
    return rate, (threads - threads0 - k, fds - fds0)


def aio_sends(url: str, label: str, n: int) -> None:
    """An asyncio send (whatever path the twin takes) against the same send handed to the twin's
    thread explicitly and the blocking send, in alternating chunks of 20; the thread path split
    into hop in, the blocking send on the thread, hop out (docs/backend-stomp.md, "asyncio")."""
    import asyncio

    import mqprimer.aio as aio

    q = f"bench.aiosend.{uuid.uuid4().hex[:8]}"
    marks: dict[str, float] = {}

    async def run() -> None:
        with mqprimer.connect(url) as bconn:
            bp = bconn.producer()
            async with aio.connect(url) as conn:
                p = conn.producer()
                plain = p._send_plain  # the twin's thread path for a plain send

                def timed(*a: Any) -> Any:
                    marks["start"] = time.perf_counter()
                    try:
                        return plain(*a)
                    finally:
                        marks["end"] = time.perf_counter()

                await p.send(q, BODY)
                cols: dict[str, list[float]] = {k: [] for k in ("blocking", "loop", "thread", "in", "body", "out")}
                for _ in range(max(1, n // 60)):
                    for _ in range(20):
                        t = time.perf_counter()
                        bp.send(q, BODY)
                        cols["blocking"].append(time.perf_counter() - t)
                    for _ in range(20):
                        t = time.perf_counter()
                        await p.send(q, BODY)
                        cols["loop"].append(time.perf_counter() - t)
                    for _ in range(20):
                        t0 = time.perf_counter()
                        await p._runner.call(timed, q, BODY, None)
                        t1 = time.perf_counter()
                        cols["thread"].append(t1 - t0)
                        cols["in"].append(marks["start"] - t0)
                        cols["body"].append(marks["end"] - marks["start"])
                        cols["out"].append(t1 - marks["end"])
            with bconn.consumer(q) as c:  # leave the queue empty
                while (m := c.receive(timeout=0.5)) is not None:
                    m.ack()
        us = {k: statistics.median(v) * 1e6 for k, v in cols.items()}
        print(f"{label}: p50 blocking send {us['blocking']:.0f} us; aio send {us['loop']:.0f} us "
              f"({us['blocking'] / us['loop']:.2f}x); through a thread {us['thread']:.0f} us "
              f"({us['blocking'] / us['thread']:.2f}x) = hop in {us['in']:.0f} + send on the thread "
              f"{us['body']:.0f} + hop out {us['out']:.0f} us")

    asyncio.run(run())


def main() -> None:
    args = sys.argv[1:]
    if "--aio-sends" in args:
        args.remove("--aio-sends")
        for name, url in sorted(broker_urls().items()):
            if name in ("stomp-rabbitmq", "stomp-activemq"):
                aio_sends(url, name, int(args[0]) if args else 600)
        return
    before = None
    if "--before" in args:
        i = args.index("--before")
        before = args[i + 1]
        del args[i:i + 2]
    rounds = 5
    if "--rounds" in args:
        i = args.index("--rounds")
        rounds = int(args[i + 1])
        del args[i:i + 2]
    many_too = "--one" not in args
    n = int(args[0]) if args and args[0].isdigit() else 4000
    urls = {k: v for k, v in broker_urls().items() if k in ("stomp-rabbitmq", "stomp-activemq")}
    if not urls:
        sys.exit("no STOMP broker running: scripts/brokers up rabbitmq activemq")
    for name, url in sorted(urls.items()):
        rabbit = name.endswith("rabbitmq")
        if before:
            designs(url, name, n, before, rounds, many_too)
            continue
        rows = consume(url, name, n, rabbit)
        rows += send(url, name, max(n // 5, BATCH), rabbit)
        report(f"STOMP on {name} (n={n}, prefetch {PREFETCH})", rows, [
            (f"{name} mqprimer consume+ack", f"{name} raw stomp.py consume+ack"),
            (f"{name} mqprimer send (receipt)", f"{name} raw stomp.py send+receipt"),
            (f"{name} mqprimer send_many({BATCH})", f"{name} raw stomp.py batch {BATCH} + receipts"),
        ])


if __name__ == "__main__":
    main()
