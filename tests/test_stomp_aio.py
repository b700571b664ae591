"""STOMP's declared ``nowait=("poll", "ack")`` (backends/_stomp_acks.py): the asyncio twin
receives and acks on its event loop, and that never waits on the socket, even when the broker
stopped reading and the socket's buffers are full; ACKs given on the loop still reach the
broker before a clean close; on a lost connection the unacked messages come back."""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
import uuid
from typing import Any

import pytest

import mqprimer
import mqprimer.aio as aio
from conftest import need_broker
from mqprimer.backends._stomp_acks import AckWriter
from mqprimer.testing.helpers import collect, wait_until
from test_aio_faults import run_watched

pytestmark = pytest.mark.timeout(90)
FLAVOURS = ["stomp-rabbitmq", "stomp-activemq"]




class _Relay:
    """One TCP connection relayed to ``target``; :meth:`freeze` stops reading from the client (a
    broker that stopped reading), with a small receive buffer so that the client's fills soon."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.frozen = threading.Event()
        self.still = threading.Event()  # the client-to-broker pump has seen the freeze
        self.done = threading.Event()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by the accepted one
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.done.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
            self.socks += [client, upstream]
            for src, dst, freezes in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, freezes), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, freezes: bool) -> None:
        try:
            while not self.done.is_set():
                if freezes and self.frozen.is_set():
                    self.still.set()
                    time.sleep(0.01)  # read nothing more: the client's socket buffer fills
                    continue
                if not select.select([src], [], [], 0.05)[0]:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket cut meanwhile
            pass
        # this pair only: a pump that notices a cut late must not reset a connection the
        # client made since (a CI run saw that new one cut after its SEND, and a resend)
        _reset([src, dst])
        self.socks = [s for s in self.socks if s is not src and s is not dst]

    def freeze(self) -> None:
        """Stop reading from the client; returns once the pump has stopped (it may be mid-select)."""
        self.still.clear()
        self.frozen.set()
        assert self.still.wait(5), "the relay did not stop reading"

    def cut(self) -> None:
        """Both sides see a reset; later connections are relayed again."""
        socks, self.socks = self.socks, []
        _reset(socks)
        self.frozen.clear()

    def close(self) -> None:
        self.done.set()
        self.listener.close()
        self.cut()


def _reset(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
        except OSError:
            pass


def _acks_of(c: aio.Consumer) -> tuple[AckWriter, socket.socket]:
    s = c.blocking._single
    assert s is not None and s.sub is not None
    link = s.sub.link  # type: ignore[attr-defined]
    return link.acks, link.conn.transport.socket


@pytest.mark.parametrize("name", FLAVOURS)
def test_acks_on_the_loop_never_wait_for_a_broker_that_stopped_reading(name: str, hops: list[Any]) -> None:
    """Through a proxy that stops passing bytes, with the client's socket buffer made small:
    a few thousand ACKs fill it, yet every receive and ack runs on the loop (no thread hop)
    without holding it, and what could not be written waits in the ACK writer. After the cut
    the messages whose ACK never reached the broker come back."""
    url = need_broker(name)
    u = mqprimer.URL.parse(url)
    host, port = u.hosts[0]
    q = f"stompnowait{uuid.uuid4().hex[:8]}"
    n = 1000
    with mqprimer.connect(url) as conn:
        conn.producer().send_many((q, {"i": i}) for i in range(n))

    async def main(proxy: _Relay) -> None:
        via = url.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
        async with aio.connect(via, reconnect_timeout=1) as conn, conn.consumer(q, prefetch=n) as c:
            first = await c.receive(timeout=10)  # the first receive waits on the consumer's thread
            assert first is not None
            writer, sock = _acks_of(c)
            got = [first]
            deadline = time.monotonic() + 20
            while len(got) < n and time.monotonic() < deadline:
                m = await c.receive(timeout=1)
                if m is not None:
                    got.append(m)
            assert len(got) == n, f"only {len(got)} of {n} messages arrived"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            proxy.still.clear()
            proxy.frozen.set()
            await asyncio.wait_for(asyncio.to_thread(proxy.still.wait, 5), 10)  # the relay stopped reading
            await asyncio.sleep(0)
            hops.clear()
            t0 = time.monotonic()
            for m in got:
                await m.ack()
            took = time.monotonic() - t0
            assert not hops, f"{len(hops)} calls took the thread path: {hops[:3]}"
            assert took < 5, f"{n} acks on the loop took {took:.1f}s"
            # the socket is full: the ACKs it refused wait in the writer, or with the flusher
            # thread blocked in sendall (off the loop)
            assert not select.select([], [sock], [], 0)[1], "the socket took every ACK: the test never filled it"
            assert writer.pending or writer.lock.locked()
            proxy.cut()  # the connection is lost; the broker gives back what it never saw ACKed

    proxy = _Relay((host or "127.0.0.1", port or 61613))
    unfreeze = threading.Timer(30, proxy.cut)  # a loop held in a blocking write is freed (and reported)
    unfreeze.start()
    try:
        run_watched(lambda: main(proxy))
    finally:
        unfreeze.cancel()
        proxy.close()
    with mqprimer.connect(url) as conn, conn.consumer(q, prefetch=n) as c:
        back = collect(c, 1, timeout=15)  # the first (acked)
        while (m := c.receive(timeout=0.5)) is not None:  # and the rest: the queue ends empty
            m.ack()
        assert back, "no unacked message came back after the connection was lost"


@pytest.mark.parametrize("name", FLAVOURS)
def test_acks_given_on_the_loop_reach_the_broker_before_a_clean_close(name: str, hops: list[Any]) -> None:
    """Fewer ACKs than a batch, given on the loop and left to linger, then the consumer closes at
    once: they are written before the UNSUBSCRIBE / DISCONNECT, so nothing comes back."""
    url = need_broker(name)
    q = f"stompclose{uuid.uuid4().hex[:8]}"
    n = 10

    async def main() -> None:
        async with aio.connect(url) as conn:
            await conn.producer().send_many([(q, {"i": i}) for i in range(n)])
            async with conn.consumer(q, prefetch=n) as c:
                got: list[aio.Message] = []
                deadline = time.monotonic() + 10
                while len(got) < n and time.monotonic() < deadline:
                    m = await c.receive(timeout=1)
                    if m is not None:
                        got.append(m)
                assert len(got) == n
                hops.clear()
                for m in got:
                    await m.ack()
                assert not hops, "the acks took the thread path"
                writer, _ = _acks_of(c)
                assert writer.pending, "the ACKs went out at once: nothing lingered to test the close with"

    run_watched(main)
    with mqprimer.connect(url) as conn, conn.consumer(q) as c:
        again = c.receive(timeout=1.0)
        assert again is None, f"an ACKed message came back after a clean close: {again.body}"


def test_waiting_acks_go_out_in_front_of_a_nack(monkeypatch: pytest.MonkeyPatch) -> None:
    """ACKs still lingering in the writer are written before the next frame of the link, in
    the same write: here a NACK (RabbitMQ's give-back), given right after two ACKs."""
    url = need_broker("stomp-rabbitmq")
    q = f"stomporder{uuid.uuid4().hex[:8]}"
    with mqprimer.connect(url) as conn:
        conn.producer().send_many([(q, i) for i in range(3)])
        with conn.consumer(q, prefetch=3) as c:
            ms = collect(c, 3, ack=False)
            s = c._single
            assert s is not None and s.sub is not None
            t = s.sub.link.conn.transport  # type: ignore[attr-defined]
            writes: list[bytes] = []
            send = t.send

            def spy(data: bytes) -> None:
                writes.append(data)
                send(data)

            monkeypatch.setattr(t, "send", spy)
            ms[0].ack()
            ms[1].ack()
            c._settle(ms[2], "give back", lambda sub: sub.requeue(ms[2]._delivery))  # as aio's _give_back
            wire = b"".join(writes)
            ids = [m._delivery.tag.headers["ack"].encode() for m in ms]
            assert wire.count(b"NACK\nid:") == 1 and b"NACK\nid:" + ids[2] in wire, wire
            nack = wire.index(b"NACK\nid:")
            assert wire.index(b"ACK\nid:" + ids[0]) < nack and wire.index(b"ACK\nid:" + ids[1]) < nack, wire
            back = collect(c, 1)  # the NACKed one, redelivered (and acked now)
            assert back[0].body == 2
            monkeypatch.undo()
    with mqprimer.connect(url) as conn, conn.consumer(q) as c:
        assert c.receive(timeout=1.0) is None, "an ACKed message came back"


def test_close_does_not_wait_for_a_write_stuck_on_a_broker_that_stopped_reading() -> None:
    """ACKs (never waiting, in the blocking API too) fill the socket of a broker that stopped
    reading (no heart-beats, so nothing notices): the flusher's write is stuck holding the
    socket, and the link's close gives up the DISCONNECT after 2 s instead of waiting with it."""
    url = need_broker("stomp-rabbitmq")
    host, port = mqprimer.URL.parse(url).hosts[0]
    q = f"stompstuck{uuid.uuid4().hex[:8]}"
    n = 1000
    with mqprimer.connect(url) as conn:
        conn.producer().send_many((q, {"i": i}) for i in range(n))
    relay = _Relay((host or "127.0.0.1", port or 61613))
    unfreeze = threading.Timer(30, relay.cut)
    unfreeze.start()
    try:
        via = url.replace(f"{host}:{port}", f"127.0.0.1:{relay.port}") + "?heartbeat=0"
        with mqprimer.connect(via) as conn, conn.consumer(q, prefetch=n) as c:
            got = collect(c, n, ack=False)
            s = c._single
            assert s is not None and s.sub is not None
            link = s.sub.link  # type: ignore[attr-defined]
            link.conn.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            relay.freeze()
            t0 = time.monotonic()
            for m in got:
                m.ack()
            assert time.monotonic() - t0 < 5, "the acks waited for the socket"
            # the flusher takes the batch from the queue a moment after the last ack
            wait_until(link.acks.lock.locked, timeout=5, what="a write stuck on the full socket")
            t0 = time.monotonic()
            link.close()
            took = time.monotonic() - t0
            assert took < 6, f"close waited {took:.1f}s for the stuck write"
    finally:
        unfreeze.cancel()
        relay.close()
    with mqprimer.connect(url) as conn, conn.consumer(q, prefetch=n) as c:
        while (left := c.receive(timeout=0.5)) is not None:  # what the broker never saw ACKed
            left.ack()


def _link_of(p: aio.Producer) -> Any:
    conn: Any = p.blocking._conn
    return conn.endpoints[conn._active].backend.link


@pytest.mark.parametrize("name", FLAVOURS)
def test_sends_on_the_loop_take_no_thread_hop_and_keep_their_order(name: str, hops: list[Any]) -> None:
    """After the first send to a queue (the thread path makes its checks), sends are written on
    the loop and their RECEIPTs awaited there (_stomp_aio.py): no thread hop, every message
    arrives once and in order, and a send cancelled while it awaits its RECEIPT leaves the
    link in step (its RECEIPT is dropped when it comes, the next sends still confirm)."""
    url = need_broker(name)
    q = f"stomploopsend{uuid.uuid4().hex[:8]}"
    n = 40

    async def main() -> None:
        async with aio.connect(url) as conn:
            p = conn.producer()
            await p.send(q, {"i": 0})
            hops.clear()
            for i in range(1, n):
                await p.send(q, {"i": i})
            assert not hops, f"{len(hops)} sends took the thread path: {hops[:3]}"
            link = _link_of(p)
            task = asyncio.create_task(p.send(q, {"i": n}))  # cancelled awaiting its RECEIPT
            for _ in range(3):
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await p.send(q, {"i": n + 1})
            assert not hops, "a send after the cancelled one took the thread path"
            assert link.alive and link is _link_of(p), "the cancelled send dropped the connection"
            await asyncio.to_thread(wait_until, lambda: not link.abandoned, 10)
            assert not link.awaited and not link.receipts, "receipts left behind"

    run_watched(main)
    with mqprimer.connect(url) as conn, conn.consumer(q, prefetch=100) as c:
        got = [m.body["i"] for m in collect(c, n + 1, timeout=15)]
        while (m := c.receive(timeout=0.5)) is not None:
            got.append(m.body["i"])
            m.ack()
    want = list(range(n)) + [n + 1]
    assert [i for i in got if i != n] == want, f"sends lost, repeated or out of order: {got}"


@pytest.mark.parametrize("name", FLAVOURS)
def test_a_send_on_the_loop_never_waits_for_a_broker_that_stopped_reading(name: str, hops: list[Any]) -> None:
    """Through a relay that stops reading, with the client's socket buffer made small: a large
    send is written on the loop as the socket takes it, the loop runs on meanwhile (run_watched
    fails on a held loop), and a send cancelled inside its half-written frame drops the
    connection (the stream would go on mid-frame), which the next send replaces."""
    url = need_broker(name)
    u = mqprimer.URL.parse(url)
    host, port = u.hosts[0]
    q = f"stomploopstuck{uuid.uuid4().hex[:8]}"

    async def main(proxy: _Relay) -> None:
        via = url.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
        async with aio.connect(via, reconnect_timeout=5) as conn:
            p = conn.producer()
            await p.send(q, "first")  # the thread path: its checks
            link = _link_of(p)
            link.conn.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            proxy.still.clear()
            proxy.frozen.set()
            await asyncio.wait_for(asyncio.to_thread(proxy.still.wait, 5), 10)
            hops.clear()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(p.send(q, "x" * 400_000), 1.0)
            assert not hops, f"the send took the thread path: {hops[:3]}"
            assert not link.alive, "a half-written SEND left the connection in use"
            proxy.cut()
            await p.send(q, "after")  # a new connection (through the relay again)

    proxy = _Relay((host or "127.0.0.1", port or 61613))
    unfreeze = threading.Timer(30, proxy.cut)  # a loop held in a blocking write is freed (and reported)
    unfreeze.start()
    try:
        run_watched(lambda: main(proxy))
    finally:
        unfreeze.cancel()
        proxy.close()
    with mqprimer.connect(url) as conn, conn.consumer(q) as c:
        got = [m.body for m in collect(c, 2, timeout=15)]
        while (m := c.receive(timeout=0.5)) is not None:
            got.append(m.body)
            m.ack()
    assert got[0] == "first" and got[-1] == "after" and len(got) == 2, f"unexpected messages: {[g[:10] for g in got]}"
