"""Conformance tests of request/reply (docs/request-reply.md), part of the shipped suite.

A backend that declares ``request_reply`` must pass them; one that declares it
unsupported is proven to refuse it by the refusal checks (:mod:`.refusals`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import mqprimer
from mqprimer import RemoteError, StateError, Timeout, UnsupportedError
from mqprimer.backend import UNSUPPORTED
from mqprimer.envelope import encode, make

from .helpers import wait_until
from .leftovers import reply_paths_left

Handler = Callable[[mqprimer.Message], None]


def _needs_rpc(conn: mqprimer.Connection) -> None:
    caps = conn.capabilities
    if caps.request_reply is UNSUPPORTED:
        pytest.skip(f"{caps.name} declares request_reply unsupported "
                    "(refused: test_every_feature_is_allowed_or_refused)")


@contextmanager
def _serving(url: str, dest: str, handler: Handler, threads: int = 1) -> Iterator[None]:
    """``threads`` services answering requests on ``dest`` with ``handler`` (which replies and settles)."""
    stop = threading.Event()
    ready = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with mqprimer.connect(url) as conn, conn.consumer(dest, prefetch=4) as c:
                ready.wait(30)
                while not stop.is_set():
                    m = c.receive(timeout=0.1)
                    if m is not None:
                        handler(m)
        except BaseException as exc:  # pragma: no cover - reported by the test
            errors.append(exc)

    pool = [threading.Thread(target=serve, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    ready.wait(30)
    try:
        yield
    finally:
        stop.set()
        for t in pool:
            t.join(10)
        assert not errors, f"a service failed: {errors[0]!r}"


def _raw_reply(conn: mqprimer.Connection, address: str, payload: bytes) -> None:
    """A hand-written service's reply to ``address``, sent with the driver's send_reply."""
    try:
        conn.endpoints[0].call("raw reply", lambda b: b.send_reply(address, payload, message_id="late-reply", ttl=None))
    except UnsupportedError:  # gearman: a foreground job's only reply is its WORK_COMPLETE, from its worker
        pass


def _echo(m: mqprimer.Message) -> None:
    m.reply({"echo": m.body, "headers": m.headers, "type": m.type}, headers={"served": "yes"}, type="test.answer")
    m.ack()


def test_request_round_trip_with_headers_and_bytes(mq_url: str, conn: mqprimer.Connection, dest: str) -> None:
    _needs_rpc(conn)
    seen: list[mqprimer.Message] = []

    def handler(m: mqprimer.Message) -> None:
        seen.append(m)
        if isinstance(m.body, bytes):
            m.reply(m.body[::-1])
            m.ack()
        else:
            _echo(m)

    with _serving(mq_url, dest, handler):
        reply = conn.request(dest, {"n": 1}, timeout=10, headers={"tenant": "acme"}, type="test.ask")
        assert reply.body == {"echo": {"n": 1}, "headers": {"tenant": "acme"}, "type": "test.ask"}
        assert reply.headers == {"served": "yes"} and reply.type == "test.answer"
        assert reply.correlation_id == seen[0].id and seen[0].reply_to
        assert reply.settled
        with pytest.raises(StateError):
            reply.ack()  # a reply is settled when it is read
        raw = bytes(range(256)) + b"\xff\xfe"
        assert conn.request(dest, raw, timeout=10).body == raw[::-1]


def test_concurrent_requests_from_threads_each_get_their_own_reply(
    mq_url: str, conn: mqprimer.Connection, dest: str
) -> None:
    _needs_rpc(conn)
    results: dict[tuple[int, int], Any] = {}
    errors: list[BaseException] = []

    def caller(t: int) -> None:
        try:
            for i in range(10):
                results[(t, i)] = conn.request(dest, [t, i], timeout=20).body["echo"]
        except BaseException as exc:
            errors.append(exc)

    with _serving(mq_url, dest, _echo, threads=2):
        callers = [threading.Thread(target=caller, args=(t,)) for t in range(6)]
        for th in callers:
            th.start()
        for th in callers:
            th.join(60)
    assert not errors, repr(errors[0])
    assert results == {(t, i): [t, i] for t in range(6) for i in range(10)}
    assert conn.dropped_replies == {"duplicate": 0, "late": 0, "invalid": 0}


def test_timeout_raises_and_a_late_reply_is_dropped(mq_url: str, conn: mqprimer.Connection, dest: str) -> None:
    _needs_rpc(conn)
    held: list[mqprimer.Message] = []
    with _serving(mq_url, dest, held.append):
        start = time.monotonic()
        with pytest.raises(Timeout):
            conn.request(dest, "slow", timeout=0.5)
        assert 0.45 <= time.monotonic() - start < 5
        wait_until(lambda: held, what="the request to reach the service")
        req = held[0]
        req.reply("too late")  # expires with its request where the broker expires messages
        req.ack()
        # and one that does not expire (a hand-written service's), which reaches the caller
        late = encode(make(id="late-reply", source="urn:test", type="t", body="too late", correlation_id=req.id))
        address = req.reply_to
        assert address is not None
        _raw_reply(conn, address, late)
    # the late reply must not be taken for the next request's
    with _serving(mq_url, dest, _echo):
        assert _request_again(conn, dest, "next").body["echo"] == "next"
    wait_until(lambda: conn.dropped_replies["late"] >= 1, what="the late reply to be counted as dropped")
    assert conn.dropped_replies["duplicate"] == 0


def _request_again(conn: mqprimer.Connection, dest: str, body: Any) -> mqprimer.Message:
    """A request to a service that has just started. At-most-once (zeromq): a request sent
    while the previous service's listener was still closing is lost, as the backend documents,
    and its caller asks again; at-least-once: one request, which must be answered."""
    tries = 3 if conn.capabilities.guarantee == "at-most-once" else 1
    for attempt in range(tries):
        try:
            return conn.request(dest, body, timeout=10 if tries == 1 else 5)
        except Timeout:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def test_duplicate_replies_are_dropped_first_wins(mq_url: str, conn: mqprimer.Connection, dest: str) -> None:
    _needs_rpc(conn)

    once_only: list[bool] = []

    def twice(m: mqprimer.Message) -> None:  # a handler run twice (at-least-once) answers twice
        m.reply("first")
        m._replied = False
        try:
            m.reply("second")
        except StateError:  # gearman: a job completes once, the second answer is refused at once
            once_only.append(True)
        m.ack()

    with _serving(mq_url, dest, twice):
        assert conn.request(dest, "x", timeout=10).body == "first"
        assert conn.request(dest, "y", timeout=10).body == "first"
    if not once_only:
        wait_until(lambda: conn.dropped_replies["duplicate"] >= 1, what="a duplicate to be counted")
    assert conn.dropped_replies["late"] == 0


def test_worker_replies_and_dead_lettered_request_gets_remote_error(
    mq_url: str, conn: mqprimer.Connection, dest: str
) -> None:
    _needs_rpc(conn)

    def handler(m: mqprimer.Message) -> Any:
        if m.body == "bad":
            raise ValueError("cannot resize a PDF")
        if m.body == "poison":
            raise mqprimer.DeadLetter("poison pill")
        return {"width": 640} if m.body == "resize" else None

    worker = mqprimer.Worker(mq_url, dest, handler, retry=mqprimer.RetryPolicy(max_attempts=1), idle_max=0.1,
                             handle_signals=False)
    th = threading.Thread(target=worker.run, daemon=True)
    th.start()
    try:
        assert conn.request(dest, "resize", timeout=15).body == {"width": 640}
        with pytest.raises(RemoteError) as info:
            conn.request(dest, "bad", timeout=15)
        assert "ValueError: cannot resize a PDF" in info.value.reason
        assert isinstance(info.value.reply, mqprimer.Message) and info.value.reply.type == "mqprimer.error"
        with pytest.raises(RemoteError, match="poison pill"):
            conn.request(dest, "poison", timeout=15)
        with pytest.raises(Timeout):  # a handler returning None sends no reply
            conn.request(dest, "nothing", timeout=0.5)
    finally:
        worker.stop()
        th.join(20)


def test_reply_to_a_message_that_expects_none_is_a_state_error(conn: mqprimer.Connection, dest: str) -> None:
    _needs_rpc(conn)
    conn.producer().send(dest, "plain")
    with conn.consumer(dest) as c:
        m = c.receive(timeout=10)
        assert m is not None and m.reply_to is None
        with pytest.raises(StateError, match="not a request"):
            m.reply("answer")
        m.ack()


def test_no_reply_path_left_behind(mq_url: str, dest: str) -> None:
    conn = mqprimer.connect(mq_url)
    try:
        _needs_rpc(conn)
    except BaseException:  # the skip: leave no connection (and no client thread) behind
        conn.close()
        raise
    with _serving(mq_url, dest, _echo):
        for i in range(20):  # many calls, one path
            conn.request(dest, i, timeout=10)
        assert conn._replies is not None and conn._replies.path is not None
        address = conn._replies.path.address
        # a reply nobody reads (as if it came late, and never expires): it must go with the path
        late = encode(make(id="late-reply", source="urn:test", type="t", body="late", correlation_id="gone"))
        _raw_reply(conn, address, late)
        visible = reply_paths_left(mq_url, address) is not None
        if visible:
            wait_until(lambda: reply_paths_left(mq_url, address), what="the reply path to show on the broker")
    replies = conn._replies
    conn.close()
    assert replies.path is None and replies.ep.backend is None, "the reply path's connection is still open"
    if visible:
        wait_until(lambda: reply_paths_left(mq_url, address) is not True,
                   what="the reply path to be gone from the broker")
