"""STOMP request/reply costs that issue 13's benchmark found (docs/backend-stomp.md, "Request/reply"):
a reply is not waited for, every socket has Nagle off, and a busy consumer's ACKs do not wake
the ACK flusher one by one. Real brokers, both flavours."""

from __future__ import annotations

import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

import mqprimer
from conftest import driver_sub as _sub
from conftest import need_broker
from mqprimer.backends import _stomp_acks
from mqprimer.backends._stomp_link import Link
from mqprimer.envelope import decode, encode, make
from mqprimer.testing.helpers import collect, wait_until

pytestmark = pytest.mark.timeout(60)
FLAVOURS = ["stomp-rabbitmq", "stomp-activemq"]


def _switches(native_id: int) -> int:
    status = Path(f"/proc/self/task/{native_id}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


@pytest.mark.parametrize("name", FLAVOURS)
def test_a_reply_is_sent_without_waiting_for_a_receipt(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on AMQP, a reply lives only as long as its caller waits: a RECEIPT for it would cost
    the service a broker round trip and two thread wake-ups per request for nothing."""
    url = need_broker(name)
    dest = f"rpcnr{uuid.uuid4().hex[:8]}"
    waited: list[Link] = []
    wait_receipts = Link.wait_receipts

    def spy(self: Link, rids: Any, timeout: float | None = None) -> None:
        waited.append(self)
        wait_receipts(self, rids, timeout)

    with mqprimer.connect(url) as service, service.consumer(dest) as c, mqprimer.connect(url) as caller:
        got: list[Any] = []
        th = threading.Thread(target=lambda: got.append(caller.request(dest, "ping", timeout=20).body))
        th.start()
        m = c.receive(timeout=15)
        assert m is not None and m.reply_to is not None
        monkeypatch.setattr(Link, "wait_receipts", spy)
        m.reply("pong")
        m.ack()
        th.join(20)
        assert got == ["pong"]
        backend = _sub(c).backend
        assert backend._reply_link is not None, "no reply connection: the reply went elsewhere"
        assert backend._reply_link not in waited, "the reply waited for the broker's RECEIPT"


@pytest.mark.parametrize("name", FLAVOURS)
def test_every_link_has_nagle_off(name: str) -> None:
    """Frames are written whole; with Nagle on, a reply written while the previous one is
    unacknowledged waits for the broker's delayed TCP ack (40 ms): 16 requests in flight on
    ActiveMQ ran at ~250 round trips/s instead of ~1,000."""
    url = need_broker(name)
    with mqprimer.connect(url) as conn, conn.consumer(f"rpcnd{uuid.uuid4().hex[:8]}") as c:
        sock = _sub(c).link.conn.transport.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.mark.parametrize("name", FLAVOURS)
def test_a_busy_consumers_acks_do_not_wake_the_ack_flusher_one_by_one(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer that acks and then waits writes its ACK itself before waiting; the flusher,
    woken by the first ACK, lingers and is not woken again by the next ones (it was, once per
    ACK: two of a STOMP round trip's twelve thread wake-ups, most for nothing). The linger is
    made long here so that the loop below fits in one."""
    monkeypatch.setattr(_stomp_acks, "ACK_LINGER", 2.0)
    url = need_broker(name)
    q = f"rpcack{uuid.uuid4().hex[:8]}"
    n = 30
    with mqprimer.connect(url) as conn:
        conn.producer().send_many((q, {"i": i}) for i in range(n))
        with conn.consumer(q, prefetch=n) as c:
            got = collect(c, n, timeout=15, ack=False)
            assert len(got) == n
            writer = _sub(c).link.acks
            assert writer._thread is not None
            tid = writer._thread.native_id
            before = _switches(tid)
            for m in got:
                m.ack()
                assert c.receive(timeout=0.02) is None  # writes the ACK, then waits: the consumer's rhythm
            woken = _switches(tid) - before
            assert woken <= 4, f"the flusher woke {woken} times for {n} ACKs"
            assert writer.pending == 0


class _Raw:
    """A raw stomp.py connection whose MESSAGEs (headers, body) land in a list."""

    def __init__(self, name: str) -> None:
        import stomp

        u = mqprimer.URL.parse(need_broker(name))
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.errors: list[str] = []
        self.receipts: list[str] = []
        self.rabbit = name == "stomp-rabbitmq"
        raw = self

        class Listener(stomp.ConnectionListener):  # type: ignore[misc]
            def on_message(self, frame: Any) -> None:
                raw.got.append((dict(frame.headers), frame.body))

            def on_receipt(self, frame: Any) -> None:
                raw.receipts.append(frame.headers.get("receipt-id", ""))

            def on_error(self, frame: Any) -> None:
                raw.errors.append(frame.headers.get("message", ""))

        self.conn = stomp.Connection12([(u.host or "127.0.0.1", u.port or 61613)], vhost="/", auto_decode=False)
        self.conn.set_listener("test", Listener())
        self.conn.connect(u.username, u.password, wait=True)

    def queue_args(self) -> dict[str, str]:
        return {"x-max-priority": "9"} if self.rabbit else {}  # as mqprimer declares its queues

    def subscribe(self, queue: str) -> None:
        self.conn.subscribe(f"/queue/{queue}", "t", ack="auto", headers={**self.queue_args(), "receipt": "sub"})
        wait_until(lambda: "sub" in self.receipts or self.errors, 15, what="the SUBSCRIBE's receipt")
        assert not self.errors

    def close(self) -> None:
        self.conn.disconnect()


@pytest.mark.parametrize("name", FLAVOURS)
def test_a_request_is_transient_and_a_raw_service_can_answer_it(name: str) -> None:
    """A request cannot outlive its reply path (the temporary queue dies with the caller's
    connection), so it is sent transient, as raw stomp.py's and AMQP's are: without a
    ``persistent`` header (the broker's MESSAGE then carries none). Persistent, every request
    took the broker's disk path (ActiveMQ's KahaDB, RabbitMQ's message store)."""
    url = need_broker(name)
    q = f"rpctr{uuid.uuid4().hex[:8]}"
    service = _Raw(name)
    try:
        service.subscribe(q)
        with mqprimer.connect(url) as caller:
            got: list[Any] = []
            th = threading.Thread(target=lambda: got.append(caller.request(q, "ping", timeout=20).body))
            th.start()
            wait_until(lambda: service.got, 15, what="the request")
            headers, body = service.got[0]
            assert headers.get("persistent") != "true", "the request was sent persistent"
            assert headers.get("reply-to") and headers.get("correlation-id")
            service.conn.send(headers["reply-to"], encode(make(id=uuid.uuid4().hex, source="urn:t", type="t",
                                                                body="pong", correlation_id=headers["correlation-id"])),
                              headers={"correlation-id": headers["correlation-id"]})
            th.join(20)
            assert got == ["pong"]
    finally:
        service.close()


@pytest.mark.parametrize("name", FLAVOURS)
def test_a_reply_to_a_named_queue_is_transient_and_delivered(name: str) -> None:
    """A hand-written caller may name a queue of its own as the envelope's reply address. The
    reply was sent ``persistent:false``, which RabbitMQ also reads as the queue's ``durable:false``:
    it declared the caller's queue exclusive, refused that (ERROR resource_locked) and the reply
    was lost. It is now sent with no ``persistent`` header: transient, and delivered."""
    url = need_broker(name)
    q, replies = f"rpcnq{uuid.uuid4().hex[:8]}", f"rpcnqr{uuid.uuid4().hex[:8]}"
    caller = _Raw(name)
    try:
        caller.subscribe(replies)
        with mqprimer.connect(url) as service, service.consumer(q) as c:
            request = make(id="req-1", source="urn:t", type="t", body="ping", reply_to=replies)
            service.producer().send(q, "warm-up")  # the queue exists, with mqprimer's arguments
            assert c.receive(timeout=15) is not None
            caller.conn.send(f"/queue/{q}", encode(request), headers=caller.queue_args())
            m = c.receive(timeout=15)
            assert m is not None and m.reply_to is not None
            m.reply("pong")
            m.ack()
            wait_until(lambda: caller.got or caller.errors, 15, what="the reply")
            assert caller.got, f"no reply; the broker said {caller.errors}"
            headers, body = caller.got[0]
            assert headers.get("persistent") != "true"
            assert decode(body).correlation_id == "req-1"
    finally:
        caller.close()
