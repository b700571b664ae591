"""xmpp:// on a real Prosody (scripts/brokers.d/prosody.sh): the topic-only semantics the
conformance suite cannot exercise with queues, failures (wrong password, server down, a
silent server, SIGKILL and restart, a cut connection), foreign items and log hygiene.
What is promised is in docs/backend-xmpp.md."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

import mqprimer
from conftest import ROOT, need_broker
from mqprimer import Topic, UnsupportedError
from mqprimer.testing.helpers import collect, wait_until
from mqprimer.testing.proxy import Proxy

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def url() -> str:
    return need_broker("xmpp")


@pytest.fixture
def topic() -> Topic:
    return Topic(f"x{uuid.uuid4().hex[:10]}.events")


def _with(url: str, **params: str) -> str:
    return mqprimer.URL.parse(url).with_query(**params).render(hide_password=False)


def _brokers(action: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "brokers"), action, "prosody"], check=True, timeout=60,
                   capture_output=True)


def _xmpp_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mqprimer-xmpp"]


def raw_publish(url: str, node: str, item_xml: str) -> None:
    """Publish one item with plain slixmpp (not mqprimer's envelope), as another client would."""
    from slixmpp import ClientXMPP
    from slixmpp.xmlstream import ET

    u = mqprimer.URL.parse(url)

    async def run() -> None:
        xmpp = ClientXMPP(f"{u.username}@localhost/raw", u.password or "")
        xmpp.enable_direct_tls = xmpp.enable_starttls = False
        xmpp.enable_plaintext = True
        xmpp.plugin["feature_mechanisms"].unencrypted_scram = True
        xmpp.register_plugin("xep_0060")
        started = asyncio.get_running_loop().create_future()
        xmpp.add_event_handler("session_start", lambda _: started.set_result(None))
        xmpp.connect(u.host, u.port)
        await asyncio.wait_for(started, 10)
        pubsub = xmpp.plugin["xep_0060"]
        await pubsub.publish(  # type: ignore[no-untyped-call]
            u.path.strip("/"), node, id="foreign-1", payload=ET.fromstring(item_xml))
        await xmpp.disconnect()

    asyncio.run(run())


# -- the topic model -------------------------------------------------------------------
def test_queues_and_patterns_are_refused_with_the_reason(url: str) -> None:
    with mqprimer.connect(url) as conn:
        caps = conn.capabilities
        assert (caps.queue, caps.patterns, caps.guarantee) == (mqprimer.backend.UNSUPPORTED,) * 2 + ("at-most-once",)
        with pytest.raises(UnsupportedError, match="queues"):
            conn.producer().send("work", {})
        with pytest.raises(UnsupportedError, match="queues"):
            conn.consumer("work")
        with pytest.raises(UnsupportedError, match="pattern"):
            conn.consumer(Topic("a.*"))


def test_round_trip_bytes_headers_send_many_and_retry(url: str, topic: Topic) -> None:
    other = Topic(f"{topic.name}.b")
    with mqprimer.connect(url) as conn, conn.consumer(topic) as c, conn.consumer(other) as c2:
        p = conn.producer()
        body = {"text": "naïve ☃ \u0000 \ufffe <&> end"}
        mid = p.send(topic, body, headers={"ключ": "значение"}, type="t.x")
        raw = bytes(range(256))
        bid = p.send(topic, raw)
        m = collect(c, 1)[0]
        assert (m.id, m.body, m.headers, m.type, m.attempt) == (mid, body, {"ключ": "значение"}, "t.x", 1)
        m2 = c.receive(timeout=5)
        assert m2 is not None and (m2.id, m2.body) == (bid, raw)
        m2.retry()  # redelivered by the subscription, attempt + 1
        again: mqprimer.Message | None = c.receive(timeout=5)
        assert again is not None and (again.id, again.attempt, again.body) == (bid, 2, raw)
        again.ack()
        with pytest.raises(mqprimer.StateError):
            again.ack()
        items = [p.build(other if i % 7 == 0 else topic, {"i": i}) for i in range(300)]
        ids = p.send_many(items)
        assert ids == [it.message_id for it in items]
        want = [it.message_id for it in items if it.destination == topic]
        want_other = [it.message_id for it in items if it.destination == other]
        assert [x.id for x in collect(c, len(want))] == want
        assert [x.id for x in collect(c2, len(want_other))] == want_other
        assert c.receive(timeout=0.3) is None and c2.receive(timeout=0.1) is None


def test_oversize_is_refused_before_sending(url: str, topic: Topic) -> None:
    with mqprimer.connect(url) as conn, conn.consumer(topic) as c:
        with pytest.raises(mqprimer.MessageTooLarge, match="bytes"):
            conn.producer().send(topic, "x" * 180_001)
        with pytest.raises(mqprimer.MessageTooLarge, match="stanza"):
            conn.producer().send(topic, "&" * 60_000)  # 5x as XML text: over Prosody's stanza limit
        ok = conn.producer().send(topic, "<" * 40_000)
        m = c.receive(timeout=5)
        assert m is not None and m.id == ok and m.body == "<" * 40_000


def test_dead_letters_list_replay_purge_and_foreign_items(url: str, topic: Topic) -> None:
    with mqprimer.connect(url) as conn, conn.consumer(topic) as c:
        p = conn.producer()
        mid = p.send(topic, {"bad": True})
        collect(c, 1, ack=False)[0].dead_letter("bad image")
        foreign = "<entry xmlns='http://www.w3.org/2005/Atom'><title>not ours</title></entry>"
        raw_publish(url, topic.name, foreign)
        good = p.send(topic, "good")
        m = c.receive(timeout=5)  # the foreign item is dead-lettered on the way; the consumer goes on
        assert m is not None and m.id == good
        m.ack()
        dead = conn.dead_letters(topic.name)
        wait_until(lambda: len(dead.list()) == 2, what="two dead letters")
        listed = dead.list()
        bad = [e for e in listed if e.id == mid][0]
        assert (bad.reason, bad.origin) == ("bad image", topic.name)
        inv = [e for e in listed if e.type == "mqprimer.invalid"][0]
        assert "invalid envelope" in (inv.reason or "") and inv.body == foreign.replace("'", '"').encode()
        assert dead.replay(ids={mid}) == 1
        m = c.receive(timeout=5)
        assert m is not None and (m.id, m.attempt, m.body) == (mid, 1, {"bad": True})
        m.ack()
        assert [e.type for e in dead.list()] == ["mqprimer.invalid"]
        assert dead.purge() == 1 and dead.list() == []


# -- connecting --------------------------------------------------------------------------
def test_wrong_password_is_an_authentication_error_fast_without_retries(url: str) -> None:
    u = mqprimer.URL.parse(url)
    bad = mqprimer.URL(u.scheme, u.username, "not-the-password", u.hosts, u.path, u.query).render(hide_password=False)
    start = time.monotonic()
    with pytest.raises(mqprimer.AuthenticationError, match="credentials") as info:
        mqprimer.connect(bad)
    assert time.monotonic() - start < 3
    assert "not-the-password" not in str(info.value)
    # nothing keeps trying in the background: slixmpp's loop thread is gone
    wait_until(lambda: not _xmpp_threads(), timeout=3, what="no xmpp thread left after the refusal")


def test_server_down_and_silent_server_fail_within_the_timeout(url: str) -> None:
    down = mqprimer.URL.parse(url)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    closed = mqprimer.URL(down.scheme, down.username, down.password, (("127.0.0.1", port),), down.path, down.query)
    start = time.monotonic()
    with pytest.raises(mqprimer.ConnectionFailed):
        mqprimer.connect(closed.render(hide_password=False))
    assert time.monotonic() - start < 3
    # a server that accepts and never answers (what a TLS/plaintext mismatch looks like)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        quiet = mqprimer.URL(down.scheme, down.username, down.password, (("127.0.0.1", silent.getsockname()[1]),),
                             down.path, down.query).with_query(timeout="1")
        start = time.monotonic()
        with pytest.raises(mqprimer.ConnectionFailed, match="within 1s"):
            mqprimer.connect(quiet.render(hide_password=False))
        assert time.monotonic() - start < 4
    wait_until(lambda: not _xmpp_threads(), timeout=3, what="no xmpp thread left")


