"""beanstalk through mqprimer.aio on the event loop's own sockets (backend.py's asyncio SPI,
backends/_beanstalk_aio.py): the common path takes no thread hop, a call cancelled while its
command is out strands nothing and leaves the connection in step, and a frozen broker never
blocks the loop on this path. Through a private TCP proxy: the shared beanstalkd is never frozen."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import mqprimer
import mqprimer.aio as aio
from conftest import need_broker
from mqprimer.backends import _beanstalk_aio
from mqprimer.testing.proxy import Proxy
from test_aio_faults import run_watched

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    host, port = mqprimer.URL.parse(need_broker("beanstalk")).hosts[0]
    with Proxy((host or "127.0.0.1", port or 11300)) as p:
        yield p




def _sub(c: aio.Consumer) -> object:
    s = c.blocking._single
    assert s is not None and s.sub is not None
    return s.sub


def test_common_path_takes_no_thread_hop(hops: list[Any]) -> None:
    dest = f"n{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with aio.connect(need_broker("beanstalk")) as conn, conn.consumer(dest) as c:
            p = conn.producer()
            await p.send(dest, -1)  # the first send to a queue makes its checks on a thread
            m = await c.receive(timeout=5)
            assert m is not None
            await m.ack()
            hops.clear()
            sent = [await p.send(dest, i) for i in range(20)]
            got = []
            for _ in range(20):
                m = await c.receive(timeout=5)
                assert m is not None
                got.append((m.id, m.body))
                await m.ack()
            assert got == [(mid, i) for i, mid in enumerate(sent)]
            assert hops == [], f"calls that took a thread: {[getattr(f, '__name__', f) for f in hops]}"
            assert (await conn.stats(dest)).reserved == 0

    asyncio.run(main())


def test_cancelled_mid_command_strands_nothing(proxy: Proxy) -> None:
    """A receive cancelled while its reserve is out (the consumer holds a job, so it polls) and
    an ack cancelled while its delete is out: the reply is read by a task holding the lock, the
    job a reserve brought goes back, the delete completes, and the connection stays in step
    (no reconnect: same subscription). Every message is acked exactly once, none redelivered."""
    dest = f"x{uuid.uuid4().hex[:8]}"
    via = f"beanstalk://127.0.0.1:{proxy.port}"

    async def main() -> None:
        async with aio.connect(via) as conn, conn.consumer(dest) as c:
            p = conn.producer()
            sent = [await p.send(dest, i) for i in range(3)]
            first = await c.receive(timeout=5)  # held: the next receive polls (reserve-with-timeout 0)
            assert first is not None and first.id == sent[0]
            sub = _sub(c)
            generation = c.blocking._single.generation  # type: ignore[union-attr]
            proxy.slow(0.05)  # each way: a command's reply comes ~0.1 s after it went out
            task = asyncio.create_task(c.receive(timeout=5))
            await asyncio.sleep(0.03)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert sub._drains, "the cancel did not land while the reserve was out"  # type: ignore[attr-defined]
            acking = asyncio.create_task(first.ack())
            await asyncio.sleep(0.03)
            # the drain still holds the connection: this ack waits on the consumer's thread
            acking.cancel()
            with pytest.raises(asyncio.CancelledError):
                await acking
            proxy.restore()
            await _until(lambda: not sub._drains)  # type: ignore[attr-defined]
            got = []
            while (m := await c.receive(timeout=1.0)) is not None:
                got.append(m.id)
                ack = asyncio.create_task(m.ack())
                if len(got) == 1:  # cancel this one while its delete is out on the loop
                    proxy.slow(0.05)
                    await asyncio.sleep(0.03)
                    ack.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await ack
                    assert sub._drains, "the cancel did not land while the delete was out"  # type: ignore[attr-defined]
                    proxy.restore()
                else:
                    await ack
            assert got == sent[1:], f"redelivered or lost: {got} of {sent[1:]}"
            assert first.settled
            assert _sub(c) is sub and c.blocking._single.generation == generation, "the connection was dropped"  # type: ignore[union-attr]
            await _until(lambda: not sub._drains)  # type: ignore[attr-defined]
        async with aio.connect(need_broker("beanstalk")) as check:
            stats = await check.stats(dest)
            assert (stats.ready, stats.reserved, stats.delayed) == (0, 0, 0), stats

    asyncio.run(main())


async def _until(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_frozen_broker_never_blocks_the_loop_on_the_loop_path(proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy passes no byte either way (a frozen broker, or network): the loop-side send,
    receive and ack wait in the selector, not in the kernel, and fail after the I/O timeout."""
    dest = f"z{uuid.uuid4().hex[:8]}"
    via = f"beanstalk://127.0.0.1:{proxy.port}?io_timeout=1.5"
    puts: list[int] = []
    put = _beanstalk_aio.put

    async def counting(sock: object, frame: bytes, io_timeout: float) -> int:
        puts.append(len(frame))
        return await put(sock, frame, io_timeout)  # type: ignore[arg-type]

    monkeypatch.setattr("mqprimer.backends.beanstalk.put", counting)

    async def main() -> None:
        async with aio.connect(via, reconnect_timeout=1.0) as conn, conn.consumer(dest) as c:
            p = conn.producer()
            await p.send(dest, "a")
            await p.send(dest, "b")
            held = await c.receive(timeout=5)
            assert held is not None and puts, "the send did not take the loop path"
            proxy.blackhole()
            started = time.monotonic()
            # one at a time: alone on the loop (but for the watcher's ticker), each would be free
            # to wait in the kernel; it must not wait there past the ticker's next turn
            for call in (c.receive(timeout=1.0), held.ack(), p.send(dest, "frozen")):
                try:
                    await asyncio.wait_for(call, timeout=20)
                except mqprimer.ConnectionFailed:
                    pass
            assert time.monotonic() - started < 15
            proxy.restore()

    run_watched(main)
