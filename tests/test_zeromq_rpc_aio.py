"""The asyncio twin's requests on ZeroMQ wait on the event loop (aio/_request.py).

The reply path offers a descriptor the loop watches, so many requests in flight cost no
thread: these tests hold that, and that a request's deadline, a close, and blocking callers
on the same connection work as on the thread path.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import mqprimer
import mqprimer.aio
from mqprimer.errors import StateError, Timeout

pytestmark = pytest.mark.timeout(60)


def _url() -> str:
    from conftest import free_port_pair

    return f"zmq+tcp://127.0.0.1:{free_port_pair()}"


@contextmanager
def _echo(url: str, dest: str) -> Iterator[None]:
    stop, ready = threading.Event(), threading.Event()

    def serve() -> None:
        with mqprimer.connect(url) as conn, conn.consumer(dest, prefetch=32) as c:
            ready.set()
            while not stop.is_set():
                m = c.receive(timeout=0.05)
                if m is not None:
                    m.reply({"n": m.body["n"]})
                    m.ack()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    assert ready.wait(10)
    try:
        yield
    finally:
        stop.set()
        th.join(10)


def test_many_requests_in_flight_wait_on_the_loop_without_a_thread() -> None:
    url = _url()

    async def main() -> None:
        async with mqprimer.aio.connect(url) as conn:
            await conn.request("rpc", {"n": -1}, timeout=10)  # makes the reply path (on a thread)
            await conn.request("rpc", {"n": -1}, timeout=10)  # sends from a thread once: learns the queue
            on_threads = 0
            call = conn._requests.call

            async def counted(*args: object, **kw: object) -> object:
                nonlocal on_threads
                on_threads += 1
                return await call(*args, **kw)  # type: ignore[arg-type]

            conn._requests.call = counted  # type: ignore[method-assign]

            async def caller(k: int) -> list[int]:
                return [(await conn.request("rpc", {"n": k * 100 + i}, timeout=10)).body["n"] for i in range(25)]

            got = await asyncio.gather(*(caller(k) for k in range(16)))
            assert got == [[k * 100 + i for i in range(25)] for k in range(16)]  # each reply to its own request
            assert on_threads == 0, f"{on_threads} of 400 requests were made on threads, not on the loop"
            assert conn._loop_requests.reading is not None  # the loop holds the path, and lets go when idle
            await asyncio.wait_for(_until(lambda: conn._loop_requests.reading is None), 5)

    with _echo(url, "rpc"):
        asyncio.run(main())


async def _until(cond: "object") -> None:
    while not cond():  # type: ignore[operator]
        await asyncio.sleep(0.01)


def test_a_request_nobody_answers_times_out_on_time_beside_answered_ones() -> None:
    url = _url()

    async def main() -> None:
        async with mqprimer.aio.connect(url) as conn:
            await conn.request("rpc", {"n": 0}, timeout=10)

            async def unanswered() -> float:
                t = time.monotonic()
                with pytest.raises(Timeout, match="no reply from nobody within 0.3s"):
                    await conn.request("nobody", {"n": 1}, timeout=0.3)
                return time.monotonic() - t

            async def answered() -> int:
                n = 0
                for _ in range(50):
                    n += (await conn.request("rpc", {"n": 1}, timeout=10)).body["n"]
                return n

            took, n = await asyncio.wait_for(asyncio.gather(unanswered(), answered()), 20)
            assert n == 50
            assert 0.3 <= took < 1.5, f"the 0.3 s request timed out after {took:.2f} s"

    with _echo(url, "rpc"):
        asyncio.run(main())


def test_closing_the_connection_ends_the_requests_waiting_on_the_loop() -> None:
    url = _url()

    async def main() -> None:
        conn = await mqprimer.aio.connect(url)
        with _echo(url, "rpc"):
            await conn.request("rpc", {"n": 0}, timeout=10)
        waiting = [asyncio.ensure_future(conn.request("nobody", {"n": i}, timeout=30)) for i in range(4)]
        await _until(lambda: len(conn._loop_requests.waiting) == 4)
        t = time.monotonic()
        await asyncio.wait_for(conn.close(), 10)
        for f in waiting:
            with pytest.raises(StateError, match="closed"):
                await asyncio.wait_for(f, 5)
        assert time.monotonic() - t < 5
        assert conn.blocking._replies is not None and conn.blocking._replies.path is None  # removed by the close

    asyncio.run(main())


def test_blocking_callers_beside_the_loop_get_their_own_replies() -> None:
    url = _url()
    errors: list[BaseException] = []

    async def main() -> None:
        async with mqprimer.aio.connect(url) as conn:
            await conn.request("rpc", {"n": 0}, timeout=10)

            def blocking(k: int) -> None:  # the same connection, from threads
                try:
                    for i in range(40):
                        n = k * 1000 + i
                        assert conn.blocking.request("rpc", {"n": n}, timeout=10).body["n"] == n
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=blocking, args=(k,)) for k in range(1, 4)]
            for th in threads:
                th.start()

            async def caller(k: int) -> None:
                for i in range(40):
                    assert (await conn.request("rpc", {"n": -k - i}, timeout=10)).body["n"] == -k - i

            await asyncio.wait_for(asyncio.gather(*(caller(k) for k in range(8))), 30)
            await asyncio.wait_for(asyncio.to_thread(lambda: [th.join(30) for th in threads]), 40)
            assert not errors, errors[0]
            assert conn.dropped_replies == {"duplicate": 0, "late": 0, "invalid": 0}

    with _echo(url, "rpc"):
        asyncio.run(main())
