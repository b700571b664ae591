"""The asyncio twin of :class:`mqprimer.Consumer` and :class:`mqprimer.Message`.

A consumer owns one thread: its blocking receive waits there in short slices (so that a
settle queued behind it waits at most a slice) and its settles run there in order. Where the
driver declares it (``Capabilities.nowait``), a receive first takes a message this process
holds already on the loop, an ack runs on the loop while that thread is idle (see
:mod:`._nowait`), and receives waiting together share one slice. Where the driver offers
an asyncio path (``Subscription.receive_async`` / ``ack_async``: beanstalk), receive and ack
run on the loop's own sockets instead (:mod:`._native`), one receive at a time. A
``receive`` cancelled while a slice is under way leaves that slice running; a message it
brings back is given back to the broker at once (``Subscription.requeue`` through the
consumer's settle path), so cancellation never strands a delivery half-taken.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar

from ..backend import Destination, NotNow
from ..consumer import Consumer as _Consumer
from ..envelope import Envelope
from ..errors import MQError, StateError
from ..message import Message as _Message
from ..message import _State
from ..retry import RetryPolicy
from . import _native, _nowait
from ._runner import Runner

T = TypeVar("T")
log = logging.getLogger("mqprimer")
_SLICE = 0.1  # longest one blocking receive holds the consumer's thread
_DONE = -1.0  # Consumer._receive_native: the receive is over (a message, or the timeout ran out)


class _Calls(Protocol):
    async def call(self, fn: Callable[..., T], *args: Any, on_late: Callable[[T], None] | None = None,
                   inline: bool = True) -> T: ...


class _Owner(Protocol):
    def _forget(self, c: "Consumer") -> None: ...


class Consumer:
    """Receive with ``await consumer.receive(timeout=...)`` or ``async for message in consumer``."""

    def __init__(self, blocking: _Consumer, *, inline: bool = False, owner: _Owner | None = None) -> None:
        self.blocking = blocking
        self._runner = Runner(1, "mqprimer-aio-consumer", inline=inline)
        self._slice: "asyncio.Future[None] | None" = None  # a receive waiting on the thread (receive)
        self._native: "asyncio.Future[None] | None" = None  # a receive out on the loop's sockets
        self._owner = owner

    @property
    def destination(self) -> Destination:
        return self.blocking.destination

    @property
    def closed(self) -> bool:
        return self.blocking.closed

    @property
    def prefetch(self) -> int:
        return self.blocking.prefetch

    @property
    def subscription(self) -> str | None:
        return self.blocking.subscription

    @property
    def retry_policy(self) -> RetryPolicy:
        return self.blocking.retry_policy

    @property
    def delivery_lease(self) -> float | None:
        return self.blocking.delivery_lease

    async def call(self, fn: Callable[..., T], *args: Any, on_late: Callable[[T], None] | None = None,
                   inline: bool = True) -> T:
        """Run a settle of one of this consumer's messages (on its thread, in order)."""
        return await self._runner.call(fn, *args, on_late=on_late, inline=inline and not self._runner.pending)

    async def receive(self, timeout: float | None = None) -> "Message | None":
        """The next message, or ``None`` after ``timeout`` seconds (``None`` waits for ever)."""
        c = self.blocking
        if c.closed:
            raise StateError("the consumer is closed")
        runner = self._runner
        got = None
        if runner.inline:
            # inline (memory://) only while the thread runs nothing: a cancelled receive's slice
            # may still hold the subscription's lock there, and the loop must not wait for it
            if not runner.pending:
                m = c.receive(0.0)  # memory://: a poll is in-process work
                if m is not None or timeout == 0:
                    return Message(m, self) if m is not None else None
        else:
            if _native.receives(c):
                # on the loop's own sockets (Subscription.receive_async); the thread path below
                # only when the driver cannot now (busy, or anything uncommon)
                msg, left = await self._receive_native(timeout)
                if msg is not None or left == _DONE:
                    return msg
                timeout = left  # the driver cannot now: the thread path below, for what is left
            got = _nowait.poll(c)  # a message this process holds already (Capabilities.nowait)
            if got.__class__ is _Message:
                return Message(got, self)  # type: ignore[arg-type]
        polls = got is not None or not runner.inline and _nowait.polls(c)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if polls:
                if got is None:
                    got = _nowait.poll(c)
                if got is not None:
                    if got.__class__ is _Message:
                        return Message(got, self)  # type: ignore[arg-type]
                    raw, got = got, None
                    # the delivery is taken: a cancelled receive still has it wrapped, then given back
                    m = await runner.call(_nowait.wrap, c, raw, on_late=_give_back, inline=False, always=True)
                    if m is not None:
                        return Message(m, self)
                    continue
                if self._slice is not None:
                    # another receive waits on the thread already: it brings messages into this
                    # process, to poll for once it ends. One slice at a time, so that settles
                    # queue behind one slice at most, not one per waiting receive (0fc19be)
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return None
                    await asyncio.wait((self._slice,), timeout=left)
                    if c.closed:
                        return None
                    continue
            wait = _SLICE if deadline is None else min(_SLICE, max(deadline - time.monotonic(), 0.0))
            if polls:
                self._slice = fut = asyncio.get_running_loop().create_future()
            try:
                m = await runner.call(c.receive, wait, on_late=_give_back, inline=False)
            finally:
                if polls and self._slice is fut:
                    self._slice = None
                    fut.set_result(None)
            if m is not None:
                return Message(m, self)
            if c.closed or (deadline is not None and time.monotonic() >= deadline):
                return None

    async def _receive_native(self, timeout: float | None) -> "tuple[Message | None, float | None]":
        """Receive on the loop: ``(message, _DONE)``, ``(None, _DONE)`` when the timeout ran
        out, or ``(None, timeout left)`` when the thread path must go on (the driver said NotNow)."""
        c = self.blocking
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if self._native is not None:
                # another receive is out on the loop: wait for it to end, then try (never a
                # thread slice each, which would queue settles behind them: see receive)
                if left == 0:
                    return None, _DONE
                await asyncio.wait((self._native,), timeout=left)
                if c.closed:
                    return None, _DONE
                continue
            wait = _SLICE if left is None else min(_SLICE, left)
            self._native = fut = asyncio.get_running_loop().create_future()
            try:
                got = await _native.receive(c, wait)
            except NotNow:
                return None, (None if deadline is None else max(deadline - time.monotonic(), 0.0))
            finally:
                self._native = None
                fut.set_result(None)
            if got is not None:
                if got.__class__ is _Message:
                    return Message(got, self), _DONE  # type: ignore[arg-type]
                # the delivery is taken: a cancelled receive still has it wrapped, then given back
                m = await self._runner.call(_nowait.wrap, c, got, on_late=_give_back, inline=False, always=True)
                if m is not None:
                    return Message(m, self), _DONE
                continue
            if c.closed or (deadline is not None and time.monotonic() >= deadline):
                return None, _DONE

    def __aiter__(self) -> AsyncIterator["Message"]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator["Message"]:
        while not self.blocking.closed:
            try:
                m = await self.receive(timeout=_SLICE)
            except StateError:
                return
            if m is not None:
                yield m

    async def close(self) -> None:
        """Stop; every unsettled message goes back to the broker."""
        if self._owner is not None:
            self._owner._forget(self)
        if not self.blocking.closed:
            try:
                await self._runner.call(self.blocking.close, inline=False)
            finally:
                self._runner.shutdown()
        else:
            self._runner.shutdown()

    async def __aenter__(self) -> "Consumer":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _give_back(m: _Message | None) -> None:
    """A delivery that arrived for a receive cancelled meanwhile: back to the broker, as it is."""
    if m is None or m.settled:
        return
    consumer = m._consumer
    try:
        consumer._settle(m, "give back", lambda sub: sub.requeue(m._delivery))  # type: ignore[attr-defined]
        m._mark(_State.RETURNED)
    except MQError as exc:  # its connection is gone: the broker has it back anyway
        log.info("message %s of a cancelled receive not given back (%s); the broker redelivers it", m.id, exc)


