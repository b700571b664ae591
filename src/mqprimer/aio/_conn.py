"""The asyncio twin of :mod:`mqprimer.client`: connect, Connection, Producer, DeadLetters.

Each object wraps its blocking counterpart and awaits its calls on a :class:`Runner`, so
envelopes, capability checks, size limits, failover and reconnect stay in the portable
layer, written once.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from typing import Any, Generic, TypeVar

import mqprimer

from ..backend import Capabilities, Destination, Outgoing, QueueStats, Status
from ..client import Connection as _Connection
from ..client import Producer as _Producer
from ..deadletters import DeadLetters as _DeadLetters
from ..envelope import Envelope
from ..producer import _KEYWORDS_ONLY, _KeywordsOnly, _public_signature
from ..retry import RetryPolicy
from ..url import URL
from . import _native
from ._consumer import Consumer, Message
from ._request import LoopRequests
from ._runner import Runner, inline_ok

T = TypeVar("T")
_blocking_connect = mqprimer.connect  # bound once: a test may patch mqprimer.connect with a bridge to this twin


class _Opening(Generic[T]):
    """What ``connect()`` and ``conn.consumer()`` return: ``await`` it, or ``async with`` it."""

    def __init__(self, open: Callable[[], Awaitable[T]], close: Callable[[T], Awaitable[None]]) -> None:
        self._open, self._close = open, close
        self._value: T | None = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._open().__await__()

    async def __aenter__(self) -> T:
        self._value = await self._open()
        return self._value

    async def __aexit__(self, *exc: object) -> None:
        if self._value is not None:
            await self._close(self._value)


def connect(url: "str | URL | Sequence[str | URL] | None" = None, *, threads: int = 8,
            **options: Any) -> "_Opening[Connection]":
    """The asyncio twin of :func:`mqprimer.connect`: ``async with connect(url) as conn`` or
    ``conn = await connect(url)``. Same URLs and options; ``threads`` bounds the pool that
    runs this connection's blocking calls (sends, status, stats, dead letters)."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")

    async def open() -> Connection:
        runner = Runner(1, "mqprimer-aio-connect")
        try:
            blocking = await runner.call(functools.partial(_blocking_connect, url, **options), inline=False,
                                         on_late=_close_late)
        finally:
            runner.shutdown()
        return Connection(blocking, threads=threads)

    return _Opening(open, Connection.close)


def _close_late(conn: _Connection) -> None:
    conn.close()  # connect() was cancelled while the connection was being made


class Connection:
    """An asyncio connection; :attr:`blocking` is the :class:`mqprimer.Connection` it adapts."""

    def __init__(self, blocking: _Connection, *, threads: int = 8, request_threads: int = 64) -> None:
        self.blocking = blocking
        self._inline = inline_ok(blocking.urls)
        self._runner = Runner(threads, "mqprimer-aio", inline=self._inline)
        # a request waits for its reply on its thread; a cancelled one keeps it until then
        self._requests = Runner(request_threads, "mqprimer-aio-request")
        self._loop_requests = LoopRequests(blocking)
        self._consumers: list[Consumer] = []

    @property
    def urls(self) -> tuple[URL, ...]:
        return self.blocking.urls

    @property
    def capabilities(self) -> Capabilities:
        return self.blocking.capabilities

    @property
    def max_message_size(self) -> int:
        return self.blocking.max_message_size

    @property
    def dropped_replies(self) -> dict[str, int]:
        return self.blocking.dropped_replies

    def producer(self) -> "Producer":
        return Producer(self.blocking.producer(), self._runner)

    def consumer(self, destination: "str | Destination", *, prefetch: int = 10, subscription: str | None = None,
                 retry: RetryPolicy | None = None) -> "_Opening[Consumer]":
        """The twin of :meth:`mqprimer.Connection.consumer`: ``async with conn.consumer(...) as c``
        or ``c = await conn.consumer(...)``."""
        make = functools.partial(self.blocking.consumer, destination, prefetch=prefetch,
                                 subscription=subscription, retry=retry)

        async def open() -> Consumer:
            blocking = await self._runner.call(make, inline=False, on_late=_close_consumer)
            c = Consumer(blocking, inline=self._inline, owner=self)
            self._consumers.append(c)
            return c

        return _Opening(open, Consumer.close)

    async def request(self, destination: str, body: Any, *, timeout: float, headers: dict[str, str] | None = None,
                      type: str | None = None) -> Message:
        """The twin of :meth:`mqprimer.Connection.request`; the reply comes back settled."""
        loop_requests = self._loop_requests
        w = loop_requests.begin(destination, body, timeout, headers, type)
        if w is not None:  # on the loop: the reply path is made and can be awaited (aio/_request.py)
            try:
                if w.publish is not None:  # not sent on the loop (not yet known, or busy): from a thread
                    await self._requests.call(*w.publish)
                    loop_requests.learn(w.dest)
                while (fut := loop_requests.wait(w)) is not None:
                    await fut
            finally:
                loop_requests.leave(w)
            return Message(loop_requests.reply(w), self._runner)
        call = functools.partial(self.blocking.request, destination, body, timeout=timeout, headers=headers,
                                 type=type)
        reply = await self._requests.call(call)
        return Message(reply, self._runner)

    async def status(self, message_id: str) -> Status:
        return await self._runner.call(self.blocking.status, message_id)

    async def stats(self, queue: str) -> QueueStats:
        return await self._runner.call(self.blocking.stats, queue)

    def dead_letters(self, queue: str) -> "DeadLetters":
        return DeadLetters(self.blocking.dead_letters(queue), self._runner)

    async def close(self) -> None:
        """Close every consumer (their unsettled messages go back to the broker), then the connection."""
        for c in list(self._consumers):
            await c.close()
        self._loop_requests.close()  # gives the reply path back, which the close removes
        try:
            await self._runner.call(self.blocking.close, inline=False)
        finally:
            self._runner.shutdown()
            self._requests.shutdown()

    def _forget(self, c: Consumer) -> None:
        self._consumers = [x for x in self._consumers if x is not c]

    async def __aenter__(self) -> "Connection":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _close_consumer(c: Any) -> None:
    c.close()  # the consumer() call was cancelled while it subscribed


