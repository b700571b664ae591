"""The conformance suite: one set of tests every backend URL must pass.

Fixtures come from :mod:`mqprimer.testing.plugin` (``mq_url``, ``conn``, ``dest``).
A declared capability is exercised; an undeclared one must raise ``UnsupportedError``.
"""

from __future__ import annotations

import time

import pytest

import mqprimer
from mqprimer import MessageTooLarge, RetryPolicy, StateError, Status, Topic, UnsupportedError, registry
from mqprimer.backend import FEATURES, UNSUPPORTED, Queue, QueueStats

from .fake import fake_scheme
from .helpers import collect, unreachable_url, wait_until
from .refusals import check_refused

pytestmark = pytest.mark.timeout(90)

ODD_HEADERS = {"tenant": "acme", "ключ": "значение", "emoji 🐇": "🥕 carrots", "empty": "", "quote\"'": "a\nb\tc"}


def _one(consumer: mqprimer.Consumer, timeout: float = 10.0) -> mqprimer.Message:
    m = consumer.receive(timeout=timeout)
    assert m is not None, f"no message within {timeout}s"
    return m


def _raw_publish(conn: mqprimer.Connection, queue: str, payload: bytes) -> None:
    """Put bytes that are not our envelope on a queue, through the driver itself."""
    conn.endpoints[0].call("raw publish", lambda b: b.publish(Queue(queue), payload, message_id="foreign"))


# -- round trips --------------------------------------------------------------------
def test_json_round_trip_with_headers(conn: mqprimer.Connection, dest: str) -> None:
    _unsupported(conn, "queue")
    body = {"path": "a.jpg", "size": [1, 2.5, None, True], "text": "naïve ☃ \u0000 end"}
    mid = conn.producer().send(dest, body, headers=ODD_HEADERS, type="photo.uploaded")
    with conn.consumer(dest) as c:
        m = _one(c)
        assert (m.id, m.body, m.headers, m.type, m.attempt) == (mid, body, ODD_HEADERS, "photo.uploaded", 1)
        assert m.destination == Queue(dest)
        m.ack()


def test_bytes_round_trip_non_utf8(conn: mqprimer.Connection, dest: str) -> None:
    _unsupported(conn, "queue")
    body = bytes(range(256)) + b"\xff\xfe\x00\xc3\x28"
    conn.producer().send(dest, body, headers={"k": "v"})
    with conn.consumer(dest) as c:
        m = _one(c)
        assert m.body == body and isinstance(m.body, bytes) and m.headers == {"k": "v"}
        m.ack()


def test_thousand_messages_no_loss_no_duplicates(conn: mqprimer.Connection, dest: str) -> None:
    _unsupported(conn, "queue")
    p = conn.producer()
    sent = {p.send(dest, {"i": i}) for i in range(1000)}
    with conn.consumer(dest, prefetch=100) as c:
        got = collect(c, 1000, timeout=60)
        assert c.receive(timeout=0.5) is None, "more than 1000 messages arrived"
    ids = [m.id for m in got]
    assert len(set(ids)) == 1000 and set(ids) == sent


def test_send_many_delivers_every_message_once_and_returns_ids_in_order(
    conn: mqprimer.Connection, dest: str
) -> None:
    _unsupported(conn, "queue")
    other = f"{dest}.b"
    p = conn.producer()
    items = [p.build(other if i % 50 == 7 else dest, {"i": i}) for i in range(1200)]  # switches queue 24 times
    ids = p.send_many(items)
    assert ids == [it.message_id for it in items]
    assert p.send_many([]) == []
    pairs = p.send_many([(dest, "pair")])
    expected = {it.message_id for it in items if it.destination == Queue(dest)} | set(pairs)
    expected_other = {it.message_id for it in items if it.destination == Queue(other)}
    if conn.capabilities.status is not UNSUPPORTED:
        assert conn.status(ids[-1]) in (Status.READY, Status.RESERVED)
    for queue, want in ((dest, expected), (other, expected_other)):
        with conn.consumer(queue, prefetch=100) as c:
            got = [m.id for m in collect(c, len(want), timeout=60)]
            assert c.receive(timeout=0.5) is None, f"more than {len(want)} messages arrived on {queue}"
        assert len(got) == len(set(got)) and set(got) == want


