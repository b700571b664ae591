"""Many subscriptions on one Connection (issue 18): their cost does not grow per consumer.

Written against the public API only, parametrised over URL ids of tests/conftest.py: a
backend that multiplexes its subscriptions on one broker connection per endpoint adds its
id to ``TARGETS``. Each test is one Connection to one endpoint:

- 200 consumers on 200 queues: threads and file descriptors stay within a small constant
  (counted before, during and after), every queue gets its own messages, close gives
  everything back;
- the broker SIGKILLed and restarted under 50 consumers: every one resubscribes and gets
  every confirmed message;
- one queue deleted behind its consumer: that consumer gets a BrokerError (not a lost
  connection), the 49 others keep their channels (a message held across the deletion is
  still theirs to ack) and keep consuming.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pika
import pytest

import mqprimer
from conftest import ROOT, brokers_providing, harness_url_ids, need_broker
from mqprimer import BrokerError, ConnectionFailed
from mqprimer.testing.control import ScriptedControl
from mqprimer.testing.helpers import wait_until
from mqprimer.url import URL

TARGETS = ("amqp", "stomp-rabbitmq")
# what one endpoint of a Connection may cost, whatever the number of consumers on it
THREADS_PER_ENDPOINT = 3
FDS_PER_ENDPOINT = 8


def _broker(target: str) -> str:
    return brokers_providing().get(target) or harness_url_ids().get(target) or "unknown"


def _params(disruptive: bool = False) -> list[object]:
    return [pytest.param(t, id=t, marks=[pytest.mark.disruptive(_broker(t))] if disruptive else []) for t in TARGETS]


def _rabbitmq_delete(names: list[str]) -> None:
    u = URL.parse(need_broker("amqp"))
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        u.host, u.port, "/", pika.PlainCredentials(u.username or "", u.password or "")))
    try:
        ch = conn.channel()
        for name in names:
            ch.queue_delete(name)
    finally:
        conn.close()


def _rabbitmq_state(names: list[str]) -> dict[str, str]:
    """What RabbitMQ says of each queue: messages ready to deliver and consumers attached (two
    consumers on one queue: a subscription left behind, holding the lost messages unacked)."""
    u = URL.parse(need_broker("amqp"))
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        u.host, u.port, "/", pika.PlainCredentials(u.username or "", u.password or "")))
    try:
        ch = conn.channel()
        out = {}
        for name in names:
            ok = ch.queue_declare(name, passive=True).method
            out[name] = f"{ok.message_count} ready, {ok.consumer_count} consumers"
        return out
    finally:
        conn.close()


# how to delete queues behind mqprimer's back, per broker (the public API has no delete)
DELETE: dict[str, Callable[[list[str]], None]] = {"rabbitmq": _rabbitmq_delete}
# how to ask the broker about queues, for a failure's message
STATE: dict[str, Callable[[list[str]], dict[str, str]]] = {"rabbitmq": _rabbitmq_state}


def _counts() -> tuple[int, int]:
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


@pytest.fixture
def queues(request: pytest.FixtureRequest) -> Iterator[Callable[[int], list[str]]]:
    """Fresh queue names, deleted afterwards where the broker allows (leftover durable queues
    make every later broker restart slower)."""
    made: list[str] = []
    target = request.node.callspec.params["target"]

    def make(n: int) -> list[str]:
        tag = uuid.uuid4().hex[:8]
        names = [f"mx{tag}.{i}" for i in range(n)]
        made.extend(names)
        return names

    yield make
    delete = DELETE.get(_broker(target))
    if delete is not None and made:
        try:
            delete(made)
        except Exception:  # a broker restarting for another test: the names are unique anyway
            pass


def _drain(consumers: list[mqprimer.Consumer], want: list[set[str]], timeout: float) -> list[set[str]]:
    """Poll every consumer without waiting, acking, until consumer i has seen every id in
    ``want[i]``; return what each saw (extra ids included)."""
    seen: list[set[str]] = [set() for _ in consumers]
    deadline = time.monotonic() + timeout
    while any(not w <= s for w, s in zip(want, seen, strict=True)) and time.monotonic() < deadline:
        idle = True
        for i, c in enumerate(consumers):
            m = c.receive(timeout=0)
            while m is not None:
                idle = False
                seen[i].add(m.id)
                m.ack()
                m = c.receive(timeout=0)
        if idle:
            time.sleep(0.01)
    return seen


@pytest.mark.parametrize("target", _params())
@pytest.mark.timeout(90)
def test_200_consumers_share_a_bounded_number_of_threads_and_descriptors(
    target: str, queues: Callable[[int], list[str]]
) -> None:
    url = need_broker(target)
    names = queues(200)
    threads0, fds0 = _counts()
    conn = mqprimer.connect(url)
    try:
        consumers = [conn.consumer(q, prefetch=4) for q in names]
        threads1, fds1 = _counts()
        assert threads1 - threads0 <= THREADS_PER_ENDPOINT, f"{threads1 - threads0} threads for 200 consumers"
        assert fds1 - fds0 <= FDS_PER_ENDPOINT, f"{fds1 - fds0} file descriptors for 200 consumers"
        p = conn.producer()
        ids = p.send_many([(q, {"queue": q, "n": n}) for n in range(2) for q in names])
        want = [{ids[i], ids[i + len(names)]} for i in range(len(names))]
        seen = _drain(consumers, want, 30)
        threads2, fds2 = _counts()
        missing = [q for q, w, s in zip(names, want, seen, strict=True) if not w <= s]
        assert not missing, f"{len(missing)} queues did not get their messages, e.g. {missing[:3]}"
        assert seen == want, "a consumer got another queue's message"
        assert threads2 - threads0 <= THREADS_PER_ENDPOINT and fds2 - fds0 <= FDS_PER_ENDPOINT, (
            f"while consuming: {threads2 - threads0} threads, {fds2 - fds0} descriptors")
    finally:
        conn.close()
    assert wait_until(lambda: _counts() <= (threads0, fds0), timeout=10, what="threads and fds given back"), (
        f"after close: {_counts()} vs {(threads0, fds0)} (threads, fds) before")


@pytest.mark.parametrize("target", _params(disruptive=True))
@pytest.mark.timeout(120)
def test_broker_sigkill_under_50_consumers_every_one_resubscribes_nothing_confirmed_lost(
    target: str, queues: Callable[[int], list[str]]
) -> None:
    url = need_broker(target)
    control = ScriptedControl(url, _broker(target), [str(ROOT / "scripts" / "brokers")])
    names = queues(50)
    with mqprimer.connect(url, reconnect_timeout=60) as conn:
        consumers = [conn.consumer(q, prefetch=4) for q in names]
        p = conn.producer()
        live = p.send_many([(q, "before") for q in names])
        seen = _drain(consumers, [{i} for i in live], 20)
        assert all(len(s) == 1 for s in seen), "not every consumer was live before the kill"
        held = p.send_many([(q, f"held {n}") for n in range(2) for q in names])  # confirmed, not consumed yet
        try:
            control.kill()
        finally:
            control.start()
        after = p.send_many([(q, "after") for q in names])  # the producer reconnects
        want = [{held[i], held[i + 50], after[i]} for i in range(50)]
        seen = _drain(consumers, want, 60)
        lost = {q: sorted(w - s) for q, w, s in zip(names, want, seen, strict=True) if not w <= s}
        state = STATE.get(_broker(target))
        where = ""
        if lost and state is not None:
            try:
                where = f"; the broker says: {state(sorted(lost))}"
            except Exception as exc:
                where = f"; the broker could not be asked: {exc!r}"
        assert not lost, f"confirmed messages lost or consumers not resubscribed on {len(lost)} queues: {lost}{where}"


@pytest.mark.parametrize("target", _params())
@pytest.mark.timeout(60)
def test_a_queue_deleted_behind_one_consumer_fails_it_alone(target: str, queues: Callable[[int], list[str]]) -> None:
    url = need_broker(target)
    delete = DELETE.get(_broker(target))
    if delete is None:
        pytest.fail(f"no way to delete a queue on {_broker(target)} in tests/test_multiplex.py DELETE")
    names = queues(50)
    with mqprimer.connect(url) as conn:
        consumers = [conn.consumer(q, prefetch=4) for q in names]
        p = conn.producer()
        first = p.send_many([(q, "first") for q in names])
        held = wait_until(lambda: consumers[0].receive(timeout=0.1), what="a message to hold")
        assert held is not None and held.id == first[0]
        seen = _drain(consumers[1:], [{i} for i in first[1:]], 20)
        assert all(len(s) == 1 for s in seen)
        victim = 7
        delete([names[victim]])
        deadline = time.monotonic() + 15
        with pytest.raises(BrokerError) as info:
            while time.monotonic() < deadline:
                consumers[victim].receive(timeout=0.1)
        assert not isinstance(info.value, ConnectionFailed), f"the connection was disturbed: {info.value}"
        assert names[victim] in str(info.value)
        held.ack()  # still this consumer's: its channel (and the connection) survived the other's error
        others = [c for i, c in enumerate(consumers) if i != victim]
        second = p.send_many([(q, "second") for i, q in enumerate(names) if i != victim])
        seen = _drain(others, [{i} for i in second], 20)
        assert seen == [{i} for i in second], "the other consumers stopped consuming"
