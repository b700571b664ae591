"""Reads by the waiting thread (docs/backend-stomp.md): a consumer or a caller waiting for its
inbox reads the STOMP socket itself while the link's receiver thread is idle, so a delivery
wakes one thread, not the receiver and then the waiting thread. Real brokers, both flavours."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import mqprimer
from conftest import driver_sub as _sub
from conftest import need_broker
from mqprimer.backends import _stomp_acks, _stomp_link
from mqprimer.backends._stomp_link import ConnectionLost, Link
from mqprimer.testing.helpers import wait_until

pytestmark = pytest.mark.timeout(60)
FLAVOURS = ["stomp-rabbitmq", "stomp-activemq"]


def _receiver_switches(link: Link) -> int:
    tid = link.conn.transport.io_thread.native_id
    status = Path(f"/proc/self/task/{tid}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


@pytest.mark.parametrize("name", FLAVOURS)
def test_the_service_and_the_caller_read_their_own_messages(name: str) -> None:
    """100 sequential round trips: the service's consumer and the caller read the request and
    the reply themselves (bench_rpc_stomp.py: 4.3-4.6 -> 2.2-2.9 thread wake-ups per round trip),
    and the two links' receiver threads are hardly woken (they were once per round trip each).
    Under load a message may come while nobody waits for it; the receiver reads it then, which
    is correct, only slower: hence a quarter, not all."""
    url = need_broker(name)
    q = f"rpclead{uuid.uuid4().hex[:8]}"
    stop = threading.Event()
    n = 100
    with mqprimer.connect(url) as service, service.consumer(q, prefetch=32) as c, mqprimer.connect(url) as caller:
        def serve() -> None:
            while not stop.is_set():
                m = c.receive(timeout=0.1)
                if m is not None:
                    m.reply("pong")
                    m.ack()

        th = threading.Thread(target=serve, daemon=True)
        th.start()
        try:
            for _ in range(5):
                assert caller.request(q, "ping", timeout=20).body == "pong"
            path = caller._replies.path  # type: ignore[attr-defined]
            links = {"service": _sub(c).link, "caller": path.link}
            leads = {k: link.reader.leads for k, link in links.items()}
            woken = {k: _receiver_switches(link) for k, link in links.items()}
            for _ in range(n):
                assert caller.request(q, "ping", timeout=20).body == "pong"
            leads = {k: link.reader.leads - leads[k] for k, link in links.items()}
            woken = {k: _receiver_switches(link) - woken[k] for k, link in links.items()}
        finally:
            stop.set()
            th.join(10)
    assert leads["service"] > n // 4 and leads["caller"] > n // 4, \
        f"reads by the waiting threads: {leads} (receiver wake-ups: {woken})"


@pytest.mark.parametrize("name", FLAVOURS)
def test_a_consumer_writes_its_acks_once_it_reads_the_socket(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ACKs a consumer gave go out when it is about to wait, and only once the socket is
    masked for it: the broker's answer to an ACK (the next message, when the prefetch was
    full; the next request, in a service) then finds that thread reading. Written before,
    the next request of a busy request/reply service often came while the socket was still
    the receiver's (in a test run, 28 to 40 of 100 requests read by the service itself).
    And they are written without waiting there: a blocking write while this thread holds the
    socket (nobody else reads it) could wait for a broker that waits for this side to read."""
    monkeypatch.setattr(_stomp_acks, "ACK_LINGER", 2.0)  # the flusher does not write them first
    url = need_broker(name)
    q = f"rpcackl{uuid.uuid4().hex[:8]}"
    with mqprimer.connect(url) as conn, conn.consumer(q) as c:
        conn.producer().send(q, "one")
        m = c.receive(timeout=15)
        assert m is not None
        link: Link = _sub(c).link
        seen: list[bool] = []
        flush = _stomp_acks.AckWriter.write_nowait

        def spy(self: _stomp_acks.AckWriter) -> None:
            seen.append(link.reader.leading)
            flush(self)

        blocking: list[bool] = []
        write = _stomp_acks.AckWriter.write

        def spy_write(self: _stomp_acks.AckWriter, *args: Any, **kwargs: Any) -> bool:
            blocking.append(link.reader.leading)
            return write(self, *args, **kwargs)

        monkeypatch.setattr(_stomp_acks.AckWriter, "write_nowait", spy)
        monkeypatch.setattr(_stomp_acks.AckWriter, "write", spy_write)
        m.ack()
        assert link.acks.pending == 1
        assert c.receive(timeout=0.2) is None
        assert True not in blocking, "a blocking write while this thread held the socket"
        assert seen == [True], f"ACKs written while the socket was read by this thread: {seen}"
        assert link.acks.pending == 0


@pytest.mark.parametrize("name", FLAVOURS)
def test_a_connection_cut_while_a_thread_reads_ends_its_wait(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiting thread that reads the socket when the connection ends gives the socket back at
    once, and the receiver thread tells every waiter: the wait raises instead of lasting its
    whole timeout (the receiver is not woken for a masked socket). The read slice is made
    longer than the wait, so that only the end of the connection can end it."""
    monkeypatch.setattr(_stomp_link, "_LEAD_SLICE", 30.0)
    url = need_broker(name)
    with mqprimer.connect(url) as conn, conn.consumer(f"rpccut{uuid.uuid4().hex[:8]}") as c:
        sub = _sub(c)
        link: Link = sub.link
        raised: list[BaseException] = []
        took: list[float] = []

        def wait() -> None:
            t = time.monotonic()
            try:
                link.get(15.0, sub.box)
            except BaseException as exc:  # noqa: BLE001 - what ended the wait is the point
                raised.append(exc)
            took.append(time.monotonic() - t)

        th = threading.Thread(target=wait, daemon=True)
        th.start()
        wait_until(lambda: link.reader.leading, 10, what="the waiting thread to read the socket")
        link.conn.transport.socket.shutdown(socket.SHUT_RDWR)
        th.join(20)
        assert took and took[0] < 5, f"the wait lasted {took}"
        assert raised and isinstance(raised[0], ConnectionLost), raised