def test_competing_consumers_share_a_queue(mq_url: str, conn: mqprimer.Connection, dest: str) -> None:
    _unsupported(conn, "queue")
    p = conn.producer()
    sent = {p.send(dest, i) for i in range(40)}
    with mqprimer.connect(mq_url) as other, conn.consumer(dest, prefetch=1) as a, other.consumer(dest, prefetch=1) as b:
        seen: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while len(seen) < 40 and time.monotonic() < deadline:
            for name, c in (("a", a), ("b", b)):
                m = c.receive(timeout=0.2)
                if m is not None:
                    assert m.id not in seen, "a message went to two competing consumers"
                    seen[m.id] = name
                    m.ack()
    assert set(seen) == sent
    assert set(seen.values()) == {"a", "b"}, "one consumer got every message"


# -- topics ------------------------------------------------------------------------
def test_topic_fans_out_to_every_subscriber(mq_url: str, conn: mqprimer.Connection, topic_root: str) -> None:
    topic = Topic(f"{topic_root}.events")
    if not conn.capabilities.topic:
        with pytest.raises(UnsupportedError):
            conn.consumer(topic)
        with pytest.raises(UnsupportedError):
            conn.producer().send(topic, {})
        return
    with mqprimer.connect(mq_url) as other, conn.consumer(topic) as s1, other.consumer(topic) as s2:
        p = conn.producer()
        sent = [p.send(topic, {"n": i}) for i in range(10)]
        for s in (s1, s2):
            assert [m.id for m in collect(s, 10)] == sent
            assert s.receive(timeout=0.3) is None


def test_topic_patterns_match_only_what_they_should(conn: mqprimer.Connection, topic_root: str) -> None:
    caps = conn.capabilities
    r = topic_root
    if not caps.topic:
        pytest.skip("backend declares no topics (checked by the fan-out test)")
    if not caps.patterns:
        with pytest.raises(UnsupportedError):
            conn.consumer(Topic(f"{r}.*"))
        return
    expect = {
        f"{r}.*": {f"{r}.a"},
        f"{r}.#": {f"{r}.a", f"{r}.a.b", f"{r}"},
        f"{r}.a.*": {f"{r}.a.b"},
        f"{r}.*.b": {f"{r}.a.b"},
        f"{r}.#.b": {f"{r}.a.b"},
    }
    subs = {pat: conn.consumer(Topic(pat)) for pat in expect}
    try:
        p = conn.producer()
        for name in (f"{r}.a", f"{r}.a.b", r, f"{r}x.a", f"other.{r}.a"):
            p.send(Topic(name), {"topic": name})
        for pat, want in expect.items():
            got = {m.body["topic"] for m in collect(subs[pat], len(want))}
            assert got == want, pat
            assert subs[pat].receive(timeout=0.3) is None, f"{pat} matched too much"
    finally:
        for s in subs.values():
            s.close()


# -- outcomes ------------------------------------------------------------------------
def test_ack_removes(conn: mqprimer.Connection, dest: str) -> None:
    _unsupported(conn, "queue")
    conn.producer().send(dest, "x")
    with conn.consumer(dest) as c:
        _one(c).ack()
    with conn.consumer(dest) as c:
        assert c.receive(timeout=1.0) is None


SHORT_LEASE = 2  # seconds: the lease the touch test sets through Backend.lease_param


def _short_lease_url(mq_url: str) -> str:
    """``mq_url`` with its delivery lease shortened, where the backend declares how."""
    url = mqprimer.URL.parse(mq_url)
    param = registry.get(url.scheme).lease_param
    if param is None:
        return mq_url
    return url.with_query(**{param: str(SHORT_LEASE)}).render(hide_password=False)