def test_starttls_is_verified_and_plaintext_needs_loopback() -> None:
    url = need_broker("xmpps")
    with mqprimer.connect(url) as conn:
        t = Topic(f"x{uuid.uuid4().hex[:10]}")
        with conn.consumer(t) as c:
            mid = conn.producer().send(t, "over TLS")
            m = c.receive(timeout=5)
            assert m is not None and m.id == mid
    # the harness CA is required: without it, the server's certificate is refused
    u = mqprimer.URL.parse(url)
    query = tuple(q for q in u.query if q[0] != "cafile")
    no_ca = mqprimer.URL(u.scheme, u.username, u.password, u.hosts, u.path, query)
    with pytest.raises(mqprimer.ConnectionFailed):
        mqprimer.connect(no_ca.render(hide_password=False))
    with pytest.raises(mqprimer.ConfigurationError, match="loopback"):
        mqprimer.connect("xmpp://u:p@192.0.2.1:5222/pubsub.example?tls=none")


def test_no_password_or_body_in_logs_at_any_level(url: str, topic: Topic, caplog: pytest.LogCaptureFixture) -> None:
    password = mqprimer.URL.parse(url).password or ""
    secret_body = "BODY-MARKER-7f3a"
    caplog.set_level(logging.DEBUG)
    # in-process CLI tests leave `mqprimer`'s quieting of client libraries on this logger
    caplog.set_level(logging.DEBUG, logger="slixmpp")
    with mqprimer.connect(url) as conn, conn.consumer(topic) as c:
        conn.producer().send(topic, {"s": secret_body})
        m = c.receive(timeout=5)
        assert m is not None
        m.ack()
    tls = need_broker("xmpps")
    with mqprimer.connect(tls) as conn:
        conn.producer().send(topic, {"s": secret_body})
    u = mqprimer.URL.parse(url)
    with pytest.raises(mqprimer.AuthenticationError):
        mqprimer.connect(mqprimer.URL(u.scheme, u.username, password + "x", u.hosts, u.path, u.query)
                         .render(hide_password=False))
    assert any(r.name.startswith("slixmpp") for r in caplog.records), "slixmpp's logs were not captured"
    forms = [password, base64.b64encode(f"\0{u.username}\0{password}".encode()).decode(), secret_body]
    for r in caplog.records:
        text = r.getMessage()
        for f in forms:
            assert f not in text, f"{r.name} logged a secret at {r.levelname}"