class Message:
    """One delivery; the content is read as on :class:`mqprimer.Message`, the outcomes are awaited."""

    __slots__ = ("blocking", "_calls")

    def __init__(self, blocking: _Message, calls: _Calls) -> None:
        self.blocking = blocking
        self._calls = calls

    id = property(lambda self: self.blocking.id)
    body = property(lambda self: self.blocking.body)
    headers = property(lambda self: self.blocking.headers)
    type = property(lambda self: self.blocking.type)
    attempt = property(lambda self: self.blocking.attempt)
    destination = property(lambda self: self.blocking.destination)
    time = property(lambda self: self.blocking.time)
    source = property(lambda self: self.blocking.source)
    reason = property(lambda self: self.blocking.reason)
    error = property(lambda self: self.blocking.error)
    reply_to = property(lambda self: self.blocking.reply_to)
    correlation_id = property(lambda self: self.blocking.correlation_id)
    settled = property(lambda self: self.blocking.settled)

    @property
    def envelope(self) -> Envelope:
        return self.blocking.envelope

    async def ack(self) -> None:
        calls = self._calls
        if calls.__class__ is Consumer:
            m = self.blocking
            runner = calls._runner
            if runner.inline and not runner.pending:
                m.ack()  # memory://: in-process work, as Consumer.call would run it (Runner.inline)
                return
            if _nowait.ack(m):
                return  # acked on the loop: the driver's ack never waits (Capabilities.nowait)
            if await _native.ack(m):
                return  # acked on the loop's own sockets (Subscription.ack_async)
        await calls.call(self.blocking.ack)

    async def retry(self, delay: float | None = None, *, error: str | None = None) -> None:
        await self._calls.call(functools.partial(self.blocking.retry, delay, error=error))

    async def dead_letter(self, reason: str) -> None:
        await self._calls.call(self.blocking.dead_letter, reason)

    async def touch(self) -> None:
        await self._calls.call(self.blocking.touch)

    async def fail(self, error: BaseException | str) -> None:
        await self._calls.call(self.blocking.fail, error)

    async def reply(self, body: Any, *, headers: dict[str, str] | None = None, type: str | None = None) -> None:
        await self._calls.call(functools.partial(self.blocking.reply, body, headers=headers, type=type),
                               inline=False)

    def __repr__(self) -> str:
        return repr(self.blocking).replace("<Message", "<aio.Message", 1)