def test_touch_keeps_a_message_past_its_lease_and_without_touch_it_goes_back(mq_url: str, dest: str) -> None:
    url = _short_lease_url(mq_url)
    with mqprimer.connect(url) as conn, mqprimer.connect(url) as other:
        _unsupported(conn, "queue")
        p = conn.producer()
        mid = p.send(dest, "long job")
        with conn.consumer(dest, prefetch=1) as c:
            lease = c.delivery_lease
            assert lease is None or 0 < lease <= 10, (
                f"a {lease:.0f} s lease is too long to test: declare the URL option that sets it as "
                "the backend's lease_param"
            )
            m = _one(c)
            assert m.id == mid
            thief = other.consumer(dest, prefetch=1)
            try:
                m.touch()
                touches = True
            except UnsupportedError:  # a lease the broker cannot renew (gearman's job timeout)
                touches = lease is None
            if touches:
                # held well past the lease (or 0.5 s where there is none), touched every quarter lease
                step = lease / 4 if lease else 0.1
                deadline = time.monotonic() + (lease + 1.0 if lease else 0.5)
                while time.monotonic() < deadline:
                    m.touch()
                    got = thief.receive(timeout=step)
                    assert got is None, "a touched message went to another consumer"
            m.ack()
            with pytest.raises(StateError):
                m.touch()
            assert thief.receive(timeout=0.3) is None, "an acked message was delivered again"
            # (closed before the next send: a consumer waiting on beanstalkd would take it)
            thief.close()
            if lease is None:
                return  # reserved until settled: test_unsettled_messages_go_back_on_close
            # without touch, the lease runs out and the message goes to the other consumer
            late = p.send(dest, "abandoned")
            m2 = _one(c)
            assert m2.id == late
            thief = other.consumer(dest, prefetch=1)
            deadline = time.monotonic() + 5 * lease + 5
            got = None
            while got is None and time.monotonic() < deadline:
                got = thief.receive(timeout=0.5)
            assert got is not None and got.id == late, "the message stayed with a consumer whose lease ran out"
            got.ack()
            thief.close()
            with pytest.raises(mqprimer.MQError):
                m2.ack()  # the lease was lost: it is the other consumer's message now


def test_unsettled_messages_go_back_on_close(conn: mqprimer.Connection, dest: str) -> None:
    _unsupported(conn, "queue")
    mid = conn.producer().send(dest, "x")
    with conn.consumer(dest) as c:
        m = _one(c)
    with pytest.raises(StateError):
        m.ack()
    with conn.consumer(dest) as c:
        again = _one(c)
        assert again.id == mid
        again.ack()


def test_double_settle_raises(conn: mqprimer.Connection, dest: str) -> None:
    _unsupported(conn, "queue")
    conn.producer().send(dest, "x")
    with conn.consumer(dest) as c:
        m = _one(c)
        m.ack()
        for settle in (m.ack, m.retry, lambda: m.dead_letter("again")):
            with pytest.raises(StateError):
                settle()


def test_retry_redelivers_with_next_attempt(conn: mqprimer.Connection, dest: str) -> None:
    _unsupported(conn, "queue")
    _unsupported(conn, "retry")
    mid = conn.producer().send(dest, {"k": 1}, headers={"h": "1"})
    with conn.consumer(dest) as c:
        _one(c).retry()
        m = _one(c)
        assert (m.id, m.attempt, m.body, m.headers) == (mid, 2, {"k": 1}, {"h": "1"})
        m.retry()
        m = _one(c)
        assert m.attempt == 3
        m.ack()


def test_retry_delay_is_honoured(conn: mqprimer.Connection, dest: str) -> None:
    _unsupported(conn, "queue")
    _unsupported(conn, "retry")
    conn.producer().send(dest, "x")
    with conn.consumer(dest) as c:
        m = _one(c)
        if not conn.capabilities.delay:
            with pytest.raises(UnsupportedError):
                m.retry(delay=1.0)
            m.ack()
            return
        start = time.monotonic()
        m.retry(delay=1.5)
        again = _one(c, timeout=15)
        assert time.monotonic() - start >= 1.5 - 0.02, "retried message came back before its delay"
        assert again.attempt == 2
        again.ack()


def test_dead_letter_lands_with_reason_and_replays(conn: mqprimer.Connection, dest: str) -> None:
    _unsupported(conn, "queue")
    _unsupported(conn, "dead_letter")
    mid = conn.producer().send(dest, {"bad": True})
    with conn.consumer(dest) as c:
        _one(c).dead_letter("bad image")
        assert c.receive(timeout=0.5) is None
    dead = conn.dead_letters(dest)
    listed = wait_until(lambda: dead.list(), timeout=10, what="a listed dead letter")
    assert [(e.id, e.reason, e.origin) for e in listed] == [(mid, "bad image", dest)]
    assert [e.id for e in dead.list()] == [mid], "listing must not consume dead letters"
    assert dead.replay() == 1
    with conn.consumer(dest) as c:
        m = _one(c)
        assert (m.id, m.body, m.attempt) == (mid, {"bad": True}, 1)
        m.ack()
    assert dead.list() == []


