"""The reliability battery: the same faults on every backend, with figures.

In your test directory (next to the conformance suite)::

    # conftest.py
    pytest_plugins = ["mqprimer.testing.plugin"]

    @pytest.fixture
    def mq_control(mq_target):          # (id, url) of the backend under test
        return MyBrokerControl(mq_target[1])   # a mqprimer.testing.control.BrokerControl

    # test_battery.py
    from mqprimer.testing.battery import *  # noqa: F401,F403

then ``pytest --mq-battery=mybroker://127.0.0.1:1234/``. Each test injects one fault and
counts messages sent, confirmed, delivered, lost and duplicated, and the recovery time; the
figures go to ``.run/reliability.json`` (``--mq-figures``), from which
``scripts/update-reliability`` writes ``docs/reliability.md``. What a fault must not do
follows the backend's declared guarantee: an at-least-once persistent backend loses no
confirmed message when its broker is SIGKILLed; an at-least-once one loses none through a
cut or a failover; an at-most-once one may lose messages (the figures say how many) but
never duplicates them. A fault that cannot happen to a backend (no broker process, no
password in the URL, a native retry with no copy to make) is recorded as N/A with the
reason, and the test is skipped with that reason: never silently.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import ExitStack
from typing import Any

import pytest

import mqprimer
from mqprimer import ConnectionFailed
from mqprimer.backend import UNSUPPORTED

from ._battery_claims import (
    test_broker_size_limit,
    test_killed_between_copy_and_ack,
    test_native_ttl_is_told_apart_from_the_portable_check,
    test_poison_and_foreign_input,
    test_wrong_credentials,
)
from ._stream import HOLDER, WRITER, Stream, child, reap
from ._target import FAULTS, Target, _assert_guarantee, _not_secret, target
from .control import BrokerControl, ScriptedControl
from .helpers import collect, unreachable_url, wait_until
from .proxy import Proxy

__all__ = [
    "FAULTS", "BrokerControl", "ScriptedControl", "pytestmark", "target",
    "test_broker_sigkill_mid_stream", "test_consumer_process_sigkill", "test_frozen_broker",
    "test_cut_connection", "test_failover_and_consume_from_all", "test_poison_and_foreign_input",
    "test_wrong_credentials", "test_writer_sigkill_mid_transaction", "test_killed_between_copy_and_ack",
    "test_native_ttl_is_told_apart_from_the_portable_check", "test_broker_size_limit", "test_peer_absent_at_start",
]
pytestmark = pytest.mark.timeout(240)


# -- the broker dies ------------------------------------------------------------------------
@pytest.mark.disruptive  # its broker: the target's (see the plugin's marker)
def test_broker_sigkill_mid_stream(target: Target) -> None:
    """SIGKILL the broker while a producer (send() and send_many()) and a consumer run; restart it."""
    t, started = target, time.monotonic()
    if t.caps.name == "memory":
        t.figures.not_applicable(t.id, "broker down at connect", "memory:// has nothing to reach")
        t.na("broker SIGKILL mid-stream", t.control.no_broker)
    if getattr(t.caps, "brokerless", False):
        t.figures.not_applicable(t.id, "broker down at connect", f"{t.control.no_broker}: connecting needs "
                                 "no peer (see peer absent at start)")
        t.na("broker SIGKILL mid-stream", t.control.no_broker)
    if not t.control.has_broker:
        start = time.monotonic()
        with pytest.raises(ConnectionFailed) as info:
            mqprimer.connect(unreachable_url(t.url))
        t.record("broker down at connect", start, recovery_s=time.monotonic() - start)
        _not_secret(t, str(info.value))
        t.na("broker SIGKILL mid-stream", t.control.no_broker)
    stream = Stream(t.url, t.dest, 1000, hold_at=300).start()
    short = mqprimer.connect(t.url, reconnect_timeout=1.5)  # gives up soon while the broker is down
    try:
        p, c = short.producer(), short.consumer(t.dest_of(f"{t.queue}.down"))
        wait_until(lambda: len(stream.received) >= 150 or stream.errors, timeout=60, what="150 messages through")
        t.control.kill()
        stream.mark_fault()  # the producer goes on (it held at 300 at most): into the dead broker
        down = time.monotonic()
        with pytest.raises(ConnectionFailed) as info:  # the broker is down: a clear, fast error
            mqprimer.connect(t.url)
        down_s = time.monotonic() - down
        _not_secret(t, str(info.value))
        with pytest.raises(ConnectionFailed):  # an open connection gives up after its reconnect_timeout
            p.send(t.dest_of(f"{t.queue}.down"), "while down")
        with pytest.raises(ConnectionFailed):
            while time.monotonic() - down < 30:
                c.receive(timeout=0.5)
        gave_up = time.monotonic() - down
        t.figures.record(t.id, "broker down at connect", guarantee=t.caps.guarantee, recovery_s=down_s,
                         wall_s=gave_up, note=f"connect() failed after {down_s:.1f}s; an open connection's send "
                         f"and receive gave up after {gave_up:.1f}s (reconnect_timeout=1.5)")
        assert down_s < 15 and gave_up < 20, f"a dead broker took {down_s:.1f}s / {gave_up:.1f}s to surface"
        t.control.start()
        stream.finish(timeout=150, expect_all=t.at_least_once, drained=lambda: _drained(t))
    finally:
        short.close()
        stream.stop()
        t.control.start()
    assert not stream.errors, stream.errors
    fig = stream.figures()
    assert stream.single_after_fault and stream.batch_after_fault, "both send paths must cross the restart"
    t.record("broker SIGKILL mid-stream", started, **fig, note=_lost_report(t, stream))
    _assert_guarantee(t, fig, broker_died=True, stream=stream)


def _drained(t: Target) -> bool:
    """The broker holds nothing more for the battery's queue: no message ready, delayed or
    delivered and unsettled (False where the backend has no queue stats, or cannot say)."""
    if not t.caps.queue or t.caps.stats is UNSUPPORTED:
        return False
    try:
        with mqprimer.connect(t.url) as conn:
            st = conn.stats(t.queue)
    except Exception:  # cannot tell: the stream waits for its messages as long as it would without
        return False
    return st.ready == 0 and st.delayed in (0, None) and st.reserved == 0


def _lost_report(t: Target, stream: Stream) -> str:
    """Where the lost messages are, as far as the backend can tell: enough to tell a
    broker that dropped a confirmed message from one that still holds it somewhere."""
    lost = sorted(set(stream.confirmed) - set(stream.received), key=lambda m: stream.confirmed_at[m])
    if not lost:
        return ""
    calls = {m: len(ids) for _, _, ids in stream.calls for m in ids}
    out = []
    with mqprimer.connect(t.url) as conn:
        for mid in lost[:10]:
            try:
                where = str(conn.status(mid).value)
            except Exception as exc:  # status may be unsupported: the rest still helps
                where = type(exc).__name__
            at = stream.confirmed_at[mid] - (stream.fault_at or 0.0)
            out.append(f"{mid} (status {where}, confirmed {at:+.1f}s from the kill, a call of {calls.get(mid)})")
    return f"lost: {'; '.join(out)}"


def test_writer_sigkill_mid_transaction(target: Target) -> None:
    """Where the storage is a file every process writes (sqlite), SIGKILL a writer mid-stream."""
    t, started, fault = target, time.monotonic(), "writer SIGKILL mid-transaction"
    t.only_for_lists(fault)
    if t.control.has_broker:
        t.na(fault, "the broker does the writing: see broker SIGKILL mid-stream")
    if not t.caps.persistent:
        t.na(fault, f"{t.caps.name} keeps nothing outside the process")
    proc = child(WRITER, t.url, t.queue)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        while len(lines) < 400:
            line = proc.stdout.readline()
            assert line, f"the writer died early: {proc.stderr.read() if proc.stderr else ''}"
            lines.append(line)
        proc.kill()
        proc.wait(10)
        lines += proc.stdout.readlines()
    finally:
        reap(proc)
    confirmed = [x.strip() for x in lines if x.endswith("\n") and x.strip()]
    with mqprimer.connect(t.url) as conn, conn.consumer(t.queue, prefetch=100) as c:
        got = [m.id for m in collect(c, len(set(confirmed)), timeout=60)]
        while (m := c.receive(timeout=0.5)) is not None:  # the batch cut by the kill, if it committed
            got.append(m.id)
            m.ack()
        dead = conn.dead_letters(t.queue).list()
    path = mqprimer.URL.parse(t.url).path
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    fig = {"sent": len(got), "confirmed": len(confirmed), "delivered": len(set(got)),
           "lost": len(set(confirmed) - set(got)), "duplicated": len(got) - len(set(got))}
    t.record(fault, started, **fig)
    assert dead == [], "a half-written message was delivered and dead-lettered"
    assert fig["lost"] == 0 and fig["duplicated"] == 0, fig


def test_consumer_process_sigkill(target: Target) -> None:
    """A consumer process holding unacked messages is SIGKILLed: every one comes back."""
    t, started, fault = target, time.monotonic(), "consumer SIGKILL"
    t.only_for_lists(fault)
    if t.caps.name == "memory":
        t.na(fault, "memory:// messages live in the consumer's own process: they die with it")
    if not t.caps.queue:
        t.na(fault, f"{t.caps.name} has topics only: a subscriber that dies is not redelivered to (at-most-once)")
    with mqprimer.connect(t.url) as conn:
        sent = set(conn.producer().send_many([(t.queue, {"i": i}) for i in range(20)]))
        proc = child(HOLDER, t.url, t.queue, "20")
        try:
            assert proc.stdout is not None
            held = set(proc.stdout.readline().split())
            assert held == sent, f"the holder did not get every message: {proc.stderr.read() if proc.stderr else ''}"
            if not t.at_least_once:  # (a brokerless consumer may hold the address: it goes first)
                proc.kill()
                proc.wait(10)
            with conn.consumer(t.queue, prefetch=50) as c:
                lease = c.delivery_lease
                assert c.receive(timeout=0.5) is None, "a held message went to another consumer"
                proc.kill()
                proc.wait(10)
                killed = time.monotonic()
                if t.at_least_once:
                    got = collect(c, 20, timeout=(lease or 0) + 30)
                else:
                    got = []
                recovery = time.monotonic() - killed
                while (m := c.receive(timeout=0.3 if t.at_least_once else 3)) is not None:
                    got.append(m)
                    m.ack()
        finally:
            reap(proc)
    ids = [m.id for m in got]
    fig = {"sent": 20, "confirmed": 20, "delivered": len(set(ids)), "lost": len(sent - set(ids)),
           "duplicated": len(ids) - len(set(ids)), "recovery_s": recovery}
    t.record(fault, started, **fig, note="" if t.at_least_once else "at-most-once: what the killed process had read "
             "is gone with it (measured)")
    assert fig["duplicated"] == 0, fig
    if not t.at_least_once:
        return  # at-most-once: what the dead process held may be gone (the figures say how much)
    assert set(ids) == sent, fig
    if lease is not None and lease > 10:
        assert recovery < lease, "the messages came back only when their lease ran out, not when the process died"


# -- the broker hangs, the network fails --------------------------------------------------------
@pytest.mark.disruptive  # its broker: the target's (see the plugin's marker)
def test_frozen_broker(target: Target) -> None:
    """SIGSTOP the broker: send and receive fail with ConnectionFailed within the backend's bound;
    after SIGCONT the same connection works again."""
    t, started, fault = target, time.monotonic(), "frozen broker"
    t.only_for_lists(fault)
    if not t.control.has_broker:
        t.na(fault, t.control.no_broker)
    fast = t.control.with_params(**t.control.fast_failure) if t.control.fast_failure else t.url
    limit = t.control.frozen_limit
    outcome: dict[str, Any] = {}
    with mqprimer.connect(fast, reconnect_timeout=3) as conn:
        p = conn.producer()
        c = conn.consumer(t.dest)
        p.send(t.dest, "before")
        assert [m.body for m in collect(c, 1)] == ["before"]

        def attempt(name: str, fn: Any) -> None:
            start = time.monotonic()
            try:
                fn()
                outcome[name] = ("no error", time.monotonic() - start)
            except BaseException as exc:
                outcome[name] = (exc, time.monotonic() - start)

        def receive_until_error() -> None:
            while time.monotonic() - started < limit + 30:
                c.receive(timeout=1)

        threads = [threading.Thread(target=attempt, args=("send", lambda: p.send(t.dest, "during")), daemon=True),
                   threading.Thread(target=attempt, args=("receive", receive_until_error), daemon=True)]
        t.control.freeze()
        try:
            for th in threads:
                th.start()
            for th in threads:
                th.join(limit + 10)
        finally:
            t.control.thaw()
        thawed = time.monotonic()
        for th in threads:
            th.join(30)
        c.close()
        with conn.consumer(t.dest) as c2:
            mid = wait_until(lambda: _try_send(p, t.dest, "after"), timeout=30, what="a send after the thaw")
            assert mid is not None
            got = {m.id: m.body for m in collect(c2, 1, timeout=30)}
            recovery = time.monotonic() - thawed
            while (m := c2.receive(timeout=0.5)) is not None:  # "during" may have been stored
                got[m.id] = m.body
                m.ack()
    took = {name: outcome.get(name, ("still blocked", float("inf")))[1] for name in ("send", "receive")}
    note = "; ".join(f"{n}: {_kind(outcome.get(n, ('still blocked', 0))[0])} after {took[n]:.1f}s" for n in took)
    note += f" (bound {limit:.0f}s)"
    t.record(fault, started, sent=2, confirmed=1, delivered=1 + (mid in got), recovery_s=recovery, note=note)
    for name in ("send", "receive"):
        err = outcome.get(name, ("still blocked", 0.0))[0]
        assert isinstance(err, ConnectionFailed), f"{name} on a frozen broker: {err!r} after {took[name]:.1f}s"
        assert took[name] < limit, f"{name} took {took[name]:.1f}s to fail on a frozen broker (bound {limit:.0f}s)"
        _not_secret(t, str(err))
    assert got.get(mid) == "after" and set(got.values()) <= {"after", "during"}


def _kind(outcome: object) -> str:
    return type(outcome).__name__ if isinstance(outcome, BaseException) else str(outcome)


def _try_send(p: mqprimer.Producer, queue: "str | mqprimer.Topic", body: str) -> str | None:
    try:
        return p.send(queue, body)
    except ConnectionFailed:
        return None


def test_cut_connection(target: Target) -> None:
    """Every connection is cut (through a TCP proxy) mid-stream: both sides reconnect."""
    t, started, fault = target, time.monotonic(), "cut connection"
    t.only_for_lists(fault)
    if not t.control.has_broker:
        t.na(fault, t.control.no_broker)
    with ExitStack() as stack:
        proxies = t.control.proxies(stack)
        # hold_at: a producer that had sent all 800 before the cut (a consumer lagging on a busy
        # machine) would not reconnect, and the cut would not be mid-stream
        stream = Stream(t.control.via(proxies), t.dest, 800, hold_at=300).start()
        try:
            wait_until(lambda: len(stream.received) >= 150 or stream.errors, timeout=60, what="150 messages")
            before = sum(p.accepted for p in proxies)
            stream.mark_fault()
            for proxy in proxies:
                proxy.cut()
            stream.finish(timeout=90, expect_all=t.at_least_once)
        finally:
            stream.stop()
        reconnects = sum(p.accepted for p in proxies) - before
    assert not stream.errors, stream.errors
    fig = stream.figures()
    t.record(fault, started, **fig, note=f"{reconnects} reconnects through the proxy after the cut")
    assert reconnects >= 2, "the producer and the consumer did not both reconnect after the cut"
    _assert_guarantee(t, fig, broker_died=False, stream=stream)


def test_failover_and_consume_from_all(target: Target) -> None:
    """Two endpoints (a host list, or the same broker behind two proxies): the first one goes
    down mid-stream; the producer fails over, the consumer keeps consuming from the other."""
    t, started, fault = target, time.monotonic(), "failover, consume from all"
    if not t.control.has_broker:
        t.na(fault, t.control.no_broker)
    with ExitStack() as stack:
        hosts = t.control.network_hosts()
        if len(hosts) > 1:
            proxies = t.control.proxies(stack)
            urls: list[str] = [t.control.via(proxies)]
            singles = [t.control.via([p]) for p in proxies]
        else:
            proxies = [stack.enter_context(Proxy(hosts[0])) for _ in range(2)]
            urls = singles = [t.control.via([p]) for p in proxies]
        sent: set[str] = set()
        with mqprimer.connect(urls) as conn, conn.consumer(t.dest, prefetch=20) as c:
            for one in singles:  # consume from all: messages put on each endpoint alone
                with mqprimer.connect(one) as single:
                    sent |= set(single.producer().send_many([(t.dest, {"via": one[-5:], "i": i}) for i in range(10)]))
            # a topic on one broker reached through two endpoints: two subscriptions, each gets all
            twice = not t.caps.queue and len(hosts) == 1
            assert {m.id for m in collect(c, len(sent) * (1 + twice), timeout=30)} == sent
        # (topic on one broker: the stream's consumer listens on the second endpoint alone)
        stream = Stream(urls, t.dest, 800, reconnect_timeout=30, consumer_urls=singles[1] if twice else None,
                        hold_at=300).start()  # >= 500 left to send after the fault, however fast the backend
        try:
            wait_until(lambda: len(stream.received) >= 150 or stream.errors, timeout=60, what="150 messages")
            stream.mark_fault()
            proxies[0].refuse()
            first_before = proxies[0].relayed
            at = len(stream.confirmed), len(stream.received)
            wait_until(lambda: len(stream.confirmed) >= at[0] + 200 or stream.errors, timeout=60,
                       what="sends failing over to the second endpoint")
            wait_until(lambda: len(stream.received) >= at[1] + 200 or stream.errors, timeout=60,
                       what="consuming from the second endpoint alone")
            first_after = proxies[0].relayed - first_before  # while down: must be nothing
            proxies[0].restore()
            stream.finish(timeout=90, expect_all=t.at_least_once)
        finally:
            stream.stop()
    assert not stream.errors, stream.errors
    fig = stream.figures()
    t.record(fault, started, **fig, note="200 sent and 200 received through the second endpoint alone")
    assert first_after == 0, f"the endpoint that was down passed {first_after} bytes: the fault was not injected"
    _assert_guarantee(t, fig, broker_died=False, stream=stream)


def test_peer_absent_at_start(target: Target) -> None:
    """Brokerless: the producer sends (send() and send_many()) before any consumer exists;
    one starts later and gets what the backend documents (zeromq: every message)."""
    t, started, fault = target, time.monotonic(), "peer absent at start"
    if not getattr(t.caps, "brokerless", False):
        t.na(fault, "a broker holds the messages until a consumer comes: see broker down at connect")
    with mqprimer.connect(t.url) as conn:
        p = conn.producer()
        sent = [p.send(t.dest, {"i": i}) for i in range(25)]
        sent += p.send_many([(t.dest, {"i": 25 + i}) for i in range(25)])
        with mqprimer.connect(t.url) as later, later.consumer(t.dest, prefetch=50) as c:
            came = last = time.monotonic()
            got: list[str] = []
            while (m := c.receive(timeout=3)) is not None:
                got.append(m.id)
                last = time.monotonic()
                m.ack()
            recovery = last - came
    fig = {"sent": 50, "confirmed": 50, "delivered": len(set(got)), "lost": len(set(sent) - set(got)),
           "duplicated": len(got) - len(set(got)), "recovery_s": recovery}
    t.record(fault, started, **fig, note="50 sent before any consumer existed")
    assert fig["lost"] == 0 and fig["duplicated"] == 0, fig
