"""STOMP subscriptions multiplexed on one connection per endpoint (issue 18, STOMP side).

tests/test_multiplex.py runs the issue's three cases on ``stomp-rabbitmq``; ActiveMQ is not
among its targets because a queue cannot be deleted behind a consumer's back there from a
test (no JMX, no web console, no OpenWire client), so its other two cases run here. Plus
what is STOMP's own: closing one consumer gives back what it held, on the shared
connection, without disturbing the others (RabbitMQ keeps it otherwise); and after a broker
SIGKILL one reconnect serves every consumer (no storm of reconnects).
"""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

import mqprimer
from conftest import need_broker
from mqprimer import Consumer
from mqprimer.backends.stomp import StompBackend
from mqprimer.testing.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("stomp-rabbitmq", "stomp-activemq")
BROKER = {"stomp-rabbitmq": "rabbitmq", "stomp-activemq": "activemq"}
# an endpoint's connection: stomp.py's receiver and heart-beat threads, the ACK flusher
THREADS_PER_ENDPOINT = 3


def _usage() -> tuple[int, int]:
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


def _backend(conn: mqprimer.Connection) -> StompBackend:
    backend = conn.endpoints[0].backend
    assert isinstance(backend, StompBackend)
    return backend


def _names(n: int) -> list[str]:
    base = f"mx{uuid.uuid4().hex[:10]}"
    return [f"{base}.{i}" for i in range(n)]


@pytest.mark.timeout(120)
def test_200_consumers_cost_one_connection_and_close_releases_it() -> None:
    url = need_broker("stomp-activemq")
    queues = _names(200)
    threads0, fds0 = _usage()
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        consumers = [conn.consumer(q, prefetch=5) for q in queues]
        p.send_many([(q, i) for i, q in enumerate(queues)])
        for i, c in enumerate(consumers):
            m = c.receive(timeout=15)
            assert m is not None and m.body == i, f"consumer of {queues[i]} got {m and m.body!r}"
            m.ack()
        threads, fds = _usage()
        assert threads - threads0 <= THREADS_PER_ENDPOINT, f"{threads - threads0} threads for 200 consumers"
        assert fds - fds0 <= 2, f"{fds - fds0} file descriptors for 200 consumers"
        assert len(_backend(conn).links) == 1
        for c in consumers:
            c.close()
        assert not _backend(conn).main().routes, "subscriptions left on the connection after close"
    wait_until(lambda: _usage() <= (threads0, fds0), timeout=10,
               what=f"threads and fds back to {threads0}, {fds0} (now {_usage()})")


@pytest.mark.parametrize("target", TARGETS)
def test_closing_one_consumer_gives_its_messages_back_to_another_on_the_same_connection(target: str) -> None:
    """RabbitMQ keeps an UNSUBSCRIBEd subscription's unacked messages until the connection
    closes: the driver NACKs them back (received but unsettled, and prefetched)."""
    url = need_broker(target)
    q, other = _names(2)
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        ids = p.send_many([(q, i) for i in range(5)])
        bystander = conn.consumer(other)
        first = conn.consumer(q, prefetch=5)
        held = first.receive(timeout=10)
        assert held is not None
        wait_until(lambda: first._subs[0].sub.box.qsize() == 4, timeout=10,  # type: ignore[union-attr]
                   what="the other four prefetched")
        first.close()  # one received and unsettled, four prefetched: all go back
        with conn.consumer(q, prefetch=5) as second:
            got: list[str] = []
            for _ in range(5):
                m = second.receive(timeout=10)
                assert m is not None, f"got back only {len(got)} of 5 after the first consumer closed"
                got.append(m.id)
                m.ack()
            assert sorted(got) == sorted(ids)
        mid = p.send(other, "unaffected")
        m = bystander.receive(timeout=10)
        assert m is not None and m.id == mid
        m.ack()
        bystander.close()


