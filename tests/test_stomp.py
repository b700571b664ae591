"""STOMP on both real brokers (RabbitMQ's STOMP plugin, ActiveMQ 5.17): flavour, faults, recovery.

The conformance suite (tests/test_conformance.py) already runs on every stomp URL the
harness publishes; these are the STOMP-specific and fault tests.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import mqprimer
from conftest import ROOT, need_broker
from mqprimer import AuthenticationError, ConnectionFailed, RetryPolicy, Topic
from mqprimer.backend import Queue
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


def _brokers(*args: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "brokers"), *args], check=True, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


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


def test_wrong_credentials_are_a_clear_authentication_error(url: str) -> None:
    u = URL.parse(url)
    bad = URL(u.scheme, u.username, "wrong-Pa55word", u.hosts, u.path, u.query).render(hide_password=False)
    start = time.monotonic()
    with pytest.raises(AuthenticationError) as info:
        mqprimer.connect(bad)
    assert time.monotonic() - start < 10
    assert "wrong-Pa55word" not in str(info.value) and "***" in str(info.value)


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


def test_a_cut_connection_surfaces_and_is_recovered(url: str, queue: str) -> None:
    _cut_and_recover(url, queue)


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


def test_broker_sigkill_mid_stream_loses_no_confirmed_message(broker: tuple[str, str], queue: str) -> None:
    name, url = broker
    harness = name.split("-", 1)[1]
    confirmed: list[str] = []
    seen: set[str] = set()
    stop = threading.Event()
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            with mqprimer.connect(url, reconnect_timeout=120) as cconn, cconn.consumer(queue, prefetch=20) as c:
                while not stop.is_set():
                    m = c.receive(timeout=0.5)
                    if m is not None:
                        seen.add(m.id)
                        try:
                            m.ack()
                        except ConnectionFailed:
                            pass  # lost with its connection: delivered again
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    restart: threading.Thread | None = None
    try:
        with mqprimer.connect(url, reconnect_timeout=120) as conn:
            p = conn.producer()
            for i in range(200):
                if i == 100:
                    _brokers("kill", harness)
                    restart = threading.Thread(target=_brokers, args=("up", harness), daemon=True)
                    restart.start()  # sends below block on the dead broker until it is back
                confirmed.append(p.send(queue, {"i": i}))
        wait_until(lambda: set(confirmed) <= seen or errors, timeout=90, what="every confirmed message")
    finally:
        stop.set()
        if restart is not None:
            restart.join(120)
        consumer.join(30)
        _brokers("up", harness)
    assert not errors, errors
    lost = set(confirmed) - seen
    assert not lost, f"{len(lost)} confirmed messages lost"


_HOLDER = """
import sys, time, mqprimer
with mqprimer.connect(sys.argv[1]) as conn, conn.consumer(sys.argv[2], prefetch=50) as c:
    got = 0
    while got < int(sys.argv[3]):
        m = c.receive(timeout=10)
        if m is None:
            sys.exit(3)
        got += 1
    print("holding", flush=True)
    time.sleep(600)
"""


def test_messages_of_a_sigkilled_consumer_are_all_redelivered(url: str, queue: str) -> None:
    with mqprimer.connect(url) as conn:
        sent = set(conn.producer().send_many([(queue, i) for i in range(20)]))
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER, url, queue, "20"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "holding", holder.stderr.read() if holder.stderr else ""
            with conn.consumer(queue) as c:
                assert c.receive(timeout=0.5) is None, "a held message was delivered twice"
                holder.send_signal(signal.SIGKILL)
                holder.wait(10)
                got = collect(c, 20, timeout=30)
                assert {m.id for m in got} == sent
                assert c.receive(timeout=0.5) is None
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait(10)


# -- dead letters and topics ---------------------------------------------------------------
def test_poison_and_foreign_messages_are_dead_lettered_while_the_consumer_keeps_going(url: str, queue: str) -> None:
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        poison = p.send(queue, {"poison": True})
        conn.endpoints[0].call("raw", lambda b: b.publish(Queue(queue), b"<xml>not ours</xml>", message_id="raw"))
        good = [p.send(queue, {"n": i}) for i in range(5)]
        done: list[str] = []
        poison_attempts: list[int] = []
        policy = RetryPolicy(max_attempts=2, initial_delay=0.2, jitter=0)
        with conn.consumer(queue, retry=policy) as c:
            deadline = time.monotonic() + 30
            while (len(done) < 5 or len(poison_attempts) < 2) and time.monotonic() < deadline:
                m = c.receive(timeout=0.5)
                if m is None:
                    continue
                if isinstance(m.body, dict) and m.body.get("poison"):
                    poison_attempts.append(m.attempt)
                    m.fail(ValueError("poison"))
                else:
                    m.ack()
                    done.append(m.id)
            assert sorted(done) == sorted(good) and poison_attempts == [1, 2]
        dead = wait_until(lambda: (lambda d: d if len(d) == 2 else None)(conn.dead_letters(queue).list()),
                          timeout=20, what="two dead letters")
        by_type = {e.type: e for e in dead}
        assert by_type["mqprimer.invalid"].body == b"<xml>not ours</xml>"
        (env,) = [e for e in dead if e.id == poison]
        assert env.attempt == 2 and "ValueError: poison" in (env.reason or "")


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


def test_a_broker_that_stays_down_is_a_clear_error_not_a_hang(queue: str) -> None:
    """ActiveMQ only (it restarts in seconds); the mid-stream kill test covers both brokers."""
    url = need_broker("stomp-activemq")
    with mqprimer.connect(url, reconnect_timeout=1.5) as conn:
        p = conn.producer()
        p.send(queue, "before")
        consumer = conn.consumer(queue)
        try:
            assert collect(consumer, 1)[0].body == "before"
            _brokers("kill", "activemq")
            start = time.monotonic()
            with pytest.raises(ConnectionFailed, match="127.0.0.1:36616"):
                p.send(queue, "while down")
            with pytest.raises(ConnectionFailed, match="no broker reachable"):
                while time.monotonic() - start < 30:
                    consumer.receive(timeout=0.5)
            assert time.monotonic() - start < 15
        finally:
            consumer.close()
            _brokers("up", "activemq")
    with mqprimer.connect(url) as conn:
        conn.producer().send(queue, "after")
