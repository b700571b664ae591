"""mqprimer.aio runs on its event loop what a driver declares it never waits for
(Capabilities.nowait, Backend.nowait_publisher), and takes the thread path otherwise: never a
hop where none is needed, never a blocked loop where one is."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest

import mqprimer.aio as aio
from conftest import free_port_pair, need_broker
from test_aio_faults import run_watched

pytestmark = pytest.mark.timeout(60)




@pytest.mark.parametrize("name", ["zeromq", "amqp"])
def test_sends_receives_and_acks_take_no_thread_hop_where_the_driver_never_waits(name: str, hops: list[Any]) -> None:
    url = f"zmq+tcp://127.0.0.1:{free_port_pair()}" if name == "zeromq" else need_broker("amqp")
    q = f"nowait{uuid.uuid4().hex[:8]}"
    n = 50

    async def main() -> None:
        async with aio.connect(url) as conn, conn.consumer(q, prefetch=2 * n) as c:
            p = conn.producer()
            await p.send(q, {"i": -1})  # the first send learns the driver's path (on a thread)
            first = await c.receive(timeout=10)
            assert first is not None and first.body == {"i": -1}
            await first.ack()
            await asyncio.sleep(0)
            hops.clear()
            for i in range(n):
                await p.send(q, {"i": i})
            sent = len(hops)
            got: list[int] = []
            deadline = time.monotonic() + 10
            while len(got) < n and time.monotonic() < deadline:
                m = await c.receive(timeout=1)
                if m is not None:
                    got.append(m.body["i"])
                    await m.ack()
                    assert m.settled
            assert got == list(range(n))
            if name == "zeromq":
                assert sent == 0, f"{sent} of {n} zeromq sends took a thread hop"
            # a receive hops only while nothing has arrived yet (then it waits on a thread)
            receives = [f for f in hops if getattr(f, "__name__", "") == "receive"]
            acks = [f for f in hops if getattr(f, "__name__", "") == "ack"]
            assert not acks, f"{len(acks)} of {n} acks took a thread hop"
            assert len(receives) < n / 2, f"{len(receives)} of {n} receives took a thread hop"

    asyncio.run(main())


def test_a_zeromq_poll_never_waits_for_another_readers_lock() -> None:
    """Another consumer of the same queue in this process holds the shared PULL socket's lock
    (it is waiting for messages there): the aio receive must not wait for it on the loop."""
    url = f"zmq+tcp://127.0.0.1:{free_port_pair()}"
    q = f"nowait{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with aio.connect(url) as conn, conn.consumer(q) as c:
            await conn.producer().send(q, {"i": 0})
            m = await c.receive(timeout=10)
            assert m is not None
            await m.ack()
            sub = c.blocking._single.sub  # type: ignore[union-attr]
            hub = sub.hub  # type: ignore[union-attr]
            held, release = threading.Event(), threading.Event()

            def hold() -> None:
                with hub.lock:
                    held.set()
                    release.wait(10)

            threading.Thread(target=hold, daemon=True).start()
            assert held.wait(5)
            loop = asyncio.get_running_loop()
            loop.call_later(1.0, release.set)
            # its thread waits for the lock (1 s) while the loop runs on (run_watched's ticker)
            assert await c.receive(timeout=0.2) is None
            await conn.producer().send(q, {"i": 1})
            m = await c.receive(timeout=10)
            assert m is not None and m.body == {"i": 1}
            await m.ack()

    run_watched(main)


def test_a_zeromq_send_at_the_high_water_mark_waits_on_a_thread_not_on_the_loop() -> None:
    """No consumer and hwm=1: the nowait send says it cannot, and the thread's send waits out
    send_timeout there (and fails there, as the blocking send does); the loop runs meanwhile."""
    url = f"zmq+tcp://127.0.0.1:{free_port_pair()}?hwm=1&send_timeout=1"
    q = f"nowait{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with aio.connect(url) as conn:
            p = conn.producer()
            with pytest.raises(aio.MQError):
                for i in range(20):
                    await p.send(q, {"i": i})

    run_watched(main)


@pytest.mark.parametrize("name", ["zeromq", "amqp"])
def test_receives_waiting_together_share_one_slice_on_the_consumers_thread(name: str, hops: list[Any]) -> None:
    """20 tasks wait on one consumer: one receive slice waits on its thread, the others wait on
    the loop and poll when it ends, so a settle queues behind one slice at most (one slice per
    waiting task made 50 receivers collapse to hundreds of msg/s: 0fc19be)."""
    url = f"zmq+tcp://127.0.0.1:{free_port_pair()}" if name == "zeromq" else need_broker("amqp")
    q = f"nowait{uuid.uuid4().hex[:8]}"
    n = 20

    async def main() -> None:
        async with aio.connect(url) as conn, conn.consumer(q, prefetch=2 * n) as c:
            p = conn.producer()
            await p.send(q, {"i": -1})
            first = await c.receive(timeout=10)
            assert first is not None
            await first.ack()
            hops.clear()

            async def one() -> int:
                m = await c.receive(timeout=10)
                assert m is not None
                await m.ack()
                return int(m.body["i"])

            tasks = [asyncio.create_task(one()) for _ in range(n)]
            for _ in range(30):  # every task is waiting now: one slice on the thread, one after another
                await asyncio.sleep(0.01)
                assert c._runner.pending <= 1, f"{c._runner.pending} receive slices queued for {n} waiting tasks"
            slices = [f for f in hops if getattr(f, "__name__", "") == "receive"]
            assert len(slices) < n / 2, f"{len(slices)} receive slices for {n} waiting tasks"
            for i in range(n):
                await p.send(q, {"i": i})
            assert sorted(await asyncio.gather(*tasks)) == list(range(n))

    run_watched(main)


@pytest.mark.parametrize("name", ["zeromq", "amqp"])
def test_a_large_message_is_decoded_on_a_thread_not_on_the_loop(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # a CI run's broker-size-limit case held the loop 0.77 s decoding a large envelope inline
    from mqprimer.aio import _nowait

    decoder = _nowait._decoder
    on_loop: list[int] = []  # sizes of the payloads decoded on the loop's thread

    class Recording:
        def decode(self, payload: bytes) -> Any:
            if threading.current_thread() is threading.main_thread():
                on_loop.append(len(payload))
            return decoder.decode(payload)

    monkeypatch.setattr(_nowait, "_decoder", Recording())
    url = f"zmq+tcp://127.0.0.1:{free_port_pair()}" if name == "zeromq" else need_broker("amqp")
    q = f"nowait{uuid.uuid4().hex[:8]}"
    size = 2 * _nowait.INLINE_MAX

    async def main() -> None:
        async with aio.connect(url) as conn, conn.consumer(q, prefetch=4) as c:
            p = conn.producer()
            for body in ("small", "x" * size, "small again"):
                await p.send(q, body)
            got = []
            while len(got) < 3:
                m = await c.receive(timeout=10)
                assert m is not None
                got.append(m.body)
                await m.ack()
                if len(got) == 1:
                    # the other two arrive in this process meanwhile, so the loop-side poll
                    # (the path under test) is what takes them
                    await asyncio.sleep(0.5)
            assert got == ["small", "x" * size, "small again"]
        assert on_loop and max(on_loop) <= _nowait.INLINE_MAX, f"decoded on the loop: {on_loop} bytes"

    asyncio.run(main())


def test_send_nowait_writes_the_bytes_and_ids_send_writes() -> None:
    """The twin's loop-side send (Producer.send_nowait) frames the envelope as send()'s fast
    path does: the id it returns is the one on the wire, the bytes are fresh_format's."""
    import msgspec
    import zmq

    import mqprimer
    from mqprimer.envelope import DEFAULT_TYPE, fresh_format

    port = free_port_pair()
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.rcvtimeo = 5000
    pull.bind(f"tcp://127.0.0.1:{port}")
    try:
        with mqprimer.connect(f"zmq+tcp://127.0.0.1:{port}") as conn:
            p = conn.producer()
            for typ in (None, "t.x"):  # a send of each type learns the fast path send_nowait takes
                p.send("nw", {"warm": 1}, type=typ)
                pull.recv()
            body = {"n": 1, "text": "100% sure"}
            sent = [p.send_nowait("nw", body), p.send_nowait("nw", body, "t.x")]
            assert None not in sent, "send_nowait took nothing"
            for mid, typ in zip(sent, (DEFAULT_TYPE, "t.x"), strict=True):
                frame = pull.recv()
                payload = frame[frame.index(b"{"):]
                env = msgspec.json.decode(payload)
                assert env["id"] == mid
                want = fresh_format(conn.source, typ) % (mid.encode(), env["time"].encode(),
                                                        msgspec.json.encode(body))
                assert payload == want
    finally:
        pull.close(0)
