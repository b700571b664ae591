"""AMQP reads by the waiting thread (backends/_amqp_read.py): a thread that waits for a reply
or a delivery while the connection's I/O thread is idle reads the socket itself, runs pika's
timers and the work handed to the loop meanwhile, and gives the loop back when what it
waits for has come or the connection ends. Real RabbitMQ; connection loss through a private
TCP proxy, never by stopping the shared broker."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from queue import Empty, SimpleQueue
from typing import Any

import pytest

import mqprimer
from conftest import need_broker
from mqprimer.envelope import decode, encode, make
from mqprimer.testing.helpers import wait_until
from mqprimer.testing.proxy import Proxy
from mqprimer.url import URL

pytestmark = pytest.mark.timeout(60)


def _link(conn: mqprimer.Connection) -> Any:
    backend: Any = conn.endpoints[0].backend
    return backend._link


@pytest.fixture
def thread_errors() -> Iterator[list[BaseException | None]]:
    """Exceptions that end any thread meanwhile (pika's loop failing in a leader or in the I/O thread)."""
    seen: list[BaseException | None] = []
    old = threading.excepthook

    def hook(args: Any) -> None:
        seen.append(args.exc_value)
        old(args)

    threading.excepthook = hook
    yield seen
    threading.excepthook = old


_SERVICE = """
import sys, threading, mqprimer
url, queue = sys.argv[1:3]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
with mqprimer.connect(url) as conn, conn.consumer(queue) as c:
    reader = conn.endpoints[0].backend._link.reader
    print("ready", flush=True)
    before = None
    while not stop.is_set():
        m = c.receive(timeout=0.1)
        if m is not None:
            if m.body == "start":
                before = reader.led
            m.reply({"echo": m.body})
            m.ack()
    print("served", reader.led - before, flush=True)
"""


def test_sequential_round_trips_are_read_by_the_waiting_threads() -> None:
    """The caller reads its reply and the service (another process) its request; before,
    each connection's I/O thread read them and woke the waiting thread: two wake-ups per
    message, not one. (In one process, the waiting thread and its I/O thread race for the
    GIL when a reply comes while another thread holds it: either may read it then.)"""
    url = need_broker("amqp")
    queue = f"read{uuid.uuid4().hex[:8]}"
    rounds = 100
    svc = subprocess.Popen([sys.executable, "-c", _SERVICE, url, queue], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert svc.stdout is not None and svc.stdin is not None
        assert svc.stdout.readline().strip() == "ready"
        with mqprimer.connect(url) as conn:
            assert conn.request(queue, "start", timeout=10).body == {"echo": "start"}
            reader = _link(conn).reader
            before = reader.led
            for i in range(rounds):
                assert conn.request(queue, i, timeout=10).body == {"echo": i}
            caller = reader.led - before
        svc.stdin.close()
        line = svc.stdout.readline().split()
        assert line[:1] == ["served"], line
        service = int(line[1])
    finally:
        svc.kill()
        svc.wait(10)
    # what is left to the I/O thread: a wait that began while it was busy (its 0.2 s timer;
    # under load, a reply in before its caller masked the socket): quiet 58-60 of 60, with a
    # fresh-clone CI run's load beside it 40-46; with no reads by waiting threads 0
    assert min(caller, service) > rounds // 4, (
        f"of {rounds} replies and requests, read by the waiting thread: {caller}, {service}")


def test_a_thread_that_leads_keeps_heartbeats_going_and_serves_the_connection_s_other_consumers(
        thread_errors: list[BaseException | None]) -> None:
    """A thread that waits 3.5 s for something that never comes (heartbeat 1 s: RabbitMQ drops
    a connection silent for 2 s) runs the loop meanwhile: the connection lives, a consumer of
    the same connection gets its message at once, and that message's ack reaches the broker.
    (A consumer's own waits are cut into 0.25 s slices, between which the I/O thread may take
    the loop back: the reader's wait is driven directly to hold the loop longer than that.)"""
    base = need_broker("amqp")
    url = base + ("&" if "?" in base else "?") + "heartbeat=1"
    queue = f"busy{uuid.uuid4().hex[:8]}"
    with mqprimer.connect(url) as conn, conn.consumer(queue, prefetch=1) as other:
        link = _link(conn)
        assert other.receive(timeout=0.3) is None  # declared; and the I/O thread is idle now
        got: list[Any] = []

        def lead() -> None:
            try:
                link.reader.get(SimpleQueue(), 3.5)
            except Empty:
                got.append("empty")

        waiter = threading.Thread(target=lead, daemon=True)
        waiter.start()
        wait_until(lambda: link.reader.leader is waiter, timeout=5, what="the waiting thread leading the loop")
        with mqprimer.connect(base) as prod:
            prod.producer().send(queue, "first")
            t = time.monotonic()
            m = other.receive(timeout=3)
            assert m is not None and m.body == "first", "the consumer's message was not handed over"
            assert time.monotonic() - t < 1.5, "the consumer waited for the leader's wait to end"
            assert waiter.is_alive(), "the leader stopped leading early: this proved nothing"
            m.ack()
            prod.producer().send(queue, "second")
            # prefetch=1: the second message comes only once the broker has the first one's ack
            m = other.receive(timeout=3)
            assert m is not None and m.body == "second"
            m.ack()
            waiter.join(10)
            assert got == ["empty"]
            prod.producer().send(queue, "third")
        m = other.receive(timeout=5)
        assert m is not None and m.body == "third"
        m.ack()
        assert link.error is None, f"the connection was lost: {link.error!r}"
    assert thread_errors == []


def test_a_connection_lost_while_a_thread_leads_ends_its_wait_and_fails_no_thread(
        thread_errors: list[BaseException | None]) -> None:
    """The peer drops the connection while a consumer leads: the loop's failure reaches the
    waiting thread at once, the I/O thread ends cleanly (it had stale events for the closed
    socket), and the consumer goes on over a new connection."""
    url = need_broker("amqp")
    u = URL.parse(url)
    queue = f"lost{uuid.uuid4().hex[:8]}"
    with Proxy((u.host or "127.0.0.1", u.port or 5672)) as proxy:
        via = url.replace(f":{u.port}", f":{proxy.port}", 1)
        with mqprimer.connect(via) as conn, conn.consumer(queue) as c:
            assert c.receive(timeout=0.3) is None
            link = _link(conn)
            result: list[Any] = []

            def wait() -> None:
                try:
                    result.append(c.receive(timeout=20))
                except Exception as exc:  # reported below
                    result.append(exc)

            waiter = threading.Thread(target=wait, daemon=True)
            waiter.start()
            wait_until(lambda: link.reader.leader is waiter, timeout=5, what="the consumer leading the loop")
            proxy.cut()
            wait_until(lambda: link.error is not None, timeout=5, what="the loss noticed")
            wait_until(lambda: not link.thread.is_alive(), timeout=5, what="the I/O thread ending")
            with mqprimer.connect(url) as prod:
                prod.producer().send(queue, "after")
            waiter.join(25)
            assert len(result) == 1 and not isinstance(result[0], BaseException), result
            m = result[0]
            assert m is not None and m.body == "after", "the consumer did not go on over a new connection"
            m.ack()
    assert thread_errors == []


def test_a_request_is_transient_and_carries_what_a_raw_service_needs() -> None:
    """A request is sent with delivery_mode 1: its reply path (RabbitMQ direct reply-to) lives
    only as long as the caller's channel, so a request kept on disk over a broker restart could
    never be answered; writing it there only cost each round trip the broker's disk path (about
    half the round trip here). A raw pika service sees the properties it answers by."""
    import pika

    from mqprimer.backends._amqp_link import Options, parameters

    url = need_broker("amqp")
    queue = f"transient{uuid.uuid4().hex[:8]}"
    u = URL.parse(url)
    raw = pika.BlockingConnection(parameters(u, Options.from_url(u), "raw service test"))
    seen: list[Any] = []
    try:
        ch = raw.channel()
        ch.queue_declare(queue, durable=True, arguments={"x-max-priority": 9})

        def on(c: Any, method: Any, props: Any, body: bytes) -> None:
            seen.append(props)
            reply = encode(make(id=uuid.uuid4().hex, source="urn:raw", type="reply", body={"ok": 1},
                                correlation_id=decode(body).id))
            c.basic_publish("", props.reply_to, reply, pika.BasicProperties(correlation_id=props.correlation_id))
            c.basic_ack(method.delivery_tag)

        ch.basic_consume(queue, on)
        with mqprimer.connect(url) as conn:
            result: list[Any] = []
            caller = threading.Thread(target=lambda: result.append(conn.request(queue, {"n": 1}, timeout=10)),
                                      daemon=True)
            caller.start()
            deadline = time.monotonic() + 15
            while caller.is_alive() and time.monotonic() < deadline:
                raw.process_data_events(0.05)
            caller.join(1)
        assert len(seen) == 1 and len(result) == 1 and result[0].body == {"ok": 1}
        props = seen[0]
        assert props.delivery_mode in (None, 1), f"a persistent request (delivery_mode {props.delivery_mode})"
        assert props.reply_to.startswith("amq.rabbitmq.reply-to") and props.correlation_id
        assert props.expiration is not None and 0 < int(props.expiration) <= 10_000
    finally:
        raw.close()
