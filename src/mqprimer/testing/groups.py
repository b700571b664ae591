"""Conformance: consumer groups, several consumers sharing one named topic subscription.

Run by :mod:`mqprimer.testing.conformance` (which imports this module) on every backend
that declares ``shared_subscription``; where it is declared unsupported, the refusal of a
second consumer is checked by ``test_every_feature_is_allowed_or_refused``.
"""

from __future__ import annotations

import time

import pytest

import mqprimer
from mqprimer import Topic
from mqprimer.backend import UNSUPPORTED

from .helpers import collect

pytestmark = pytest.mark.timeout(90)

N = 40


def _needs_groups(conn: mqprimer.Connection) -> None:
    if conn.capabilities.shared_subscription is UNSUPPORTED:
        pytest.skip("shared_subscription declared unsupported: "
                    "refusal checked by test_every_feature_is_allowed_or_refused")


def _topics(conn: mqprimer.Connection, root: str) -> tuple[Topic, Topic]:
    """Where to send, and what a group subscribes to (a pattern where the backend has them)."""
    sent = Topic(f"{root}.orders.created")
    return sent, Topic(f"{root}.orders.*") if conn.capabilities.patterns else sent


def _drain(consumers: dict[str, mqprimer.Consumer], want: set[str], seen: dict[str, list[str]],
           timeout: float = 30.0) -> None:
    """Receive (and ack) from every consumer in turn until ``want`` has all arrived."""
    deadline = time.monotonic() + timeout
    while not want <= {i for ids in seen.values() for i in ids} and time.monotonic() < deadline:
        for name, c in consumers.items():
            m = c.receive(timeout=0.1)
            if m is not None:
                seen.setdefault(name, []).append(m.id)
                m.ack()


def test_group_members_split_a_subscription_and_another_name_gets_everything(
    mq_url: str, conn: mqprimer.Connection, topic_root: str
) -> None:
    _needs_groups(conn)
    sent_to, pattern = _topics(conn, topic_root)
    with mqprimer.connect(mq_url) as other, \
            conn.consumer(pattern, subscription=f"{topic_root}-billing", prefetch=1) as a, \
            other.consumer(pattern, subscription=f"{topic_root}-billing", prefetch=1) as b, \
            conn.consumer(pattern, subscription=f"{topic_root}-audit", prefetch=10) as audit:
        p = conn.producer()
        sent = {p.send(sent_to, {"i": i}) for i in range(N)}
        seen: dict[str, list[str]] = {}
        _drain({"a": a, "b": b}, sent, seen)
        got = seen.get("a", []) + seen.get("b", [])
        assert set(got) == sent, f"{len(sent - set(got))} of {N} messages never reached the group"
        assert len(got) == N, "a message went to two members of one group"
        assert seen.get("a") and seen.get("b"), "one member of the group got every message"
        for c in (a, b):
            assert c.receive(timeout=0.3) is None, "the group got more than was sent"
        everything = [m.id for m in collect(audit, N)]
        assert sorted(everything) == sorted(sent), "another subscription name did not get every message once"
        assert audit.receive(timeout=0.3) is None


def test_group_keeps_messages_sent_while_no_member_is_attached(conn: mqprimer.Connection, topic_root: str) -> None:
    _needs_groups(conn)
    sent_to, pattern = _topics(conn, topic_root)
    name = f"{topic_root}-away"
    conn.consumer(pattern, subscription=name).close()  # the group exists from here on
    p = conn.producer()
    sent = [p.send(sent_to, {"i": i}) for i in range(10)]
    with conn.consumer(pattern, subscription=name, prefetch=10) as c:
        assert sorted(m.id for m in collect(c, 10)) == sorted(sent)
        assert c.receive(timeout=0.3) is None


def test_member_closed_with_unsettled_messages_gives_them_to_the_other(
    mq_url: str, conn: mqprimer.Connection, topic_root: str
) -> None:
    _needs_groups(conn)
    sent_to, pattern = _topics(conn, topic_root)
    name = f"{topic_root}-handover"
    with mqprimer.connect(mq_url) as other:
        a = conn.consumer(pattern, subscription=name, prefetch=5)
        try:
            with other.consumer(pattern, subscription=name, prefetch=1) as b:
                p = conn.producer()
                sent = {p.send(sent_to, {"i": i}) for i in range(10)}
                held = [m.id for m in collect(a, 3, ack=False)]  # received, never settled
                a.close()
                seen: dict[str, list[str]] = {}
                _drain({"b": b}, sent, seen)
                got = seen.get("b", [])
                assert set(got) == sent, f"{len(sent - set(got))} messages were lost with the closed member"
                assert set(held) <= set(got), "the closed member's unsettled messages did not reach the other"
                assert len(got) == len(sent), "the remaining member got a message twice"
        finally:
            a.close()


__all__ = [
    "test_group_keeps_messages_sent_while_no_member_is_attached",
    "test_group_members_split_a_subscription_and_another_name_gets_everything",
    "test_member_closed_with_unsettled_messages_gives_them_to_the_other",
]