# -- faults: a named subscription on a persisted node catches up -------------------------------
@pytest.fixture
def prosody_restored() -> Iterator[None]:
    yield
    _brokers("up")


def _drain_until(c: mqprimer.Consumer, want: set[str], timeout: float) -> set[str]:
    got: set[str] = set()
    deadline = time.monotonic() + timeout
    while not want <= got and time.monotonic() < deadline:
        try:
            m = c.receive(timeout=0.5)
        except mqprimer.ConnectionFailed:
            continue
        if m is not None:
            got.add(m.id)
            try:
                m.ack()
            except mqprimer.ConnectionFailed:
                pass  # arrived just before the loss: catch-up delivers it again
    return got


@pytest.mark.timeout(120)
def test_sigkill_and_restart_every_confirmed_item_reaches_a_named_subscription(
    url: str, topic: Topic, prosody_restored: None
) -> None:
    with mqprimer.connect(url, reconnect_timeout=60) as conn, \
            conn.consumer(topic, subscription="billing") as c:
        p = conn.producer()
        before = {p.send(topic, i) for i in range(20)}
        assert _drain_until(c, before, 10) >= before
        _brokers("kill")
        _brokers("up")
        after = {p.send(topic, i) for i in range(30)}  # confirmed after the restart, maybe before c is back
        got = _drain_until(c, after, 60)
        assert after <= got, f"{len(after - got)} confirmed items never arrived"


def test_cut_connection_named_subscription_catches_up(url: str, topic: Topic) -> None:
    u = mqprimer.URL.parse(url)
    with Proxy((u.host or "127.0.0.1", u.port or 5222)) as proxy, mqprimer.connect(url) as direct:
        via = mqprimer.URL(u.scheme, u.username, u.password, (("127.0.0.1", proxy.port),), u.path, u.query)
        with mqprimer.connect(via.render(hide_password=False)) as conn, \
                conn.consumer(topic, subscription="audit") as c:
            p = direct.producer()
            first = {p.send(topic, i) for i in range(10)}
            assert _drain_until(c, first, 10) >= first
            accepted = proxy.accepted
            proxy.cut()
            during = {p.send(topic, i) for i in range(20)}  # the consumer's stream is gone meanwhile
            got = _drain_until(c, during, 30)
            assert during <= got, f"{len(during - got)} items published during the cut never arrived"
            assert proxy.accepted > accepted, "the consumer did not reconnect through the proxy"


_SHUTDOWN = """
import sys, mqprimer
from mqprimer import Topic
conn = mqprimer.connect(sys.argv[1])
c = conn.consumer(Topic(sys.argv[2]), subscription="noise")
conn.producer().send(Topic(sys.argv[2]), 1)
assert c.receive(timeout=5) is not None
if sys.argv[3] == "close":
    c.close()
    conn.close()
print("ok")
"""