def test_dead_letters_purge(conn: mqprimer.Connection, dest: str) -> None:
    _unsupported(conn, "queue")
    _unsupported(conn, "dead_letter")
    p = conn.producer()
    for i in range(3):
        p.send(dest, i)
    with conn.consumer(dest) as c:
        for m in collect(c, 3, ack=False):
            m.dead_letter("purge me")
    dead = conn.dead_letters(dest)
    wait_until(lambda: len(dead.list()) == 3, what="three dead letters")
    assert dead.purge() == 3
    assert dead.list() == []


def test_retry_exhaustion_dead_letters_after_exactly_max_attempts(conn: mqprimer.Connection, dest: str) -> None:
    _unsupported(conn, "queue")
    _unsupported(conn, "retry")
    _unsupported(conn, "dead_letter")
    mid = conn.producer().send(dest, "poison")
    attempts = []
    policy = RetryPolicy(max_attempts=3, initial_delay=0, jitter=0)
    with conn.consumer(dest, retry=policy) as c:
        while True:
            m = c.receive(timeout=3)
            if m is None:
                break
            attempts.append(m.attempt)
            m.fail(ValueError("cannot parse"))
    assert attempts == [1, 2, 3]
    dead = wait_until(lambda: conn.dead_letters(dest).list(), what="the poison message in dead letters")
    assert dead[0].id == mid and dead[0].attempt == 3
    assert "ValueError: cannot parse" in (dead[0].reason or "") and "3 attempt" in (dead[0].reason or "")


