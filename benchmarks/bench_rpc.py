"""Request/reply round trips per second: mqprimer beside the raw client doing the same.

Run: .venv/bin/python benchmarks/bench_rpc.py [memory sqlite beanstalk amqp stomp-rabbitmq ...] [--n 2000] [--rounds 5]
     [--json]
(broker URLs from .run/brokers/urls)

For each backend, in one run: a service thread answers on a queue, and a caller makes
``--n`` round trips sequentially (one in flight), then ``--n`` with 16 in flight:

- mqprimer: service = ``consumer.receive()`` + ``message.reply()`` + ``ack()``; caller =
  ``conn.request()``, sequential from one thread, then from 16 threads on one connection,
  then 16 in flight from one thread as the raw rows do it: 16 tasks of the asyncio twin
  (``mqprimer.aio``) on one connection.
- raw, same broker, same envelope bytes, the protocol's own request/reply:
  amqp = pika with direct reply-to (``amq.rabbitmq.reply-to``; service publishes to
  ``reply_to`` and acks; 16 in flight = 16 outstanding publishes on one channel);
  beanstalk = greenstalk (put to the service tube; the service reserves, puts the reply
  into the caller's tube named in the request, deletes; the caller reserves and deletes);
  gearman = pygearman foreground jobs (``submit_job``; 16 in flight = ``submit_multiple_jobs``
  in rounds of 16); zeromq = pyzmq REQ/REP against a ROUTER service (16 in flight = one DEALER
  with 16 outstanding); stomp = stomp.py with ``reply-to:/temp-queue/...`` and ``correlation-id``
  (16 in flight = 16 outstanding SENDs on one connection). memory and sqlite are mqprimer only here.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import Result, broker_urls, free_port_pair, report  # noqa: E402

import mqprimer  # noqa: E402
import mqprimer.aio  # noqa: E402
from mqprimer.envelope import decode, encode, make  # noqa: E402

BODY = {"path": "photos/a.jpg", "width": 1280, "height": 960}
INFLIGHT = 16


def _payload(reply_to: str = "", corr: str = "") -> bytes:
    return encode(make(id=uuid.uuid4().hex, source="urn:bench", type="bench", body=BODY,
                       reply_to=reply_to or None, correlation_id=corr or None))


# -- mqprimer -------------------------------------------------------------------------------
def _serve_mq(url: str, dest: str, stop: threading.Event, ready: threading.Event) -> None:
    with mqprimer.connect(url) as conn, conn.consumer(dest, prefetch=32) as c:
        ready.set()
        while not stop.is_set():
            m = c.receive(timeout=0.1)
            if m is not None:
                m.reply({"width": 640})
                m.ack()


def bench_mqprimer(url: str, n: int) -> list[Result]:
    dest = f"bench-rpc-{uuid.uuid4().hex[:8]}"
    stop, ready = threading.Event(), threading.Event()
    server = threading.Thread(target=_serve_mq, args=(url, dest, stop, ready), daemon=True)
    server.start()
    ready.wait(30)
    out = []
    with mqprimer.connect(url) as conn:
        for _ in range(20):  # warm up: the reply path, caches
            conn.request(dest, BODY, timeout=30)
        lat: list[float] = []
        start = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            conn.request(dest, BODY, timeout=30)
            lat.append(time.perf_counter() - t)
        out.append(_result("mqprimer sequential", n, time.perf_counter() - start, lat))

        per = n // INFLIGHT

        def caller() -> None:
            for _ in range(per):
                conn.request(dest, BODY, timeout=60)

        threads = [threading.Thread(target=caller) for _ in range(INFLIGHT)]
        start = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        out.append(Result(f"mqprimer {INFLIGHT} in flight", per * INFLIGHT, time.perf_counter() - start))
    out.append(asyncio.run(_aio_inflight(url, dest, n)))
    stop.set()
    server.join(10)
    return out


async def _aio_inflight(url: str, dest: str, n: int) -> Result:
    """16 in flight from one thread, as the raw rows do it: the asyncio twin, 16 tasks on one
    connection (they wait on the loop itself where the reply path offers a descriptor: zeromq)."""
    async with mqprimer.aio.connect(url) as conn:
        for _ in range(20):
            await conn.request(dest, BODY, timeout=30)
        per = n // INFLIGHT

        async def caller() -> None:
            for _ in range(per):
                await conn.request(dest, BODY, timeout=60)

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(INFLIGHT)))
        return Result(f"mqprimer {INFLIGHT} in flight, asyncio", per * INFLIGHT, time.perf_counter() - start)


def _result(name: str, n: int, secs: float, lat: list[float]) -> Result:
    lat.sort()
    return Result(name, n, secs, lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6)


def _raw_rounds(name: str, n: int, one: Callable[[], None], many: Callable[[int], None]) -> list[Result]:
    for _ in range(20):
        one()
    lat: list[float] = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        one()
        lat.append(time.perf_counter() - t)
    seq = _result(f"raw {name} sequential", n, time.perf_counter() - start, lat)
    start = time.perf_counter()
    many(n)
    return [seq, Result(f"raw {name} {INFLIGHT} in flight", n, time.perf_counter() - start)]


# -- raw AMQP (pika, direct reply-to) ---------------------------------------------------------
def bench_raw_amqp(url: str, n: int) -> list[Result]:
    import pika

    from mqprimer.backends._amqp_link import Options, parameters

    u = mqprimer.URL.parse(url)
    params = parameters(u, Options.from_url(u), "bench raw")
    queue = f"bench-raw-rpc-{uuid.uuid4().hex[:8]}"
    stop, ready = threading.Event(), threading.Event()

    def serve() -> None:
        conn = pika.BlockingConnection(params)
        ch = conn.channel()
        ch.queue_declare(queue, auto_delete=True)
        ch.basic_qos(prefetch_count=32)
        reply = _payload()

        def on(ch: Any, method: Any, props: Any, body: bytes) -> None:
            decode(body)
            ch.basic_publish("", props.reply_to, reply, pika.BasicProperties(correlation_id=props.correlation_id))
            ch.basic_ack(method.delivery_tag)

        ch.basic_consume(queue, on)
        ready.set()
        while not stop.is_set():
            conn.process_data_events(0.1)
        conn.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    ready.wait(30)
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    got: dict[str, bytes] = {}
    ch.basic_consume("amq.rabbitmq.reply-to", lambda c, m, p, b: got.__setitem__(p.correlation_id, b), auto_ack=True)
    seq = iter(range(10**9))

    def send() -> str:
        corr = str(next(seq))
        ch.basic_publish("", queue, _payload("amq.rabbitmq.reply-to", corr),
                         pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id=corr))
        return corr

    def one() -> None:
        corr = send()
        while corr not in got:
            conn.process_data_events(1)
        decode(got.pop(corr))

    def many(total: int) -> None:
        sent = done = 0
        while done < total:
            while sent - done < INFLIGHT and sent < total:
                send()
                sent += 1
            conn.process_data_events(1)
            for corr in list(got):
                decode(got.pop(corr))
                done += 1

    try:
        return _raw_rounds("pika direct reply-to", n, one, many)
    finally:
        stop.set()
        th.join(10)
        conn.close()


# -- raw beanstalkd (greenstalk) --------------------------------------------------------------
def bench_raw_beanstalk(url: str, n: int) -> list[Result]:
    import greenstalk

    u = mqprimer.URL.parse(url)
    addr = (u.host or "127.0.0.1", u.port or 11300)
    tube, back = f"bench-raw-rpc-{uuid.uuid4().hex[:8]}", f"bench-raw-reply-{uuid.uuid4().hex[:8]}"
    stop, ready = threading.Event(), threading.Event()

    def serve() -> None:
        s = greenstalk.Client(addr, encoding=None, watch=tube)
        ready.set()
        while not stop.is_set():
            try:
                job = s.reserve(timeout=1)
            except greenstalk.TimedOutError:
                continue
            env = decode(job.body)
            s.use(env.reply_to or back)
            s.put(_payload("", env.id))
            s.delete(job)
        s.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    ready.wait(30)
    c = greenstalk.Client(addr, encoding=None, use=tube, watch=back)

    def one() -> None:
        c.put(_payload(back))
        job = c.reserve(timeout=30)
        decode(job.body)
        c.delete(job)

    def many(total: int) -> None:
        sent = done = 0
        while done < total:
            while sent - done < INFLIGHT and sent < total:
                c.put(_payload(back))
                sent += 1
            job = c.reserve(timeout=30)
            decode(job.body)
            c.delete(job)
            done += 1

    try:
        return _raw_rounds("greenstalk", n, one, many)
    finally:
        stop.set()
        th.join(10)
        c.close()


# -- raw gearmand (pygearman foreground jobs) ----------------------------------------------------
def bench_raw_gearman(url: str, n: int) -> list[Result]:
    import gearman  # pygearman

    u = mqprimer.URL.parse(url)
    host = f"{u.host or '127.0.0.1'}:{u.port or 4730}"
    task = f"bench-raw-rpc-{uuid.uuid4().hex[:8]}".encode()
    reply = _payload()

    worker = gearman.GearmanWorker([host])  # a daemon thread: it serves until the process ends

    def answer(w: Any, job: Any) -> bytes:
        decode(job.data)
        return reply

    worker.register_task(task, answer)
    th = threading.Thread(target=worker.work, kwargs={"poll_timeout": 0.1}, daemon=True)
    th.start()
    client = gearman.GearmanClient([host])

    def one() -> None:
        req = client.submit_job(task, _payload(), background=False, wait_until_complete=True, poll_timeout=30)
        assert req.state == "COMPLETE", (req.state, req.exception)
        decode(req.result)

    def many(total: int) -> None:
        for start in range(0, total, INFLIGHT):
            jobs = [{"task": task, "data": _payload()} for _ in range(min(INFLIGHT, total - start))]
            for req in client.submit_multiple_jobs(jobs, background=False, wait_until_complete=True, poll_timeout=30):
                decode(req.result)

    return _raw_rounds("pygearman foreground", n, one, many)


# -- raw ZeroMQ (pyzmq REQ/REP; DEALER for 16 in flight) ----------------------------------------
def bench_raw_zeromq(url: str, n: int) -> list[Result]:
    import zmq

    ctx = zmq.Context()
    addr = f"tcp://127.0.0.1:{free_port_pair()}"
    stop, ready = threading.Event(), threading.Event()

    def serve() -> None:  # a ROUTER answers REQ (sequential) and DEALER (16 in flight) callers alike
        router = ctx.socket(zmq.ROUTER)
        router.bind(addr)
        ready.set()
        reply = _payload()
        while not stop.is_set():
            if router.poll(100):
                frames = router.recv_multipart()
                decode(frames[-1])
                router.send_multipart([*frames[:-1], reply])
        router.close(0)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    ready.wait(30)
    req, dealer = ctx.socket(zmq.REQ), ctx.socket(zmq.DEALER)
    req.connect(addr)
    dealer.connect(addr)

    def one() -> None:
        req.send(_payload())
        decode(req.recv())

    def many(total: int) -> None:
        sent = done = 0
        while done < total:
            while sent - done < INFLIGHT and sent < total:
                dealer.send_multipart([b"", _payload()])
                sent += 1
            decode(dealer.recv_multipart()[-1])
            done += 1

    try:
        return _raw_rounds("pyzmq REQ/REP", n, one, many)
    finally:
        stop.set()
        th.join(10)
        req.close(0)
        dealer.close(0)
        ctx.term()


# -- raw STOMP (stomp.py, /temp-queue/ reply-to) -----------------------------------------------
def bench_raw_stomp(url: str, n: int) -> list[Result]:
    """stomp.py the way a STOMP client does request/reply: the service answers each MESSAGE with a
    SEND to its ``reply-to`` (the broker's rewrite of the caller's ``/temp-queue/``) carrying the
    ``correlation-id``, then ACKs it (client-individual, prefetch 32, all on stomp.py's receiver
    thread); the caller SENDs with ``reply-to:/temp-queue/<name>`` and waits for the reply that
    stomp.py's receiver thread puts in a queue. Connected as backends/stomp.py connects (URL
    credentials and vhost, 4 s heart-beats), plus TCP_NODELAY."""
    import queue

    import stomp

    u = mqprimer.URL.parse(url)
    vhost = u.params.get("vhost") or (u.path.lstrip("/") or "/")
    dest = f"/queue/bench-raw-rpc-{uuid.uuid4().hex[:8]}"
    temp = f"/temp-queue/bench-raw-reply-{uuid.uuid4().hex[:8]}"
    reply = _payload()

    def connect(listener: stomp.ConnectionListener) -> stomp.Connection12:
        c = stomp.Connection12([(u.host or "127.0.0.1", u.port or 61613)], heartbeats=(4000, 4000),
                               heart_beat_receive_scale=2.5, vhost=vhost, auto_decode=False)
        c.set_listener("bench", listener)
        c.connect(u.username, u.password, wait=True)
        # the service writes SEND then ACK: with Nagle on, the ACK waits for the broker's delayed
        # TCP ack of the SEND (40 ms a round trip here); a client that cares turns it off
        c.transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return c

    class Service(stomp.ConnectionListener):  # type: ignore[misc]
        def __init__(self) -> None:
            self.server = ""
            self.subscribed = threading.Event()

        def on_connected(self, frame: Any) -> None:
            self.server = frame.headers.get("server", "")

        def on_receipt(self, frame: Any) -> None:
            self.subscribed.set()

        def on_message(self, frame: Any) -> None:
            h = frame.headers
            decode(frame.body)
            server.send(h["reply-to"], reply, headers={"correlation-id": h["correlation-id"]})
            server.ack(h["ack"])

    class Caller(stomp.ConnectionListener):  # type: ignore[misc]
        def __init__(self) -> None:
            self.replies: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
            self.subscribed = threading.Event()

        def on_receipt(self, frame: Any) -> None:
            self.subscribed.set()

        def on_message(self, frame: Any) -> None:
            self.replies.put((frame.headers["correlation-id"], frame.body))

    service, caller = Service(), Caller()
    server = connect(service)
    client = connect(caller)
    activemq = "activemq" in service.server.lower()
    prefetch = {"activemq.prefetchSize": "32"} if activemq else {"prefetch-count": "32"}
    server.subscribe(dest, "svc", ack="client-individual", headers={**prefetch, "receipt": "sub"})
    service.subscribed.wait(30)
    if activemq:  # RabbitMQ subscribes a temp queue's owner by itself
        client.subscribe(temp, "reply", ack="auto", headers={"receipt": "sub"})
        caller.subscribed.wait(30)
    seq = iter(range(10**9))

    def send() -> str:
        corr = str(next(seq))
        client.send(dest, _payload(temp, corr), headers={"reply-to": temp, "correlation-id": corr})
        return corr

    def one() -> None:
        corr = send()
        got, body = caller.replies.get(timeout=30)
        assert got == corr, (got, corr)
        decode(body)

    def many(total: int) -> None:
        sent = done = 0
        out: set[str] = set()
        while done < total:
            while sent - done < INFLIGHT and sent < total:
                out.add(send())
                sent += 1
            got, body = caller.replies.get(timeout=30)
            out.remove(got)
            decode(body)
            done += 1

    try:
        return _raw_rounds("stomp.py temp-queue", n, one, many)
    finally:
        client.disconnect()
        server.disconnect()


RAW = {"amqp": bench_raw_amqp, "beanstalk": bench_raw_beanstalk, "gearman": bench_raw_gearman,
       "zeromq": bench_raw_zeromq, "stomp-rabbitmq": bench_raw_stomp, "stomp-activemq": bench_raw_stomp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("backends", nargs="*", default=["memory", "sqlite", "beanstalk", "amqp"])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat raw and mqprimer this many times in one process, alternating which goes first "
                         "(a loaded machine's drift hits both), and print each round's ratios and their median")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    urls = broker_urls()
    urls.update(memory="memory://bench-rpc", sqlite=f"sqlite:////tmp/mqprimer-bench-rpc-{uuid.uuid4().hex[:6]}.db",
                zeromq=f"zmq+tcp://127.0.0.1:{free_port_pair()}")
    for name in args.backends:
        url = urls.get(name)
        if url is None:
            raise SystemExit(f"no {name} URL: run scripts/brokers up first")
        ratios: list[tuple[float, float, float]] = []
        for rnd in range(args.rounds):
            raw_rows = RAW[name](url, args.n) if name in RAW and rnd % 2 == 0 else []
            rows = bench_mqprimer(url, args.n)
            if name in RAW and rnd % 2 == 1:
                raw_rows = RAW[name](url, args.n)
            rows = raw_rows + rows
            pairs: list[tuple[str, str]] = []
            if raw_rows:
                raw = rows[0].name.rsplit(" ", 1)[0]
                pairs = [("mqprimer sequential", f"{raw} sequential"),
                         (f"mqprimer {INFLIGHT} in flight", f"{rows[1].name}"),
                         (f"mqprimer {INFLIGHT} in flight, asyncio", f"{rows[1].name}")]
                ratios.append((rows[2].rate / rows[0].rate, rows[3].rate / rows[1].rate,
                               rows[4].rate / rows[1].rate))
            suffix = f" (round {rnd + 1}/{args.rounds}, {'raw' if rnd % 2 == 0 else 'mqprimer'} first)" \
                if args.rounds > 1 else ""
            report(f"request/reply round trips, {name}{suffix}", rows, pairs)
        if len(ratios) > 1:
            seq, many, aio = (statistics.median(r[i] for r in ratios) for i in range(3))
            print(f"\n{name}: sequential ratios {' / '.join(f'{r[0]:.2f}' for r in ratios)} "
                  f"(median {seq:.2f}); {INFLIGHT} in flight, threads "
                  f"{' / '.join(f'{r[1]:.2f}' for r in ratios)} (median {many:.2f}); asyncio "
                  f"{' / '.join(f'{r[2]:.2f}' for r in ratios)} (median {aio:.2f})")


if __name__ == "__main__":
    main()
