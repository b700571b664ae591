"""AMQP direct writes (backends/_amqp_out.py): a thread that finds the connection's output idle
sends its request, reply or ack itself instead of waking the I/O thread, and a write the
socket takes only in part still reaches the broker whole and ahead of later frames.
Real RabbitMQ; the partial write is forced through a private TCP proxy, never by stopping
the shared broker."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import mqprimer
import mqprimer._replies
from conftest import need_broker
from mqprimer.testing.helpers import wait_until
from mqprimer.testing.proxy import Proxy
from mqprimer.url import URL

pytestmark = pytest.mark.timeout(60)
_BIG = 32 * 1024 * 1024  # more than loopback's socket buffers take while nothing reads (tcp_wmem max 4 MiB)


def _link(conn: mqprimer.Connection) -> Any:
    backend: Any = conn.endpoints[0].backend
    return backend._link


def _count_submits(link: Any) -> list[int]:
    """Count hand-offs to the link's I/O thread from now on (Link.submit, which call() uses too)."""
    count = [0]
    submit: Callable[[Callable[[], None]], None] = link.submit

    def counting(fn: Callable[[], None]) -> None:
        count[0] += 1
        submit(fn)

    link.submit = counting
    return count


def _echo(url: str, queue: str, stop: threading.Event, ready: threading.Event,
          conns: list[mqprimer.Connection]) -> None:
    with mqprimer.connect(url, max_message_size=_BIG * 2) as conn, conn.consumer(queue) as c:
        conns.append(conn)
        ready.set()
        while not stop.is_set():
            m = c.receive(timeout=0.1)
            if m is not None:
                body = m.body
                m.reply({"len": len(body)} if isinstance(body, str) else {"echo": body})
                m.ack()


@pytest.fixture
def service() -> Iterator[tuple[str, str, list[mqprimer.Connection]]]:
    url = need_broker("amqp")
    queue = f"direct{uuid.uuid4().hex[:8]}"
    stop, ready = threading.Event(), threading.Event()
    conns: list[mqprimer.Connection] = []
    th = threading.Thread(target=_echo, args=(url, queue, stop, ready, conns), daemon=True)
    th.start()
    assert ready.wait(20), "the echo service did not start"
    yield url, queue, conns
    stop.set()
    th.join(10)


def test_sequential_round_trips_do_not_wake_either_io_thread(service: tuple[str, str, list[Any]]) -> None:
    """Caller's request, service's reply and ack leave from the threads that make them: per
    sequential round trip no hand-off to the caller's or the service's I/O thread (before,
    one each way: four thread wake-ups per round trip with the deliveries' hand-overs)."""
    url, queue, service_conns = service
    rounds = 40
    with mqprimer.connect(url) as conn:
        for i in range(3):  # the reply path, the first request's queue declare
            assert conn.request(queue, i, timeout=10).body == {"echo": i}
        caller = _count_submits(_link(conn))
        served = _count_submits(_link(service_conns[0]))
        for i in range(rounds):
            assert conn.request(queue, i, timeout=10).body == {"echo": i}
    # a direct write declines while the I/O thread writes (a heartbeat): allow a few
    assert caller[0] <= rounds // 4, f"{caller[0]} hand-offs to the caller's I/O thread in {rounds} round trips"
    assert served[0] <= rounds // 2, f"{served[0]} hand-offs to the service's I/O thread in {rounds} round trips"


def test_a_request_the_socket_takes_only_in_part_arrives_whole_before_later_frames(
        service: tuple[str, str, list[Any]]) -> None:
    """A request bigger than the socket can take while the network stalls is sent in part by
    its caller; the I/O thread sends the rest before anything else (a second caller's request
    waits behind it). The broker gets both intact (a torn frame would close the connection),
    and the connection survives."""
    url, queue, _ = service
    u = URL.parse(url)
    with Proxy((u.host or "127.0.0.1", u.port or 5672)) as proxy:
        via = url.replace(f":{u.port}", f":{proxy.port}", 1)
        with mqprimer.connect(via, max_message_size=_BIG * 2) as conn:
            assert conn.request(queue, 0, timeout=10).body == {"echo": 0}
            out = _link(conn).out
            assert out.plain, "not pika's plaintext transport: direct writes are off and this proves nothing"
            big = "x" * _BIG
            got: dict[str, Any] = {}

            def call(name: str, body: Any) -> None:
                try:
                    got[name] = conn.request(queue, body, timeout=40).body
                except Exception as exc:  # reported below
                    got[name] = exc

            proxy.blackhole()
            big_call = threading.Thread(target=call, args=("big", big), daemon=True)
            big_call.start()
            wait_until(lambda: out.partial >= 1, timeout=20, what="the big request's send() taken in part")
            small_call = threading.Thread(target=call, args=("small", 7), daemon=True)
            small_call.start()
            proxy.restore()
            big_call.join(45)
            small_call.join(45)
            assert got == {"big": {"len": len(big)}, "small": {"echo": 7}}
            assert proxy.accepted == 1, "the connection was lost and made again"