# -- message options -------------------------------------------------------------------
def test_priority_order(conn: mqprimer.Connection, dest: str) -> None:
    p = conn.producer()
    if not conn.capabilities.priority:
        with pytest.raises(UnsupportedError):
            p.send(dest, "x", priority=5)
        return
    # exactly the declared number of levels: 0..9 fall into `priority_levels` bands; the
    # lowest and highest priority of each band, least urgent band first, must come out band
    # by band from the most urgent, and within a band in the order sent
    levels = conn.capabilities.priority_levels
    bands: dict[int, list[int]] = {}
    for prio in range(10):
        bands.setdefault(prio * levels // 10, []).append(prio)
    sent = {b: sorted({ps[0], ps[-1]}) for b, ps in bands.items()}
    for b in sorted(sent):
        for prio in sent[b]:
            p.send(dest, prio, priority=prio)
    expect = [prio for b in sorted(sent, reverse=True) for prio in sent[b]]
    with conn.consumer(dest, prefetch=10) as c:
        assert [m.body for m in collect(c, len(expect))] == expect


def test_delay_is_never_early(conn: mqprimer.Connection, dest: str) -> None:
    p = conn.producer()
    if not conn.capabilities.delay:
        with pytest.raises(UnsupportedError):
            p.send(dest, "x", delay=1.0)
        return
    start = time.monotonic()
    p.send(dest, "late", delay=1.5)
    p.send(dest, "now")
    with conn.consumer(dest) as c:
        assert _one(c).body == "now"
        m = _one(c, timeout=15)
        assert m.body == "late" and time.monotonic() - start >= 1.5 - 0.02
        m.ack()


def test_expired_messages_are_never_delivered(conn: mqprimer.Connection, dest: str) -> None:
    _unsupported(conn, "queue")
    _unsupported(conn, "ttl")
    p = conn.producer()
    p.send(dest, "short", ttl=0.3)
    p.send(dest, "long", ttl=60)
    deadline = time.monotonic() + 0.35
    wait_until(lambda: time.monotonic() > deadline, what="the short TTL to pass")
    with conn.consumer(dest) as c:
        assert [m.body for m in collect(c, 1)] == ["long"]
        assert c.receive(timeout=0.5) is None


def test_status_by_id(conn: mqprimer.Connection, dest: str) -> None:
    p = conn.producer()
    if not conn.capabilities.status:
        with pytest.raises(UnsupportedError):
            conn.status("anything")
        return
    mid = p.send(dest, "x")
    assert conn.status(mid) is Status.READY
    if conn.capabilities.delay:
        assert conn.status(p.send(dest, "later", delay=30)) is Status.DELAYED
    with conn.consumer(dest) as c:
        m = _one(c)
        assert m.id == mid and conn.status(mid) is Status.RESERVED
        m.ack()
    assert conn.status(mid) in (Status.DONE, Status.UNKNOWN)
    assert conn.status("no-such-message") is Status.UNKNOWN


def test_stats_count_ready_reserved_dead_and_consumers(conn: mqprimer.Connection, dest: str) -> None:
    """Every count a backend reports (``None``: cannot tell) follows sends, receives, acks and dead letters."""
    caps = conn.capabilities
    if not caps.stats:
        pytest.skip("stats declared unsupported: refusal checked by test_every_feature_is_allowed_or_refused")
    _unsupported(conn, "queue")

    def expect(what: str, **want: int) -> QueueStats:
        # brokers update some counts a moment after the fact (a consumer's disconnect, an ack)
        seen: list[QueueStats] = []

        def ok() -> bool:
            seen[:] = [conn.stats(dest)]
            return all(getattr(seen[0], k) in (None, v) for k, v in want.items())

        try:
            wait_until(ok, what=what)
        except AssertionError:
            raise AssertionError(f"{what}: expected {want}, the broker says {seen[0]}") from None
        return seen[0]

    first = expect("an empty queue", ready=0, delayed=0, reserved=0, dead=0, consumers=0)
    assert first.destination == dest and first.ready is not None, f"stats declared but ready unknown: {first}"
    p = conn.producer()
    for i in range(3):
        p.send(dest, i)
    expect("3 sent", ready=3, reserved=0, consumers=0, enqueued=3, dequeued=0)
    dead, attached = 0, len(conn.endpoints)  # a consumer reads from every URL of a list at once
    with conn.consumer(dest, prefetch=1) as c:
        m = _one(c)
        held = expect("1 received, not settled", reserved=1, consumers=attached)
        if held.reserved is not None:  # the broker counts what it handed out: the rest is ready
            expect("1 received, 2 left", ready=2)
        m.ack()
        expect("1 acked", reserved=0, consumers=attached)
        if caps.dead_letter:
            m = _one(c)
            m.dead_letter("stats test")
            dead = 1
            expect("1 dead-lettered", reserved=0, dead=1)
    expect("consumer closed", ready=2 - dead, reserved=0, dead=dead, consumers=0, enqueued=3, dequeued=1 + dead)
    if caps.delay:
        p.send(dest, "later", delay=30)
        expect("1 delayed", delayed=1)


# -- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "payload",
    [b"not json at all", b'{"specversion": "0.3", "id": "x", "source": "s", "type": "t"}', b"\xff\xfe\x00garbage",
     b"[" * 5000 + b"]" * 5000],
    ids=["text", "wrong-spec", "non-utf8", "deep"],
)
def test_foreign_message_is_dead_lettered_consumer_keeps_running(
    conn: mqprimer.Connection, dest: str, payload: bytes
) -> None:
    _unsupported(conn, "queue")
    _raw_publish(conn, dest, payload)
    mid = conn.producer().send(dest, "good")
    with conn.consumer(dest) as c:
        m = _one(c)
        assert m.id == mid
        m.ack()
    if conn.capabilities.dead_letter:
        dead = wait_until(lambda: conn.dead_letters(dest).list(), what="the foreign message in dead letters")
        assert len(dead) == 1 and "invalid envelope" in (dead[0].reason or "")
        assert dead[0].body == payload, "the dead letter does not hold the whole foreign payload"


def test_oversize_is_refused_before_sending(conn: mqprimer.Connection, dest: str) -> None:
    _unsupported(conn, "queue")
    limit = min(conn.capabilities.max_message_size or conn.max_message_size, conn.max_message_size)
    with pytest.raises(MessageTooLarge, match="bytes"):
        conn.producer().send(dest, "x" * (limit + 1))
    with conn.consumer(dest) as c:
        assert c.receive(timeout=0.5) is None


def test_closed_producer_and_consumer_raise(conn: mqprimer.Connection, dest: str) -> None:
    _unsupported(conn, "queue")
    p = conn.producer()
    p.close()
    with pytest.raises(StateError):
        p.send(dest, "x")
    c = conn.consumer(dest)
    c.close()
    with pytest.raises(StateError):
        c.receive(timeout=0.1)


# -- capabilities, both ways -----------------------------------------------------------------
def _unsupported(conn: mqprimer.Connection, feature: str) -> None:
    """Skip a test of ``feature`` where it is declared unsupported (the refusal is proven below)."""
    if getattr(conn.capabilities, feature) is UNSUPPORTED:
        pytest.skip(f"{feature} declared unsupported: refusal checked by test_every_feature_is_allowed_or_refused")


