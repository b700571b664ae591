"""gearman:// through mqprimer.aio: what the driver lets the twin do on its event loop.

``Capabilities.nowait`` declares ``"poll"``: a receive takes a job this process has grabbed
already on the loop (no thread hop), and the poll (``GearmanSub.receive_nowait``) never waits,
not even for the rest of a packet that is half in the socket's buffer.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import mqprimer
import mqprimer.aio as aio
from conftest import need_broker
from mqprimer import Queue
from mqprimer.backends._gearman_sub import GearmanSub
from mqprimer.backends.gearman import GearmanBackend

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def url() -> str:
    return need_broker("gearman")


@pytest.fixture
def q() -> str:
    return f"ga{uuid.uuid4().hex[:10]}"




def test_aio_receive_takes_grabbed_jobs_on_the_loop(url: str, q: str, hops: list[Any]) -> None:
    n = 40
    with mqprimer.connect(url) as b:
        b.producer().send_many([(q, {"i": i}) for i in range(n)])

    async def main() -> tuple[list[int], int]:
        async with aio.connect(url) as conn, conn.consumer(q, prefetch=50) as c:
            hops.clear()
            got: list[int] = []
            receives = 0
            while len(got) < n:
                before = len(hops)
                m = await c.receive(timeout=10)
                assert m is not None, f"only {len(got)} of {n} jobs came"
                receives += len(hops) - before
                got.append(m.body["i"])
                await m.ack()  # on the consumer's thread: it waits for gearmand's answer
            return got, receives

    got, receive_hops = asyncio.run(main())
    assert sorted(got) == list(range(n))
    # the first receive grabs on the thread (nothing held yet); each ack's confirming grab
    # brings the next job into the process, which the next receive takes on the loop
    assert receive_hops <= 3, f"{receive_hops} of {n} receives went to a thread"


class _HoldingRelay:
    """Relays one connection to gearmand. Once ``hold`` is set, the last ``hold`` bytes of the
    next chunk from gearmand, and all after them, stay here until ``release()``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = target
        self.hold = 0
        self.held = b""
        self.lock = threading.Lock()
        self.client: socket.socket | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(self.target)
        self.client = client
        threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
        self._pump(server, client, True)

    def _pump(self, src: socket.socket, dst: socket.socket, holding: bool) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    if holding and self.held:  # in order: behind what is held already
                        self.held += data
                        continue
                    if holding and self.hold:
                        data, self.held = data[: -self.hold], data[-self.hold:]
                        self.hold = 0
                    dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            s.close()

    def release(self) -> None:
        with self.lock:
            assert self.client is not None
            self.client.sendall(self.held)
            self.held = b""

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def relay(url: str) -> Iterator[_HoldingRelay]:
    host, port = mqprimer.URL.parse(url).hosts[0]
    r = _HoldingRelay((host or "127.0.0.1", port or 4730))
    yield r
    r.close()


def test_poll_never_waits_for_the_rest_of_a_half_arrived_packet(url: str, q: str, relay: _HoldingRelay) -> None:
    with mqprimer.connect(url) as b:
        mid = b.producer().send(q, "x" * 3000)
    # not opened: its own connection would take the relay's one; the worker connection is the subscription's
    backend = GearmanBackend(mqprimer.URL.parse(f"gearman://127.0.0.1:{relay.port}?io_timeout=5"))
    sub = backend.subscribe(Queue(q), prefetch=1)
    assert isinstance(sub, GearmanSub)
    try:
        with relay.lock:
            relay.hold = 7  # JOB_ASSIGN_UNIQ's last bytes stay in the relay
        start = time.monotonic()
        deadline = start + 10
        while not relay.held and time.monotonic() < deadline:  # the poll's grab was answered
            assert sub.receive_nowait() is None
        assert relay.held, "gearmand never answered the grab"
        for _ in range(3):
            t = time.monotonic()
            assert sub.receive_nowait() is None
            assert time.monotonic() - t < 0.5, "the poll waited for the rest of the packet"
            assert sub.receive(0.0) is None  # receive(0.0) is the same poll
        relay.release()
        got = None
        while got is None and time.monotonic() < deadline:
            got = sub.receive_nowait()
        assert got is not None and mid.encode() in got.payload
        sub.ack(got)
    finally:
        sub.close()
        backend.close()


def _in_step(link: Any) -> bool:
    """Nothing unread on the connection: every answer was read by the request it answers."""
    import select

    return not link.buf and not select.select([link.sock], [], [], 0.2)[0]


def test_ack_async_returns_once_gearmand_answered_and_leaves_the_connection_in_step(url: str, q: str) -> None:
    with mqprimer.connect(url) as b:
        mids = [b.producer().send(q, i) for i in range(2)]
        backend = GearmanBackend(mqprimer.URL.parse(url))
        sub = backend.subscribe(Queue(q), prefetch=1)  # one held at a time: the ack's confirming request is an echo
        assert isinstance(sub, GearmanSub)
        try:
            d = sub.receive(5)
            assert d is not None
            asyncio.run(sub.ack_async(d))
            assert sub.answered == sub.sent and _in_step(sub.link)
            assert b.status(mids[0]) is mqprimer.Status.UNKNOWN  # completed: gearmand forgot it
            d2 = sub.receive(5)  # the blocking path goes on on the same connection
            assert d2 is not None and mids[1].encode() in d2.payload
            sub.ack(d2)
        finally:
            sub.close()


def test_a_cancelled_ack_async_still_completes_and_the_next_call_reads_its_answer(
        url: str, q: str, relay: _HoldingRelay) -> None:
    with mqprimer.connect(url) as b:
        mids = [b.producer().send(q, i) for i in range(2)]
        backend = GearmanBackend(mqprimer.URL.parse(f"gearman://127.0.0.1:{relay.port}?io_timeout=5"))
        sub = backend.subscribe(Queue(q), prefetch=2)
        assert isinstance(sub, GearmanSub)
        try:
            d1 = sub.receive(5)
            d2 = sub.receive(5)
            assert d1 is not None and d2 is not None

            async def cancel_mid_answer() -> None:
                with relay.lock:
                    relay.hold = 1  # the ack's answer stays one byte short
                task = asyncio.ensure_future(sub.ack_async(d1))
                deadline = time.monotonic() + 5
                while not relay.held and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                assert relay.held and not task.done(), "the ack did not wait for its answer"
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

            asyncio.run(cancel_mid_answer())
            relay.release()
            sub.ack(d2)  # reads the cancelled ack's answer first, then its own
            assert sub.answered == sub.sent and _in_step(sub.link)
            assert [b.status(m) for m in mids] == [mqprimer.Status.UNKNOWN] * 2
        finally:
            sub.close()


def test_publish_async_returns_on_job_created_in_step_and_refuses_a_second_one_meanwhile(url: str, q: str) -> None:
    backend = GearmanBackend(mqprimer.URL.parse(url))
    backend.open()
    try:
        async def main() -> None:
            first = asyncio.ensure_future(backend.publish_async(Queue(q), b"one", message_id="m1-" + q))
            await asyncio.sleep(0)  # the first one is out, waiting for its answer
            assert not first.done()
            with pytest.raises(mqprimer.backend.NotNow):
                await backend.publish_async(Queue(q), b"two", message_id="m2-" + q)
            await first

        asyncio.run(main())
        assert backend.link is not None and _in_step(backend.link)
        backend.publish(Queue(q), b"three", message_id="m3-" + q)  # the blocking path reads its own answer
        assert _in_step(backend.link)
        assert backend.status("m1-" + q) is mqprimer.Status.READY
    finally:
        backend.delete_queue(q)
        backend.close()
