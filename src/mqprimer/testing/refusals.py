"""Refusal checks: a feature a backend declares ``UNSUPPORTED`` raises and loses nothing.

:func:`check_refused` runs the check for one feature of :data:`mqprimer.backend.FEATURES`
against any connection. The conformance suite runs it for every feature the backend under
test declares unsupported, and once per feature on the fake backend
(:mod:`mqprimer.testing.fake`) so that the portable layer's checks are proven even where
no real backend lacks the feature. Each check costs a few round trips; it needs only what
the backend does support (a queue, or else a topic), so it suits at-most-once backends too.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

import mqprimer
from mqprimer import RetryPolicy, Topic, UnsupportedError
from mqprimer.backend import FEATURES, UNSUPPORTED, Backend, Queue
from mqprimer.envelope import encode, make

PROBE = {"refusal": "probe"}
REFUSED = {"refusal": "refused"}


def _target(conn: mqprimer.Connection, dest: str, topic_root: str) -> str | Topic:
    """Where this backend can carry a message: the queue, or a topic if it has no queues."""
    return dest if conn.capabilities.queue else Topic(f"{topic_root}.refusals")


@contextmanager
def _consumer(conn: mqprimer.Connection, target: str | Topic) -> Iterator[mqprimer.Consumer]:
    with conn.consumer(target) as c:
        yield c


def _probe(conn: mqprimer.Connection, c: mqprimer.Consumer, target: str | Topic) -> mqprimer.Message:
    """Send plain messages until one arrives (a topic subscription may miss the first ones
    on an at-most-once backend); every message that arrives must be a probe."""
    p = conn.producer()
    sent: set[str] = set()
    deadline = time.monotonic() + 15
    while True:
        sent.add(p.send(target, PROBE))
        m = c.receive(timeout=0.5 if len(sent) > 1 else 5.0)
        if m is not None:
            assert m.body == PROBE, f"a refused message was delivered: {m.body!r}"
            assert m.id in sent
            return m
        assert time.monotonic() < deadline, "no probe message arrived within 15 s"


def _refused(action: Callable[[], object], what: str) -> None:
    with pytest.raises(UnsupportedError) as info:
        action()
    assert str(info.value), f"{what}: the UnsupportedError says nothing"


def _settle_after_refusal(c: mqprimer.Consumer, m: mqprimer.Message) -> None:
    """The refused outcome left the message as it was: still unsettled, and it can be acked."""
    assert not m.settled, "a refused outcome settled the message"
    m.ack()
    assert m.settled
    extra = c.receive(timeout=0.3)
    assert extra is None or extra.body == PROBE, "a refused outcome put a copy of the message back"


def check_refused(conn: mqprimer.Connection, feature: str, dest: str, topic_root: str) -> None:
    """Assert that ``feature`` (declared unsupported) is refused with UnsupportedError and nothing is lost."""
    caps = conn.capabilities
    assert feature in FEATURES, feature
    assert getattr(caps, feature) is UNSUPPORTED, f"{caps.name} declares {feature} supported"
    p = conn.producer()
    target = _target(conn, dest, topic_root)

    if feature == "queue":
        _refused(lambda: conn.consumer(dest), "consumer on a queue")
        _refused(lambda: p.send(dest, REFUSED), "send to a queue")
        _refused(lambda: p.send_many([(dest, REFUSED)]), "send_many to a queue")
        return
    if feature == "topic":
        _refused(lambda: conn.consumer(Topic(f"{topic_root}.t")), "consumer on a topic")
        _refused(lambda: p.send(Topic(f"{topic_root}.t"), REFUSED), "send to a topic")
        _refused(lambda: p.send_many([(Topic(f"{topic_root}.t"), REFUSED)]), "send_many to a topic")
        return
    if feature == "patterns":
        for pattern in (f"{topic_root}.*", f"{topic_root}.#"):
            _refused(functools.partial(conn.consumer, Topic(pattern)), f"consumer on pattern {pattern}")
        return
    if feature == "shared_subscription":
        _second_consumer_refused(conn, topic_root)
        return
    if feature == "stats":
        _refused(lambda: conn.stats(dest), "stats of a queue")
        with _consumer(conn, target) as c:
            m = _probe(conn, c, target)
            _refused(lambda: conn.stats(dest), "stats of a queue while a message is delivered")
            _settle_after_refusal(c, m)
        return
    if feature == "status":
        _refused(lambda: conn.status("no-such-message"), "status")
        with _consumer(conn, target) as c:
            m = _probe(conn, c, target)
            _refused(lambda: conn.status(m.id), "status of a delivered message")
            _settle_after_refusal(c, m)
        return

    with _consumer(conn, target) as c:
        if feature in ("priority", "delay", "ttl"):
            option = {"priority": {"priority": 5}, "delay": {"delay": 1.0}, "ttl": {"ttl": 60.0}}[feature]
            _refused(lambda: p.send(target, REFUSED, **option), f"send with {feature}")  # type: ignore[arg-type]
            _refused(lambda: p.send(target, REFUSED, headers={"h": "v"}, **option),  # type: ignore[arg-type]
                     f"send with {feature} and headers")
            _refused(lambda: p.send_many([p.build(target, REFUSED, **option)]),  # type: ignore[arg-type]
                     f"send_many with {feature}")
            m = _probe(conn, c, target)  # asserts that no refused message arrives
            if feature == "delay":
                _refused(lambda: m.retry(delay=1.0), "retry with a delay")
            _settle_after_refusal(c, m)
        elif feature == "retry":
            m = _probe(conn, c, target)
            _refused(m.retry, "retry")
            assert not m.settled
            _refused(lambda: m.fail(ValueError("handler failed")), "fail() under a policy that retries")
            _settle_after_refusal(c, m)
        elif feature == "request_reply":
            _refused(lambda: conn.request(dest, REFUSED, timeout=1.0), "request")
            m = _probe(conn, c, target)  # asserts that the refused request was not sent
            _settle_after_refusal(c, m)
            if isinstance(target, str):
                # a request from elsewhere (a hand-written client's mqreplyto) cannot be answered either
                env = make(id="hand-written", source="urn:test", type="t", body=PROBE, reply_to="nowhere")
                conn.endpoints[0].call("raw publish", lambda b: b.publish(Queue(dest), encode(env),
                                                                          message_id=env.id))
                req = c.receive(timeout=10)
                assert req is not None and req.reply_to == "nowhere"
                _refused(lambda: req.reply("answer"), "reply")
                _settle_after_refusal(c, req)
        elif feature == "dead_letter":
            m = _probe(conn, c, target)
            _refused(lambda: m.dead_letter("bad"), "dead_letter")
            assert not m.settled
            c.retry_policy = RetryPolicy(max_attempts=1)
            _refused(lambda: m.fail(ValueError("handler failed")), "fail() with attempts exhausted")
            _settle_after_refusal(c, m)
            if isinstance(target, str):
                _refused(lambda: conn.dead_letters(dest), "dead-letter management")
        else:  # pragma: no cover - FEATURES grew: add its check here
            raise AssertionError(f"no refusal check for feature {feature!r}")
    if feature == "dead_letter" and isinstance(target, str) and caps.guarantee == "at-least-once":
        _foreign_input_is_kept(conn, dest)


def _foreign_input_is_kept(conn: mqprimer.Connection, dest: str) -> None:
    """Without dead letters, input that is not an envelope is skipped, not dropped."""
    foreign = b"not an envelope"
    conn.endpoints[0].call("raw publish", lambda b: b.publish(Queue(dest), foreign, message_id="foreign"))
    mid = conn.producer().send(dest, PROBE)
    with conn.consumer(dest) as c:
        m = c.receive(timeout=10)
        assert m is not None and m.id == mid, "the consumer stopped at the foreign message"
        m.ack()

    # the driver itself still has the foreign message once the consumer has closed
    def raw(b: Backend) -> bytes | None:
        sub = b.subscribe(Queue(dest), prefetch=1)
        try:
            d = sub.receive(10.0)
            if d is None:
                return None
            sub.ack(d)
            return d.payload
        finally:
            sub.close()

    assert conn.endpoints[0].call("raw receive", raw) == foreign, "the foreign message was dropped"


def _second_consumer_refused(conn: mqprimer.Connection, topic_root: str) -> None:
    """A named subscription that cannot be shared: a second consumer of it is refused (on this
    connection and on another), the first one keeps its messages, and the name is free again
    once the first has closed."""
    topic = Topic(f"{topic_root}.group")
    name = f"{topic_root}.g"
    if not conn.capabilities.topic:
        _refused(lambda: conn.consumer(topic, subscription=name), "a named subscription")
        return
    try:
        first = conn.consumer(topic, subscription=name)
    except UnsupportedError as exc:  # no named subscriptions at all (ZeroMQ): nothing to share
        assert str(exc), "a named subscription: the UnsupportedError says nothing"
        return
    try:
        _refused(lambda: conn.consumer(topic, subscription=name), "a second consumer of a named subscription")
        with mqprimer.connect([ep.url.render(hide_password=False) for ep in conn.endpoints]) as other:
            _refused(lambda: other.consumer(topic, subscription=name),
                     "a second consumer of a named subscription on another connection")
        _probe(conn, first, topic).ack()  # the first consumer still has the subscription's messages
    finally:
        first.close()
    conn.consumer(topic, subscription=name).close()


__all__ = ["check_refused"]