def test_a_direct_request_waits_for_one_handed_off_before_it() -> None:
    """The first request to a queue goes through the I/O thread (it declares the queue); a
    second caller's request to it, made while that hand-off is still queued, must not
    overtake it on the wire (it would reach a queue that does not exist yet, and be lost)."""
    url = need_broker("amqp")
    queue = f"direct{uuid.uuid4().hex[:8]}"
    stop, ready, hold = threading.Event(), threading.Event(), threading.Event()
    got: dict[str, Any] = {}
    with mqprimer.connect(url) as conn:
        try:
            conn.request(f"{queue}.warm", 0, timeout=0.2)  # makes the reply path; nobody answers
        except mqprimer.Timeout:
            pass
        link = _link(conn)
        link.submit(lambda: hold.wait(10))  # the I/O thread is busy (this left _todo): hand-offs queue up

        def call(name: str, body: int) -> None:
            try:
                got[name] = conn.request(queue, body, timeout=20).body
            except Exception as exc:  # reported below
                got[name] = exc

        first = threading.Thread(target=call, args=("first", 1), daemon=True)
        first.start()
        wait_until(lambda: len(link._todo) == 1, what="the first request's hand-off queued")
        # the I/O thread clears this when it starts a drain, before it reaches the request:
        # that window is what the second caller must not slip through
        link._woken = False
        second = threading.Thread(target=call, args=("second", 2), daemon=True)
        second.start()
        wait_until(lambda: len(link._todo) == 2, timeout=5, what="the second request queued behind the first")
        hold.set()
        th = threading.Thread(target=_echo, args=(url, queue, stop, ready, []), daemon=True)
        th.start()
        try:
            first.join(25)
            second.join(25)
        finally:
            stop.set()
            th.join(10)
    assert got == {"first": {"echo": 1}, "second": {"echo": 2}}


def test_a_thread_joins_a_pending_hand_off_instead_of_writing(service: tuple[str, str, list[Any]]) -> None:
    """While a hand-off to the I/O thread is pending, its run (and send()) comes anyway: a
    request then joins it rather than writing by itself, so many threads' frames (acks of
    many consumers, 16 callers' requests) share one send() instead of one each."""
    url, queue, _ = service
    hold = threading.Event()
    got: list[Any] = []
    with mqprimer.connect(url) as conn:
        assert conn.request(queue, 0, timeout=10).body == {"echo": 0}
        link = _link(conn)
        link.submit(lambda: hold.wait(10))  # the I/O thread is busy with this one...
        caller = threading.Thread(target=lambda: got.append(conn.request(queue, 1, timeout=20).body), daemon=True)
        try:
            wait_until(lambda: not link._todo, what="the I/O thread running the first hand-off")
            link.submit(lambda: None)  # ...and this one is pending
            caller.start()
            wait_until(lambda: len(link._todo) == 2, timeout=5, what="the request joining the pending hand-off")
        finally:
            hold.set()
        caller.join(25)
    assert got == [{"echo": 1}]



def test_requests_in_flight_and_a_busy_service_s_replies_go_through_the_io_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct writes are for the lone round trip. A request made while others are unanswered
    is handed to the I/O thread (16 callers' requests then leave in a few send()s, not one
    each), and so is a reply a service sends while more requests wait in its buffer."""
    # a whole read slice without a reply writes the unanswered requests off (_amqp_reply's
    # settled): under a loaded CI run request 1's first 50 ms slice ended before request 2
    # was made, which then found nothing in flight and tried a direct write
    monkeypatch.setattr(mqprimer._replies, "_SLICE", 10.0)
    url = need_broker("amqp")
    queue = f"direct{uuid.uuid4().hex[:8]}"
    got: list[Any] = []
    with mqprimer.connect(url) as conn:
        try:
            conn.request(queue, 0, timeout=0.2)  # makes the reply path, declares the queue; nobody answers
        except mqprimer.Timeout:
            pass  # and its timed-out wait wrote that request off
        assert conn._replies is not None and conn._replies.path is not None
        path: Any = conn._replies.path
        out = _link(conn).out
        written: list[bool] = []  # what each direct() attempt of the caller's connection did
        direct = out.direct

        def counting(build: Callable[[], bytes | None]) -> bool:
            done: bool = direct(build)
            written.append(done)
            return done

        out.direct = counting
        handed = _count_submits(_link(conn))
        callers = []

        def call(i: int) -> None:
            got.append(conn.request(queue, i, timeout=20).body)

        for i in (1, 2, 3):
            th = threading.Thread(target=call, args=(i,), daemon=True)
            th.start()
            callers.append(th)
            wait_until(lambda: path.sent == i + 1, what=f"request {i} made")  # noqa: B023 (waited for here)
        wait_until(lambda: len(written) + handed[0] == 3, timeout=5, what="requests 1-3 written or handed off")
        # the first found nothing in flight and wrote itself; the two made while it was unanswered
        # did not even try (written stays [True])
        assert written == [True], f"direct writes tried by requests 1-3: {written}, expected only the first"
        with mqprimer.connect(url) as sconn, sconn.consumer(queue, prefetch=10) as c:
            sout = _link(sconn).out
            sdirect = sout.direct
            tried: list[str] = []  # what the service's thread tried to write itself

            def service_counting(build: Callable[[], bytes | None]) -> bool:
                tried.append(build.__qualname__)
                done: bool = sdirect(build)
                return done

            sout.direct = service_counting
            replies = 0
            while any(th.is_alive() for th in callers):
                m = c.receive(timeout=0.2)
                if m is not None:  # requests 1-3 (and request 0 if it has not expired yet)
                    m.reply({"echo": m.body})
                    replies += 1
                    m.ack()
    assert sorted(b["echo"] for b in got) == [1, 2, 3]
    # the requests were all waiting when the service started: its first reply found more
    # behind it in the buffer and went with the I/O thread
    reply_tries = sum(1 for name in tried if "send_reply" in name)
    assert reply_tries < replies, f"the service tried to write all {replies} replies itself"
