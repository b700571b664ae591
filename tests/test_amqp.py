"""AMQP on the real RabbitMQ of the harness: what the conformance suite does not cover.

URL options, TLS variants, refusals (password, vhost, permissions), what is declared on
the broker, delay buckets, durable vs private topic subscriptions, foreign messages from
raw pika, poison messages, and heartbeats while a handler holds a message. Broker faults:
the battery (test_battery.py); many consumers on one connection: test_multiplex.py.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TypeAlias

import pika
import pika.exceptions
import pytest

import mqprimer
from conftest import need_broker
from mqprimer import (
    AuthenticationError,
    BrokerError,
    ConfigurationError,
    ConnectionFailed,
    RetryPolicy,
    Topic,
    UnsupportedError,
)
from mqprimer.backends.amqp import bucket_ms
from mqprimer.testing.helpers import collect, wait_until
from mqprimer.url import URL

pytestmark = pytest.mark.timeout(60)
Channel: TypeAlias = pika.adapters.blocking_connection.BlockingChannel


@pytest.fixture
def url() -> str:
    return need_broker("amqp")


@pytest.fixture
def tls_url() -> str:
    return need_broker("amqps")


@pytest.fixture
def queue() -> str:
    return f"aq{uuid.uuid4().hex[:12]}"


@pytest.fixture
def raw(url: str) -> Iterator[Channel]:
    """A raw pika channel on the same broker, to look at what mqprimer declared."""
    u = URL.parse(url)
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        u.host, u.port, "/", pika.PlainCredentials(u.username or "", u.password or "")))
    try:
        yield conn.channel()
    finally:
        conn.close()


def _with(url: str, **params: str) -> str:
    return URL.parse(url).with_query(**params).render(hide_password=False)


def _tls_dir(tls_url: str) -> Path:
    return Path(URL.parse(tls_url).params["cafile"]).parent


def _exists(raw: Channel, queue: str) -> bool:
    ch = raw.connection.channel()
    try:
        ch.queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code in (404, 405), exc  # 405 RESOURCE_LOCKED: exclusive to another connection
        return bool(exc.reply_code == 405)
    ch.close()
    return True


# -- configuration ------------------------------------------------------------------------
def test_bucket_rounding_is_never_early_and_at_most_ten_percent_late() -> None:
    for delay in (0.0004, 0.05, 0.1, 0.1001, 1.234, 1.5, 59.99, 3600.5):
        ms = bucket_ms(delay)
        assert ms >= delay * 1000 - 1e-6 and ms <= max(delay * 1000 * 1.1, 1)
    assert (bucket_ms(1.5), bucket_ms(1.234), bucket_ms(0.0001)) == (1500, 1300, 1)


def test_unknown_and_misplaced_options_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="prefetch"):
        mqprimer.connect(_with(url, prefetch="5"))
    with pytest.raises(ConfigurationError, match="amqps"):
        mqprimer.connect(_with(url, cafile="/tmp/ca.pem"))
    with pytest.raises(ConfigurationError, match="heartbeat"):
        mqprimer.connect(_with(url, heartbeat="soon"))


def test_what_is_declared_on_the_broker(url: str, queue: str, raw: Channel) -> None:
    with mqprimer.connect(url) as conn:
        conn.producer().send(queue, "x")
        conn.producer().send(Topic("nobody.listens"), "dropped")
    # durable, with x-max-priority 9: a redeclare with other arguments is refused (406)
    assert raw.queue_declare(queue, durable=True, arguments={"x-max-priority": 9}).method.message_count == 1
    ch = raw.connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="x-max-priority"):
        ch.queue_declare(queue, durable=True)
    method, props, _body = raw.basic_get(queue, auto_ack=True)
    assert method is not None and props.delivery_mode == 2
    assert props.content_type == "application/cloudevents+json" and props.message_id
    raw.exchange_declare("mqprimer.topic", "topic", passive=True)
    raw.queue_delete(queue)


def test_max_priority_zero_refuses_priority(url: str, queue: str,
                                            raw: Channel) -> None:
    with mqprimer.connect(_with(url, max_priority="0")) as conn:
        assert not conn.capabilities.priority
        with pytest.raises(UnsupportedError, match="priority"):
            conn.producer().send(queue, "x", priority=5)
        conn.producer().send(queue, "plain")
    raw.queue_declare(queue, durable=True)  # declared without x-max-priority: same arguments
    raw.queue_delete(queue)


def test_queue_deleted_behind_our_back_is_an_error_once_then_redeclared(url: str, queue: str, raw: Channel) -> None:
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        p.send(queue, "first")
        raw.queue_delete(queue)
        with pytest.raises(BrokerError, match="unroutable"):
            p.send(queue, "lost? no: refused")  # mandatory publish: never confirmed into nowhere
        mid = p.send(queue, "again")
        with conn.consumer(queue) as c:
            assert [m.id for m in collect(c, 1)] == [mid]


def test_queue_declared_elsewhere_with_other_arguments_is_a_clear_error(url: str, queue: str, raw: Channel) -> None:
    raw.queue_declare(queue, durable=True, arguments={"x-max-priority": 3})
    with mqprimer.connect(url) as conn:
        with pytest.raises(BrokerError, match="inequivalent arg 'x-max-priority'"):
            conn.producer().send(queue, "x")
        with pytest.raises(BrokerError, match="inequivalent arg 'x-max-priority'"):
            conn.consumer(queue)
        conn.producer().send(queue + "-other", "the connection still works")
    raw.queue_delete(queue)
    raw.queue_delete(queue + "-other")


# -- refusals -----------------------------------------------------------------------------
def test_wrong_password_is_a_fast_clear_authentication_error(url: str) -> None:
    u = URL.parse(url)
    bad = URL(u.scheme, u.username, "not-the-password", u.hosts, u.path, u.query).render(hide_password=False)
    start = time.monotonic()
    with pytest.raises(AuthenticationError, match="ACCESS_REFUSED") as info:
        mqprimer.connect(bad)
    assert time.monotonic() - start < 3
    assert "not-the-password" not in str(info.value) and "***" in str(info.value)


def test_missing_vhost_is_a_clear_error(url: str) -> None:
    u = URL.parse(url)
    with pytest.raises(AuthenticationError, match="vhost no-such-vhost not found"):
        mqprimer.connect(URL(u.scheme, u.username, u.password, u.hosts, "/no-such-vhost", u.query))


def test_permission_refusal_is_an_authentication_error_without_retry_storm(url: str, queue: str) -> None:
    u = URL.parse(url)
    limited = URL(u.scheme, "mqprimer-limited", "zq7pw", u.hosts, u.path, u.query)
    with mqprimer.connect(limited, reconnect_timeout=30) as conn:  # logging in is allowed
        start = time.monotonic()
        with pytest.raises(AuthenticationError, match=f"ACCESS_REFUSED - access to queue '{queue}'"):
            conn.producer().send(queue, "x")
        assert time.monotonic() - start < 3, "an access refusal must not be retried until reconnect_timeout"
        with pytest.raises(AuthenticationError, match="ACCESS_REFUSED"):
            conn.consumer(queue)


# -- TLS ------------------------------------------------------------------------------------
def test_amqps_with_client_certificate(tls_url: str, queue: str) -> None:
    d = _tls_dir(tls_url)
    with mqprimer.connect(_with(tls_url, certfile=str(d / "client.pem"), keyfile=str(d / "client.key"))) as conn:
        mid = conn.producer().send(queue, "over TLS with a client certificate")
        with conn.consumer(queue) as c:
            assert [m.id for m in collect(c, 1)] == [mid]


def test_amqps_without_the_ca_fails_verification_fast(tls_url: str) -> None:
    u = URL.parse(tls_url)
    no_ca = URL(u.scheme, u.username, u.password, u.hosts, u.path, ())
    start = time.monotonic()
    with pytest.raises(ConnectionFailed, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        mqprimer.connect(no_ca)
    assert time.monotonic() - start < 5


def test_amqps_checks_the_host_name_unless_verify_is_off(tls_url: str, queue: str) -> None:
    with pytest.raises(ConnectionFailed, match="(?i)hostname|match"):
        mqprimer.connect(_with(tls_url, server_name="wrong.example"))
    u = URL.parse(tls_url)
    unverified = URL(u.scheme, u.username, u.password, u.hosts, u.path, (("verify", "false"),))
    with mqprimer.connect(unverified) as conn:
        conn.producer().send(queue, "encrypted, not authenticated")
        with conn.consumer(queue) as c:
            collect(c, 1)


# -- routing --------------------------------------------------------------------------------
def test_named_subscription_keeps_messages_while_no_consumer(url: str,
                                                            raw: Channel) -> None:
    root, sub = f"t{uuid.uuid4().hex[:10]}", f"sub{uuid.uuid4().hex[:10]}"
    with mqprimer.connect(url) as conn:
        conn.consumer(Topic(f"{root}.#"), subscription=sub).close()
        mid = conn.producer().send(Topic(f"{root}.a.b"), {"kept": True})
        with conn.consumer(Topic(f"{root}.#"), subscription=sub) as c:
            assert [m.id for m in collect(c, 1)] == [mid]
        private = conn.consumer(Topic(f"{root}.x"))
        assert private._subs[0].sub is not None
        qname = private._subs[0].sub.retry_target.name  # type: ignore[union-attr]
        assert qname.startswith("mqprimer.sub.") and _exists(raw, qname)
        private.close()
        assert wait_until(lambda: not _exists(raw, qname), what="the private queue to go"), "exclusive queue kept"
    assert _exists(raw, sub), "a named subscription is a durable queue"
    raw.queue_delete(sub)


def test_retry_on_a_private_topic_subscription_comes_back_to_it_only(url: str) -> None:
    root = f"t{uuid.uuid4().hex[:10]}"
    with mqprimer.connect(url) as conn, conn.consumer(Topic(root)) as a, conn.consumer(Topic(root)) as b:
        mid = conn.producer().send(Topic(root), "x")
        ma = collect(a, 1, ack=False)[0]
        collect(b, 1)
        ma.retry(delay=0.2)
        again = collect(a, 1)[0]
        assert (again.id, again.attempt) == (mid, 2)
        assert b.receive(timeout=0.5) is None, "a retry must not be published to the topic again"


def test_delayed_topic_message_goes_through_the_exchange(url: str,
                                                        raw: Channel) -> None:
    root = f"t{uuid.uuid4().hex[:10]}"
    with mqprimer.connect(url) as conn, conn.consumer(Topic(f"{root}.*")) as c:
        start = time.monotonic()
        conn.producer().send(Topic(f"{root}.late"), "late", delay=0.7)
        m = collect(c, 1)[0]
        assert m.body == "late" and time.monotonic() - start >= 0.7
    raw.queue_declare("mqprimer.topic.delay.700", passive=True)


# -- bad input and poison -------------------------------------------------------------------
def test_foreign_message_from_raw_pika_is_dead_lettered_and_consumer_keeps_going(
    url: str, queue: str, raw: Channel
) -> None:
    raw.queue_declare(queue, durable=True, arguments={"x-max-priority": 9})
    raw.basic_publish("", queue, b"<xml>not an envelope</xml>", pika.BasicProperties(content_type="text/xml"))
    with mqprimer.connect(url) as conn:
        mid = conn.producer().send(queue, "good")
        with conn.consumer(queue) as c:
            assert [m.id for m in collect(c, 1)] == [mid]
            assert c.receive(timeout=0.3) is None
        dead = wait_until(lambda: conn.dead_letters(queue).list(), what="the foreign message in dead letters")
        assert len(dead) == 1 and "invalid envelope" in (dead[0].reason or "")
        assert dead[0].body == b"<xml>not an envelope</xml>" and dead[0].origin == queue
        assert conn.dead_letters(queue).purge() == 1


def test_poison_with_delayed_retries_is_dead_lettered_after_exactly_max_attempts(url: str, queue: str) -> None:
    policy = RetryPolicy(max_attempts=4, initial_delay=0.2, multiplier=1.5, jitter=0)
    with mqprimer.connect(url) as conn:
        mid = conn.producer().send(queue, "poison")
        attempts: list[tuple[int, float]] = []
        start = time.monotonic()
        with conn.consumer(queue, retry=policy) as c:
            while (m := c.receive(timeout=3)) is not None:
                attempts.append((m.attempt, time.monotonic() - start))
                m.fail(ValueError("cannot parse"))
        assert [a for a, _ in attempts] == [1, 2, 3, 4]
        gaps = [b - a for (_, a), (_, b) in zip(attempts, attempts[1:], strict=False)]
        assert all(g >= d - 0.02 for g, d in zip(gaps, (0.2, 0.3, 0.45), strict=True)), gaps
        dead = wait_until(lambda: conn.dead_letters(queue).list(), what="the poison message in dead letters")
        assert [(e.id, e.attempt) for e in dead] == [(mid, 4)]
        assert "gave up after 4 attempt(s): ValueError: cannot parse" in (dead[0].reason or "")
        conn.dead_letters(queue).purge()


# -- heartbeats ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_long_handler_keeps_its_connection(url: str, queue: str) -> None:
    """The connection's I/O thread answers heartbeats while the application holds a message
    (a BlockingConnection alone would not)."""
    with mqprimer.connect(_with(url, heartbeat="1")) as conn:
        conn.producer().send(queue, "slow job")
        with conn.consumer(queue) as c:
            m = collect(c, 1, ack=False)[0]
            deadline = time.monotonic() + 4.5  # RabbitMQ drops a client silent for 2 heartbeats (2 s)
            wait_until(lambda: time.monotonic() > deadline, timeout=10, interval=0.2, what="a long handler")
            m.ack()
            assert c.receive(timeout=0.5) is None, "the message came back: the connection was lost while held"


# -- interoperability ---------------------------------------------------------------------------
def test_amqp_and_stomp_clients_share_queues_on_one_rabbitmq(url: str, queue: str) -> None:
    """The same envelope and the same queue arguments: either protocol reads what the other sent."""
    stomp_url = need_broker("stomp-rabbitmq")
    with mqprimer.connect(url) as amqp, mqprimer.connect(stomp_url) as stomp:
        a_id = amqp.producer().send(queue, {"from": "amqp"}, headers={"k": "v"}, priority=3)
        s_id = stomp.producer().send(queue, {"from": "stomp"}, headers={"k": "w"}, priority=7)
        with amqp.consumer(queue) as c:
            got = {m.id: (m.body, m.headers) for m in collect(c, 2)}
        assert got == {a_id: ({"from": "amqp"}, {"k": "v"}), s_id: ({"from": "stomp"}, {"k": "w"})}
        a2 = amqp.producer().send(queue, "back")
        with stomp.consumer(queue) as c:
            assert [(m.id, m.body) for m in collect(c, 1)] == [(a2, "back")]


def test_worker_with_a_thread_pool_over_amqp(url: str, queue: str) -> None:
    """The Worker settles from its owner thread while handlers run on a pool: every message
    handled once, the failing ones retried through a delay bucket, the queue left empty."""
    seen: dict[int, int] = {}
    lock = threading.Lock()

    def handler(message: mqprimer.Message) -> None:
        with lock:
            seen[message.body] = seen.get(message.body, 0) + 1
        if message.body % 10 == 0 and message.attempt == 1:
            raise RuntimeError("first try fails")

    with mqprimer.connect(url) as conn:
        conn.producer().send_many([(queue, i) for i in range(100)])
        worker = mqprimer.Worker(url, queue, handler, concurrency=4, max_messages=110, handle_signals=False,
                                 retry=RetryPolicy(max_attempts=3, initial_delay=0.1, jitter=0))
        worker.run()
        assert sorted(seen) == list(range(100))
        assert all(n == (2 if i % 10 == 0 else 1) for i, n in seen.items()), seen
        assert worker.stats["ack"] == 100 and worker.stats["retry"] == 10
        with conn.consumer(queue) as c:
            assert c.receive(timeout=0.5) is None


def test_a_hand_off_s_frames_leave_at_once_not_on_the_loop_s_next_turn(url: str, queue: str, raw: Channel) -> None:
    """coalesce() (run by the I/O thread after every hand-off) sends a plaintext connection's
    pending frames itself: right after it pika's transmit buffer is empty (pika alone would
    leave them there until epoll next reports the socket writable), and the message arrives."""
    from typing import Any

    from mqprimer.backends._amqp_link import Chan, Link, Options, Waiter, parameters

    raw.queue_declare(queue, durable=False)
    u = URL.parse(url)
    link = Link(parameters(u, Options.from_url(u), "test coalesce"))
    try:
        chan = Chan(link)
        chan.run(chan.open_step)

        def publish(w: Waiter) -> None:
            chan.ch.basic_publish("", queue, b"frames")
            bufs: Any = link.conn._transport._tx_buffers
            pending = len(bufs)
            link.out.coalesce()
            w.set((pending, len(bufs)))

        pending, left = link.call(publish, timeout=10)
        assert pending > 0, "basic_publish buffered nothing: the check below would prove nothing"
        assert left == 0, "coalesce() left the frames for the loop's next writability turn"
        wait_until(lambda: raw.queue_declare(queue, passive=True).method.message_count == 1,
                   what="the published message on the broker")
    finally:
        link.close()
        raw.queue_delete(queue)


def test_request_shares_the_connections_one_broker_connection_and_survives_a_cut() -> None:
    """conn.request()'s reply path is channels on the Connection's own AMQP connection (issue
    18: one broker connection per endpoint), not a second connection; cut, it comes back on
    the one new connection."""
    from mqprimer.testing.proxy import Proxy

    raw = need_broker("amqp")
    url = URL.parse(raw)
    q = f"share{uuid.uuid4().hex[:8]}"
    stop = threading.Event()

    def serve() -> None:
        with mqprimer.connect(raw) as sconn, sconn.consumer(q) as c:
            while not stop.is_set():
                m = c.receive(timeout=0.2)
                if m is not None:
                    m.reply({"echo": m.body})
                    m.ack()

    with Proxy((url.host or "127.0.0.1", url.port or 5672)) as proxy:
        via = raw.replace(f":{url.port}", f":{proxy.port}", 1)
        service = threading.Thread(target=serve, daemon=True)
        service.start()
        try:
            with mqprimer.connect(via, reconnect_timeout=10) as conn, conn.consumer(f"{q}.other") as other:
                conn.producer().send(f"{q}.other", "x")
                assert other.receive(timeout=10) is not None
                assert conn.request(q, 1, timeout=10).body == {"echo": 1}
                assert proxy.connections == 1, f"{proxy.connections} broker connections for one Connection"
                proxy.cut()
                reply = None
                deadline = time.monotonic() + 20
                while reply is None and time.monotonic() < deadline:  # the call under way when cut may fail
                    try:
                        reply = conn.request(q, 2, timeout=5)
                    except (mqprimer.ConnectionFailed, mqprimer.Timeout):
                        continue
                assert reply is not None and reply.body == {"echo": 2}
                assert proxy.connections == 1, f"{proxy.connections} broker connections after the cut"
        finally:
            stop.set()
            service.join(10)


@pytest.mark.parametrize("how", ["reported", "raised"])
def test_a_socket_reset_while_pika_sets_it_up_is_a_connection_failure(
        how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """pika's own socket checks during the connect workflow raise ValueError when the peer
    resets the socket at once ("Expected connected socket, but getpeername() failed"; seen in
    CI failover runs): that is a failed connection attempt, retried as one, not a broker fault.
    pika reports it to the workflow's on_done, or (io_services_utils re-raising what
    create_streaming_connection met) raises it out of the ioloop's poll."""
    from pika.adapters.select_connection import SelectConnection

    from mqprimer.backends import _amqp_link

    def failing(params: object, on_done: object, custom_ioloop: object) -> None:
        error = ValueError("Expected connected socket, but getpeername() failed")
        if how == "raised":
            raise error
        on_done(error)  # type: ignore[operator]

    monkeypatch.setattr(SelectConnection, "create_connection", staticmethod(failing))
    with pytest.raises(pika.exceptions.AMQPConnectionError, match="getpeername"):
        _amqp_link.Link(pika.ConnectionParameters(host="127.0.0.1", port=1))