@pytest.mark.parametrize("target", TARGETS)
def test_two_members_of_one_group_in_one_connection_split_its_messages(target: str) -> None:
    """RabbitMQ's group id is the subscription name and ids are unique per STOMP connection:
    the second member gets a connection of its own; ActiveMQ's virtual topic queue needs none."""
    root = _names(1)[0]
    topic = mqprimer.Topic(f"{root}.x")
    with mqprimer.connect(need_broker(target)) as conn:
        a = conn.consumer(topic, subscription=f"{root}-grp", prefetch=1)
        b = conn.consumer(topic, subscription=f"{root}-grp", prefetch=1)
        assert len(_backend(conn).links) == (2 if target == "stomp-rabbitmq" else 1)
        ids = {conn.producer().send(topic, i) for i in range(20)}
        seen: dict[str, set[str]] = {"a": set(), "b": set()}

        def drained() -> bool:
            for name, c in (("a", a), ("b", b)):
                m = c.receive(timeout=0.05)
                if m is not None:
                    seen[name].add(m.id)
                    m.ack()
            return seen["a"] | seen["b"] >= ids

        wait_until(drained, timeout=30, what="the group's 20 messages")
        assert seen["a"] and seen["b"] and not seen["a"] & seen["b"], f"not split: {len(seen['a'])}/{len(seen['b'])}"
        a.close()
        b.close()
        assert len(_backend(conn).links) == 1, "the second member's own connection outlived it"


def test_an_error_that_ends_the_shared_connection_brings_every_consumer_back() -> None:
    url = need_broker("stomp-rabbitmq")
    queues = _names(5)
    with mqprimer.connect(url) as conn:
        consumers = [conn.consumer(q) for q in queues]
        link = _backend(conn).main()
        # an ERROR about no subscription of ours ("Subscription not found"; RabbitMQ even keeps the
        # connection open after it): the link is done for every consumer
        link.send_frame("NACK", {"id": "T_nosuch@@session-none@@1"})
        wait_until(lambda: link.error is not None or not link.alive, timeout=10, what="the broker's ERROR")
        ids = conn.producer().send_many([(q, i) for i, q in enumerate(queues)])
        for i, c in enumerate(consumers):
            m = wait_until(lambda c=c: c.receive(timeout=0.2), timeout=20, what=f"consumer {i} back")  # type: ignore[misc]
            assert m.id == ids[i]
            m.ack()
        assert _backend(conn).main() is not link and len(_backend(conn).links) == 1
        for c in consumers:
            c.close()


def _broker(action: str, name: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "brokers"), action, name], check=True, timeout=180,
                   stdout=subprocess.DEVNULL)


@pytest.mark.timeout(180)
@pytest.mark.disruptive("activemq")
def test_broker_sigkill_and_restart_with_50_consumers_every_one_resubscribes_on_one_reconnect() -> None:
    target = "stomp-activemq"
    url = need_broker(target)
    queues = _names(50)
    with mqprimer.connect(url, reconnect_timeout=90) as conn:
        p = conn.producer()
        consumers: dict[str, Consumer] = {q: conn.consumer(q, prefetch=5) for q in queues}
        sent = {q: set(p.send_many([(q, n) for n in range(4)])) for q in queues}
        seen: dict[str, set[str]] = {q: set() for q in queues}
        for q, c in consumers.items():  # one each acked before the kill, the rest in flight
            m = c.receive(timeout=10)
            assert m is not None
            seen[q].add(m.id)
            m.ack()
        generation = conn.endpoints[0].generation
        _broker("kill", BROKER[target])
        _broker("up", BROKER[target])
        for q in queues:
            sent[q] |= set(p.send_many([(q, n) for n in range(4, 6)]))  # confirmed after the restart

        def all_back() -> bool:
            for q, c in consumers.items():
                while (m := c.receive(timeout=0.01)) is not None:
                    seen[q].add(m.id)
                    m.ack()
            return all(sent[q] <= seen[q] for q in queues)

        wait_until(all_back, timeout=90, what="every confirmed message on every queue")
        all_back()
        # one reconnect serves them all: a consumer that finds its subscription gone does not
        # reset the connection the others have resubscribed on already
        assert conn.endpoints[0].generation - generation <= 2, "a storm of reconnects"
        assert len(_backend(conn).links) == 1
        for c in consumers.values():
            c.close()