class Producer:
    """The twin of :class:`mqprimer.Producer`; ``build`` does no I/O and stays a plain call."""

    def __init__(self, blocking: _Producer, runner: Runner) -> None:
        self.blocking = blocking
        self._runner = runner

    def build(self, destination: "str | Destination", body: Any, **options: Any) -> Outgoing:
        return self.blocking.build(destination, body, **options)

    async def send(self, destination: "str | Destination", body: Any,
                   _keywords_only: _KeywordsOnly = _KEYWORDS_ONLY,  # keyword-only options, as the blocking send's
                   headers: dict[str, str] | None = None, type: str | None = None, priority: int | None = None,
                   delay: float | None = None, ttl: float | None = None, id: str | None = None) -> str:
        """Send one message; return its id once the broker has it (where it confirms)."""
        if (headers is None and ttl is None and id is None and priority is None and delay is None
                and _keywords_only is _KEYWORDS_ONLY):
            if self._runner.inline:  # memory://: no I/O (see _runner), and no coroutine hop either
                return self.blocking.send(destination, body, type=type)
            # on the loop where the driver can take it without waiting (Backend.nowait_publisher)
            mid = self.blocking.send_nowait(destination, body, type)
            if mid is not None:
                return mid
            # on the loop's own sockets where the driver offers it (Backend.publish_async)
            got = await _native.send(self.blocking, destination, body, type)
            if got.__class__ is str:
                return got  # type: ignore[return-value]
            if got is not None:  # the driver failed: map it, reconnect and send it again, as publish_one does
                await self._runner.call(self.blocking._conn._fast_failed, *got)  # type: ignore[attr-defined,misc]
                return got[4]  # type: ignore[index,no-any-return]
            return await self._runner.call(self._send_plain, destination, body, type)
        if _keywords_only is not _KEYWORDS_ONLY:
            raise TypeError("send() takes 2 positional arguments (destination, body); its options (headers, "
                            "type, priority, delay, ttl, id) are keyword-only: await send(q, body, headers=...)")
        return await self._runner.call(functools.partial(
            self.blocking.send, destination, body, headers=headers, type=type, priority=priority, delay=delay,
            ttl=ttl, id=id))

    def _send_plain(self, destination: "str | Destination", body: Any, type: str | None) -> str:
        return self.blocking.send(destination, body, type=type)

    async def send_many(self, messages: Iterable[Outgoing | tuple[Any, Any]]) -> list[str]:
        items = list(messages)
        return await self._runner.call(self.blocking.send_many, items)

    def close(self) -> None:
        self.blocking.close()

    async def __aenter__(self) -> "Producer":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()



Producer.send.__signature__ = _public_signature(Producer.send)  # type: ignore[attr-defined]


class DeadLetters:
    """The twin of :class:`mqprimer.DeadLetters`: ``await dead.list()``, ``replay()``, ``purge()``."""

    def __init__(self, blocking: _DeadLetters, runner: Runner) -> None:
        self.blocking = blocking
        self.queue = blocking.queue
        self._runner = runner

    async def list(self, limit: int = 100) -> list[Envelope]:
        return await self._runner.call(self.blocking.list, limit, inline=False)

    async def replay(self, limit: int | None = None, ids: set[str] | None = None) -> int:
        return await self._runner.call(self.blocking.replay, limit, ids, inline=False)

    async def purge(self) -> int:
        return await self._runner.call(self.blocking.purge, inline=False)