@pytest.mark.parametrize("how", ["close", "exit without closing"])
def test_shutdown_is_quiet(url: str, topic: Topic, how: str) -> None:
    r = subprocess.run([sys.executable, "-W", "default", "-c", _SHUTDOWN, url, topic.name, how.split()[0]],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    for noise in ("Event loop is closed", "Task was destroyed", "Traceback", "never awaited", "unclosed"):
        assert noise not in r.stderr, r.stderr[-2000:]


_TAKEOVER = """
import sys, mqprimer
from mqprimer import Topic
with mqprimer.connect(sys.argv[1]) as conn, conn.consumer(Topic(sys.argv[2]), subscription="takeover") as c:
    print("ready", flush=True)
    for _ in range(5):
        m = c.receive(timeout=10)
        m.ack()
    print("done", flush=True)
    sys.stdin.read()  # until SIGKILLed
"""


def test_a_named_subscription_outlives_its_consumer_process(url: str, topic: Topic) -> None:
    """The cursor is in the account's private storage: after a SIGKILLed consumer, another
    process taking the name over gets every item published meanwhile (and maybe repeats)."""
    child = subprocess.Popen([sys.executable, "-c", _TAKEOVER, url, topic.name], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with mqprimer.connect(url) as conn:
            p = conn.producer()
            first = {p.send(topic, i) for i in range(5)}
            assert child.stdout.readline().strip() == "done"
            child.kill()
            child.wait(10)
            during = {p.send(topic, i) for i in range(10)}  # nobody subscribed under the name now
            with conn.consumer(topic, subscription="takeover") as c:
                got = _drain_until(c, during, 15)
        assert during <= got, f"{len(during - got)} items published while the name had no consumer were lost"
        assert got <= first | during
    finally:
        child.kill()
        child.wait(10)


def test_an_account_that_may_not_create_nodes_gets_an_error_naming_the_right(url: str, topic: Topic) -> None:
    u = mqprimer.URL.parse(url)
    limited = mqprimer.URL(u.scheme, "limited", "limited-secret", u.hosts, u.path, u.query).render(hide_password=False)
    with mqprimer.connect(limited) as conn:
        for attempt in (lambda: conn.producer().send(topic, 1), lambda: conn.consumer(topic)):
            with pytest.raises(mqprimer.AuthenticationError, match="may not create pubsub node") as info:
                attempt()
            assert "admins" in str(info.value) and "limited@localhost" in str(info.value)
    with mqprimer.connect(url) as admin, admin.consumer(topic):  # the node exists now
        with mqprimer.connect(limited) as conn, conn.consumer(topic) as c:
            mid = admin.producer().send(topic, "to everyone")
            m = c.receive(timeout=5)
            assert m is not None and m.id == mid


def test_the_analytics_example_runs_on_xmpp(url: str) -> None:
    """examples/analytics on a topic-only backend: one worker on a named subscription made
    before sending catches up on every line; the totals are checked by the example itself."""
    r = subprocess.run([sys.executable, "-m", "examples.analytics", "--url", url, "--lines", "200"],
                       capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "counted 200 requests" in r.stdout and "dead letters: 1" in r.stdout


@pytest.mark.timeout(60)
def test_send_many_cut_mid_batch_returns_and_every_item_arrives(url: str, topic: Topic) -> None:
    """A batch whose stream is cut mid-way: every publish in flight fails, the portable layer
    reconnects and sends the batch again (same item ids); nothing hangs, nothing is lost."""
    u = mqprimer.URL.parse(url)
    with Proxy((u.host or "127.0.0.1", u.port or 5222)) as proxy, mqprimer.connect(url) as direct, \
            direct.consumer(topic, prefetch=100) as c:
        via = mqprimer.URL(u.scheme, u.username, u.password, (("127.0.0.1", proxy.port),), u.path, u.query)
        with mqprimer.connect(via.render(hide_password=False)) as conn:
            p = conn.producer()
            items = [p.build(topic, {"i": i}) for i in range(1500)]
            cutter = threading.Timer(0.1, proxy.cut)
            cutter.start()
            try:
                ids = set(p.send_many(items))
            finally:
                cutter.cancel()
        assert proxy.accepted >= 2, "the cut did not happen during the batch"
        assert ids <= _drain_until(c, ids, 30)