def test_every_feature_is_allowed_or_refused(conn: mqprimer.Connection, dest: str, topic_root: str) -> None:
    """A declared feature gets past the portable layer; an undeclared one raises and loses nothing."""
    caps = conn.capabilities
    p = conn.producer()
    target = dest if caps.queue else Topic(f"{topic_root}.allowed")
    for feature in FEATURES:
        if getattr(caps, feature) is UNSUPPORTED:
            check_refused(conn, feature, f"{dest}-{feature}", f"{topic_root}.{feature}")
            continue
        # the positive direction, cheaply (the feature's own test proves it works)
        if feature == "queue":
            conn.consumer(dest).close()
        elif feature in ("topic", "patterns"):
            conn.consumer(Topic(f"{topic_root}.*" if feature == "patterns" else topic_root)).close()
        elif feature in ("priority", "delay", "ttl"):
            option = {"priority": {"priority": 1}, "delay": {"delay": 0.05}, "ttl": {"ttl": 60.0}}[feature]
            assert p.send(target, feature, **option)  # type: ignore[arg-type]
        elif feature == "status":
            assert isinstance(conn.status("no-such-message"), Status)
        elif feature == "dead_letter" and caps.queue:
            assert isinstance(conn.dead_letters(dest).list(limit=0), list)


@pytest.mark.parametrize("feature", FEATURES)
def test_portable_layer_refuses_each_feature_a_backend_declares_unsupported(
    feature: str, dest: str, topic_root: str
) -> None:
    """On the fake backend (memory underneath) declaring only ``feature`` unsupported."""
    with fake_scheme(), mqprimer.connect(f"fake://{dest}?unsupported={feature}") as conn:
        assert getattr(conn.capabilities, feature) is UNSUPPORTED
        check_refused(conn, feature, dest, topic_root)
    with pytest.raises(mqprimer.UnknownScheme):  # the fake is gone from the registry again
        registry.get("fake")


# -- availability ---------------------------------------------------------------------------
def _free_port_url(url: str) -> str:
    """``url`` pointing at a loopback port that is free at this moment."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    u = mqprimer.URL.parse(url)
    return mqprimer.URL(u.scheme, u.username, u.password, (("127.0.0.1", port),), u.path, u.query).render(
        hide_password=False)


def test_broker_down_at_connect_is_a_clear_fast_error(mq_url: str, dest: str) -> None:
    start = time.monotonic()
    from mqprimer import registry

    if registry.get(mqprimer.URL.parse(mq_url).scheme).capabilities.brokerless:
        # no broker that could be down: connecting succeeds, and a send with no peer there
        # neither fails nor hangs (the message waits in the socket; close is bounded)
        # a port nobody holds, not unreachable_url's port 1: as root that binds, and the blocking and
        # aio twins of a parallel run bound it at once (EADDRINUSE)
        absent = _free_port_url(mq_url) if mqprimer.URL.parse(mq_url).host else mq_url.partition("?")[0] + ".absent"
        with mqprimer.connect(absent) as conn:
            assert conn.producer().send(dest, "nobody listens yet")
        assert time.monotonic() - start < 15
        return
    with pytest.raises(mqprimer.ConnectionFailed) as info:
        mqprimer.connect(unreachable_url(mq_url))
    assert time.monotonic() - start < 15
    password = mqprimer.URL.parse(mq_url).password
    if password:
        assert password not in str(info.value), "the password is in the connect error"
        assert "***" in str(info.value), "the connect error does not name the URL (password hidden)"


def test_failover_across_a_url_list(mq_url: str, conn: mqprimer.Connection, dest: str) -> None:
    _unsupported(conn, "queue")
    if conn.capabilities.brokerless:
        # no endpoint that could be down: a binding peer takes any free port (as root, port 1
        # too), a connecting one waits for its peer, so the first URL never fails over. Running
        # it only made the twin cases of a parallel run bind the same "unreachable" port.
        pytest.skip("brokerless: no endpoint that could be down (test_broker_down_at_connect_is_a_clear_fast_error)")
    with mqprimer.connect([unreachable_url(mq_url), mq_url]) as conn:
        mid = conn.producer().send(dest, "via the second URL")
        with conn.consumer(dest) as c:
            m = _one(c)
            assert m.id == mid
            m.ack()


# consumer groups (shared named subscriptions) and request/reply: their own modules, shipped with this suite
from .groups import *  # noqa: E402,F401,F403
from .rpc import *  # noqa: E402,F401,F403
