"""STOMP on both real brokers (RabbitMQ's STOMP plugin, ActiveMQ 5.17): flavour, faults, recovery.

The conformance suite (tests/test_conformance.py) already runs on every stomp URL the
harness publishes, the reliability battery (tests/test_battery.py) runs the faults (broker
SIGKILL, consumer SIGKILL, frozen broker, cut connection, wrong credentials, poison input);
these are the STOMP-specific tests, and the cut of a TLS connection (stomp.py's own I/O thread).
"""

from __future__ import annotations

import logging
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import mqprimer
from conftest import need_broker
from mqprimer import AuthenticationError, ConnectionFailed, Topic
from mqprimer.backend import Queue
from mqprimer.backends._stomp_wire import split_frames
from mqprimer.backends.stomp import CAPABILITIES_ACTIVEMQ, CAPABILITIES_RABBITMQ, StompBackend
from mqprimer.testing.helpers import collect, wait_until
from mqprimer.url import URL

FLAVOURS = {"stomp-activemq": CAPABILITIES_ACTIVEMQ, "stomp-rabbitmq": CAPABILITIES_RABBITMQ}


@pytest.fixture(params=sorted(FLAVOURS))
def broker(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(harness name, URL) of each STOMP broker."""
    name: str = request.param
    return name, need_broker(name)


@pytest.fixture
def url(broker: tuple[str, str]) -> str:
    return broker[1]


@pytest.fixture
def queue() -> str:
    return f"st{uuid.uuid4().hex[:12]}"


def _with(url: str, **params: str) -> str:
    return URL.parse(url).with_query(**params).render(hide_password=False)


# -- flavour and configuration -------------------------------------------------------------
def test_flavour_is_detected_from_the_connected_frame(broker: tuple[str, str]) -> None:
    name, url = broker
    with mqprimer.connect(url) as conn:
        assert conn.capabilities is FLAVOURS[name]


def test_flavour_can_be_forced_in_the_url(url: str) -> None:
    with mqprimer.connect(_with(url, flavour="generic")) as conn:
        assert conn.capabilities.name == "stomp"
        with pytest.raises(mqprimer.UnsupportedError):
            conn.producer().send("x", 1, priority=3)
    with pytest.raises(mqprimer.ConfigurationError, match="flavour"):
        mqprimer.connect(_with(url, flavour="qpid"))


def test_stomp_py_never_logs_bodies(url: str, queue: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = f"body-secret-{uuid.uuid4().hex}"
    with mqprimer.connect(url) as conn:
        conn.producer().send(queue, secret)
        with conn.consumer(queue) as c:
            collect(c, 1)
    assert secret not in caplog.text
    assert logging.getLogger("stomp.py").getEffectiveLevel() >= logging.INFO


# -- recovery ---------------------------------------------------------------------------------
def _cut(conn: mqprimer.Connection) -> None:
    """Drop every STOMP socket of the connection under the driver's feet (a network cut)."""
    backend = conn.endpoints[0].backend
    assert isinstance(backend, StompBackend)
    for link in list(backend.links):
        sock = link.conn.transport.socket
        if sock is not None:
            sock.shutdown(2)


def test_a_cut_tls_connection_surfaces_and_is_recovered(tls_url: str, queue: str) -> None:
    _cut_and_recover(tls_url, queue)  # TLS sockets are non-blocking, written by stomp.py's I/O thread


def _cut_and_recover(url: str, queue: str) -> None:
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        with conn.consumer(queue, prefetch=5) as c:
            p.send(queue, "before")
            assert collect(c, 1)[0].body == "before"
            assert c.receive(timeout=0.2) is None  # waiting writes the batched ACKs out
            _cut(conn)
            mid = p.send(queue, "after")  # reconnects, then publishes (confirmed)
            got = wait_until(lambda: c.receive(timeout=0.5), timeout=30, what="a message after the cut")
            assert got.id == mid
            got.ack()


def test_activemq_first_heartbeat_does_not_drop_a_healthy_connection(queue: str) -> None:
    url = _with(need_broker("stomp-activemq"), heartbeat="0.5")
    with mqprimer.connect(url) as conn:
        backend = conn.endpoints[0].backend
        assert isinstance(backend, StompBackend) and backend.link is not None
        link = backend.link
        deadline = time.monotonic() + 2.5  # > 2 x the interval: ActiveMQ's first beat is late
        wait_until(lambda: time.monotonic() > deadline, timeout=5, what="idle time")
        assert link.alive
        conn.producer().send(queue, "still here")
        assert conn.endpoints[0].backend is backend and backend.link is link


# -- the receiver: frames split out of socket reads, handed over one read at a time ------------
_STREAM = [  # (wire bytes, the frame it is: command, headers, body), a heartbeat between two
    (b"MESSAGE\nsubscription:a\nack:1\\c2\npath:a\\\\b\\nc\ncontent-length:5\n\nab\x00cd\x00",
     ("MESSAGE", {"subscription": "a", "ack": "1:2", "path": "a\\b\nc", "content-length": "5"}, b"ab\x00cd")),
    (b"\n", None),
    (b"MESSAGE\r\nsubscription:b\r\nack:x\r\nack:y\r\n\r\nhello\x00\r\n",
     ("MESSAGE", {"subscription": "b", "ack": "x"}, b"hello")),
    (b"RECEIPT\nreceipt-id:r1\n\n\x00\n", ("RECEIPT", {"receipt-id": "r1"}, b"")),
    (b"CONNECTED\nserver:a\\cb\n\n\x00", ("CONNECTED", {"server": "a\\cb"}, b"")),
    (b"MESSAGE\ncontent-length:3\n\n\x00\x00\x00\x00", ("MESSAGE", {"content-length": "3"}, b"\x00\x00\x00")),
]


def test_frames_split_alike_wherever_a_socket_read_ends() -> None:
    """STOMP 1.2 as the receiver reads it: content-length bodies holding NULs, CRLF lines,
    escaped headers (not in CONNECTED), the first of repeated headers, heartbeats; a read
    may end anywhere, and what a frame with a known length still needs is said."""
    stream = b"".join(wire for wire, _ in _STREAM)
    want = [f for _, f in _STREAM if f is not None]
    got, used, need = split_frames(stream)
    assert [f[:3] for f in got] == want and (used, need) == (len(stream), 0)
    for cut in range(len(stream)):
        first, used, need = split_frames(stream[:cut])
        rest = stream[used:]
        if need:
            assert len(rest) >= need and not split_frames(rest[:need - 1])[0], f"need {need} at {cut} is wrong"
        second, used2, _ = split_frames(rest)
        assert [f[:3] for f in first + second] == want and used2 == len(rest), f"split at byte {cut}"


def test_a_message_over_many_socket_reads_and_bursts_on_two_subscriptions_arrive_intact(url: str, queue: str) -> None:
    """One connection, two consumers: a ~600 kB message (dozens of reads) between bursts of
    small ones; each consumer gets its own, whole and in order."""
    big = "x" * 600_000
    with mqprimer.connect(url) as conn, conn.consumer(queue, prefetch=50) as a, \
            conn.consumer(f"{queue}.b", prefetch=50) as b:
        p = conn.producer()
        p.send_many([(queue, i) for i in range(100)] + [(f"{queue}.b", i) for i in range(100)])
        p.send(queue, big)
        p.send_many([(queue, i) for i in range(100, 200)] + [(f"{queue}.b", i) for i in range(100, 200)])
        for c, count in ((a, 201), (b, 200)):
            bodies = [m.body for m in collect(c, count, timeout=30)]
            small = [x for x in bodies if x != big]
            assert small == list(range(200)), f"{len(small)} small messages, first wrong at " \
                f"{next((i for i, x in enumerate(small) if x != i), None)}"
            assert bodies.count(big) == (c is a), "the big message is missing, cut or on the wrong consumer"


# -- dead letters and topics ---------------------------------------------------------------
def test_topic_retry_returns_to_the_same_subscriber_only(url: str, queue: str) -> None:
    topic = Topic(f"{queue}.events")
    with mqprimer.connect(url) as conn, conn.consumer(topic) as a, conn.consumer(topic) as b:
        mid = conn.producer().send(topic, "hello")
        first = collect(a, 1, ack=False)[0]
        collect(b, 1)
        first.retry()
        again = collect(a, 1)[0]
        assert (again.id, again.attempt) == (mid, 2)
        assert b.receive(timeout=0.5) is None, "a retry reached another subscriber"


def test_durable_topic_subscription_keeps_messages_while_away(url: str, queue: str) -> None:
    topic = Topic(f"{queue}.news")
    with mqprimer.connect(url) as conn:
        with conn.consumer(topic, subscription=f"{queue}-durable") as c:
            assert c.receive(timeout=0.2) is None
        mid = conn.producer().send(topic, "while away")
        with conn.consumer(topic, subscription=f"{queue}-durable") as c:
            assert collect(c, 1)[0].id == mid


@pytest.fixture
def tls_url(broker: tuple[str, str]) -> Iterator[str]:
    yield need_broker(broker[0].replace("stomp-", "stomp+ssl-"))


def test_tls_needs_a_trusted_certificate(tls_url: str, tmp_path: Path) -> None:
    with mqprimer.connect(tls_url) as conn:
        assert conn.capabilities.persistent
    other_ca = tmp_path / "other-ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=x",
                    "-keyout", str(tmp_path / "k.pem"), "-out", str(other_ca)], check=True, capture_output=True)
    with pytest.raises(ConnectionFailed):
        mqprimer.connect(_with(tls_url, cafile=str(other_ca)))


