"""The battery's input and claim checks: poison, credentials, emulated settling, TTL, size limit."""

from __future__ import annotations

import time
import uuid

import pytest

import mqprimer
from mqprimer import AuthenticationError, MessageTooLarge, RetryPolicy
from mqprimer.backend import EMULATED, NATIVE, Delivery, Subscription

from ._stream import COPY_THEN_DIE, child, reap
from ._target import Target
from .helpers import collect, wait_until

pytestmark = pytest.mark.timeout(240)


# -- bad input, bad credentials ------------------------------------------------------------------
def test_poison_and_foreign_input(target: Target) -> None:
    """A message that always fails and bytes that are no envelope are dead-lettered (with their
    reasons) while the consumer goes on with the good ones."""
    t, started = target, time.monotonic()
    t.only_for_lists("poison and foreign input")
    foreign = b"<xml>not ours \xff</xml>"
    keeps_dead = bool(t.caps.dead_letter) and bool(t.caps.queue)  # a topic's dead letters: no queue to list
    with mqprimer.connect(t.url) as conn:
        # subscribed first: a topic's messages reach only subscribers that exist
        with conn.consumer(t.dest, retry=RetryPolicy(max_attempts=2, initial_delay=0, jitter=0)) as c:
            conn.endpoints[0].call("raw publish", lambda b: b.publish(t.raw_dest, foreign, message_id="foreign"))
            p = conn.producer()
            poison = p.send(t.dest, {"poison": True})
            good = {p.send(t.dest, {"n": i}) for i in range(5)}
            done: set[str] = set()
            attempts: list[int] = []
            deadline = time.monotonic() + 30
            while (len(done) < 5 or len(attempts) < 2) and time.monotonic() < deadline:
                m = c.receive(timeout=0.5)
                if m is None:
                    continue
                if isinstance(m.body, dict) and m.body.get("poison"):
                    attempts.append(m.attempt)
                    m.fail(ValueError("poison"))
                else:
                    m.ack()
                    done.add(m.id)
            assert c.receive(timeout=0.5) is None, "the poison message came back after its last attempt"
        dead: list[mqprimer.Envelope] = []
        if keeps_dead:
            dl = conn.dead_letters(t.queue)
            wait_until(lambda: len(dl.list()) >= 2, timeout=20, what="two dead letters")
            dead = dl.list()
    if keeps_dead:
        t.record("poison and foreign input", started, sent=7, confirmed=7, delivered=len(done) + len(dead),
                 lost=7 - len(done) - len(dead), duplicated=0, note="both bad ones listed in the dead letters")
    else:
        t.record("poison and foreign input", started, sent=7, confirmed=7, delivered=len(done) + bool(attempts),
                 note=f"{t.caps.name} keeps no listable dead letters for this destination")
    assert done == good and attempts == [1, 2]
    if keeps_dead:
        by_type = {e.type: e for e in dead}
        invalid = by_type["mqprimer.invalid"]
        assert invalid.body == foreign and "invalid envelope" in (invalid.reason or "")
        (env,) = [e for e in dead if e.id == poison]
        assert env.attempt == 2 and "ValueError: poison" in (env.reason or "")


def test_wrong_credentials(target: Target) -> None:
    t, started, fault = target, time.monotonic(), "wrong credentials"
    t.only_for_lists(fault)
    u = mqprimer.URL.parse(t.url)
    if not u.password:
        t.na(fault, "the URL carries no password: the broker has no authentication here")
    marker = f"wrong-{uuid.uuid4().hex[:8]}"
    bad = mqprimer.URL(u.scheme, u.username, marker, u.hosts, u.path, u.query).render(hide_password=False)
    with pytest.raises(AuthenticationError) as info:
        mqprimer.connect(bad, reconnect_timeout=2)
    took = time.monotonic() - started
    t.record(fault, started, recovery_s=took, note=f"AuthenticationError after {took:.1f}s")
    assert took < 10 and marker not in str(info.value) and "***" in str(info.value)


# -- emulated settling, TTL, size ------------------------------------------------------------------
@pytest.mark.parametrize("outcome", ["retry", "dead letter"])
def test_killed_between_copy_and_ack(target: Target, outcome: str) -> None:
    """Emulated retry / dead letter publish a confirmed copy, then ack the original: a process
    SIGKILLed between the two leaves a duplicate, never a loss."""
    t, started, fault = target, time.monotonic(), f"killed between copy and ack ({outcome})"
    t.only_for_lists(fault)
    support = t.caps.retry if outcome == "retry" else t.caps.dead_letter
    if support is not EMULATED:
        t.na(fault, f"{outcome} is {support.value} on {t.caps.name}: no copy is made")
    if t.caps.name == "memory":
        t.na(fault, "memory:// dies with the process")
    if not t.caps.queue:
        t.na(fault, f"{t.caps.name} has topics only: a dead subscriber's copy has no queue to come back to")
    with mqprimer.connect(t.url) as conn:
        mid = conn.producer().send(t.queue, {"copy": outcome})
        proc = child(COPY_THEN_DIE, t.url, t.queue, outcome.split()[0])
        try:
            rc = proc.wait(60)
        finally:
            reap(proc)
        assert rc == -9, f"the child did not die in the ack: rc={rc} {proc.stderr.read() if proc.stderr else ''}"
        with conn.consumer(t.queue) as c:
            got = collect(c, 2 if outcome == "retry" else 1, timeout=60)
            while (m := c.receive(timeout=0.5)) is not None:
                got.append(m)
                m.ack()
        dead = conn.dead_letters(t.queue).list() if outcome == "dead letter" else []
    copies = [m.attempt for m in got if m.id == mid] + [e.attempt for e in dead if e.id == mid]
    fig = {"sent": 1, "confirmed": 1, "delivered": min(len(copies), 1), "lost": 0 if copies else 1,
           "duplicated": max(len(copies) - 1, 0)}
    t.record(fault, started, **fig, note="the original comes back and the copy exists")
    assert sorted(copies) == ([1, 2] if outcome == "retry" else [1, 1]), copies


def test_native_ttl_is_told_apart_from_the_portable_check(target: Target) -> None:
    """An expired message reaches the driver only where TTL is emulated; where it is declared
    native, the broker itself must never hand it out (read through the raw driver)."""
    t, started, fault = target, time.monotonic(), "native TTL"
    t.only_for_lists(fault)
    with mqprimer.connect(t.url) as conn:
        ep = conn.endpoints[0]

        def subscribe() -> Subscription:
            return ep.call("raw subscribe", lambda b: b.subscribe(t.raw_dest, prefetch=10))

        # a queue is read only after the expiry (a broker's TTL applies to what it still holds,
        # not to what it already pushed to a consumer); a topic reaches only existing subscribers
        sub = None if t.caps.queue else subscribe()
        p = conn.producer()
        short = p.send(t.dest, "short", ttl=0.3)
        long_id = p.send(t.dest, "long", ttl=60)
        after = time.monotonic() + 1.5  # ActiveMQ checks expiry each second
        wait_until(lambda: time.monotonic() > after, timeout=5, what="the short TTL to pass")
        sub = sub or subscribe()
        seen: list[bytes] = []
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(long_id.encode() in s for s in seen):
                d: Delivery | None = ep.call("raw receive", lambda b: sub.receive(0.5))
                if d is not None:
                    seen.append(bytes(d.payload))
                    ep.call("raw ack", lambda b, d=d: sub.ack(d))  # type: ignore[misc]
        finally:
            ep.call("raw close", lambda b: sub.close())
    reached = any(short.encode() in s for s in seen)
    t.record(fault, started, sent=2, confirmed=2, delivered=len(seen),
             note=f"ttl {t.caps.ttl.value}: the expired message {'reached' if reached else 'never reached'} the driver")
    assert any(long_id.encode() in s for s in seen), "the unexpired message never arrived"
    if t.caps.ttl is NATIVE:
        assert not reached, "TTL is declared native, but the broker handed out an expired message"
    else:
        assert reached, "TTL is declared emulated, but the broker dropped the message itself: declare it native"


def test_broker_size_limit(target: Target) -> None:
    """A message of exactly the broker's declared limit round-trips; one byte more is refused by
    mqprimer with MessageTooLarge, and the raw driver proves the broker refuses it too."""
    t, started, fault = target, time.monotonic(), "broker size limit"
    t.only_for_lists(fault)
    if t.caps.max_message_size is None:
        t.na(fault, f"{t.caps.name} declares no broker limit (mqprimer's max_message_size applies)")
    limit: int = t.caps.max_message_size or 0
    with mqprimer.connect(t.url, max_message_size=limit + 1024) as conn, conn.consumer(t.dest) as c:
        p = conn.producer()
        base = len(p.build(t.dest, "").payload)
        at_limit = p.build(t.dest, "x" * (limit - base))
        assert len(at_limit.payload) == limit
        p.send_many([at_limit])
        with pytest.raises(MessageTooLarge, match=f"{limit:,}"):
            p.send(t.dest, "x" * (limit - base + 1))
        m = collect(c, 1, timeout=60)[0]
        assert m.id == at_limit.message_id and len(m.body) == limit - base
        over = b"x" * (limit + 1)
        with pytest.raises(mqprimer.MQError):
            conn.endpoints[0].call("raw publish", lambda b: b.publish(t.raw_dest, over, message_id="over"))
    t.record(fault, started, sent=2, confirmed=1, delivered=1, note=f"limit {limit:,} bytes: at it passes, over not")