def test_rabbitmq_permission_refusal_is_an_authentication_error(queue: str) -> None:
    u = URL.parse(need_broker("stomp-rabbitmq"))
    limited = URL(u.scheme, "mqprimer-limited", "zq7pw", u.hosts, u.path, u.query).render(hide_password=False)
    with mqprimer.connect(limited, reconnect_timeout=2) as conn:
        with pytest.raises(AuthenticationError, match="access"):
            conn.producer().send(queue, "refused")


def test_driver_requeue_gives_the_message_back_without_nack_semantics(url: str, queue: str) -> None:
    """SPI ``requeue``: RabbitMQ NACK requeues; ActiveMQ's would dead-letter, so it re-sends then ACKs."""
    backend = StompBackend(URL.parse(url))
    backend.open()
    try:
        backend.publish(Queue(queue), b"payload", message_id="m1")
        sub = backend.subscribe(Queue(queue), prefetch=1)
        first = wait_until(lambda: sub.receive(0.5), timeout=10, what="the message")
        sub.requeue(first)
        again = wait_until(lambda: sub.receive(0.5), timeout=10, what="the requeued message")
        assert again.payload == b"payload"
        sub.ack(again)
        assert sub.receive(0.5) is None
        sub.close()
    finally:
        backend.close()


def test_delayed_topic_message_reaches_subscribers_after_the_delay(url: str, queue: str) -> None:
    topic = Topic(f"{queue}.later")
    with mqprimer.connect(url) as conn, conn.consumer(topic) as sub:
        start = time.monotonic()
        mid = conn.producer().send(topic, "later", delay=1.0)
        assert sub.receive(timeout=0.5) is None
        m = collect(sub, 1, timeout=15)[0]
        assert m.id == mid and time.monotonic() - start >= 1.0 - 0.02
        assert sub.receive(timeout=0.3) is None


def test_priority_on_a_topic_subscription(url: str, queue: str) -> None:
    topic = Topic(f"{queue}.prio")
    with mqprimer.connect(url) as conn:
        with conn.consumer(topic, subscription=f"{queue}-prio") as sub:
            assert sub.receive(timeout=0.2) is None
        p = conn.producer()
        for prio in (1, 9, 0, 5):
            p.send(topic, prio, priority=prio)
        with conn.consumer(topic, subscription=f"{queue}-prio", prefetch=10) as sub:
            assert [m.body for m in collect(sub, 4)] == [9, 5, 1, 0]

